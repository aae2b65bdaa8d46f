"""Contrastive's held-out images (``task.holdout_per_class``): :func:`holdout_split`
splits a dataset by class, and :class:`Subset` is a dataset's part with its labels and
attributes, its item indices mapped to the dataset's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from experiments.embedding import gather
from experiments.training.batches import labels_of
from fam.errors import FamBenchError


class Subset(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset``, with its ``labels`` and attributes (masks,
    classes, normalisation) passed through."""

    def __init__(self, dataset: Any, indices: Tensor) -> None:
        self.dataset, self.indices = dataset, indices.long()
        self.labels = labels_of(dataset)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.indices[i])]

    def base_indices(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The dataset's own indices of items ``indices`` of this subset."""
        return self.indices[torch.as_tensor(indices, dtype=torch.long)]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        base = self.base_indices(indices).tolist()
        if hasattr(self.dataset, "__getitems__"):
            return list(self.dataset.__getitems__(base))
        return [self.dataset[i] for i in base]

    def images_at(self, indices: Tensor) -> Tensor:
        return gather(self.dataset, self.base_indices(indices))

    def images_on_other_backgrounds(self, indices: Tensor, keys: Tensor) -> Tensor:
        return self.dataset.images_on_other_backgrounds(self.base_indices(indices), keys)

    def pairs(self, class_a: Tensor, class_b: Tensor, keys: Tensor) -> dict:
        """Pair images (by classes and keys, no item indices): the dataset's own."""
        return self.dataset.pairs(class_a, class_b, keys)

    def __getattr__(self, name: str) -> Any:
        # Data attributes (masks, classes, normalisation) pass through; anything indexed
        # by item is defined above with the index mapped, and unknown methods that take
        # item indices must never reach the dataset unmapped.
        if name in ("dataset", "indices", "labels") or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self.dataset, name)
        if callable(value):
            raise AttributeError(
                f"{name!r}: a method of {type(self.dataset).__name__} is not passed through a "
                "Subset (its item indices would not be mapped)."
            )
        return value


def holdout_split(dataset: Any, per_class: int) -> tuple[Tensor, Tensor]:
    """``(kept, held_out)`` indices: the last ``per_class`` items of every class (in index
    order) are held out. Needs more than ``per_class`` items in every class."""
    labels = labels_of(dataset)
    held = []
    for c in torch.unique(labels).tolist():
        items = torch.nonzero(labels == c).flatten()
        if len(items) <= per_class:
            raise FamBenchError(
                f"task.holdout_per_class={per_class} leaves no training image of class {c} "
                f"({len(items)} images); lower it or render more images per class."
            )
        held.append(items[-per_class:])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return torch.nonzero(keep).flatten(), held_out
