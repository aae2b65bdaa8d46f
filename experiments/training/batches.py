"""Cheap batch access to the suite's datasets, shared by every family's training loader.

Datasets return dict samples (``{"image": (3, H, W), "label": int, ...}``) and expose
``labels``. Batches are fetched through :func:`experiments.embedding.gather`, which
takes a whole index tensor at once: a dataset that implements ``images_at(indices) ->
(B, 3, H, W)`` (e.g. one held in memory as a tensor) is indexed directly, any other is
read sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from experiments.embedding import gather


def labels_of(dataset: Any) -> Tensor:
    """The dataset's labels as a ``(N,)`` int64 tensor (read without decoding images)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return torch.as_tensor([int(dataset[i]["label"]) for i in range(len(dataset))])
    return torch.as_tensor(labels, dtype=torch.long)


def image_size_of(dataset: Any) -> int:
    """Side length of the dataset's square images (``image_size`` or the first image)."""
    size = getattr(dataset, "image_size", None)
    if size is None:
        size = dataset[0]["image"].shape[-1]
    return int(size[-1] if isinstance(size, tuple | list) else size)


class IndexedBatches(Dataset):
    """Map-style view whose ``__getitems__`` fetches a whole batch with
    :func:`~experiments.embedding.gather`.

    With ``DataLoader(view, batch_size=B, sampler=...)`` the loader hands the batch's
    index list to ``__getitems__`` (one gather instead of B sample reads); the collate
    function :func:`pass_through` keeps the ``(images, labels)`` pair as it is.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.labels = labels_of(dataset)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return gather(self.dataset, [index])[0], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return gather(self.dataset, index), self.labels[index]


def pass_through(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate for :class:`IndexedBatches`: the batch is already stacked."""
    return batch
