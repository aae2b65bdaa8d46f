"""Query and gallery sets for retrieval evaluation.

The standard protocol for Stanford Online Products, Cars196 and CUB-200-2011 (Song et al.
2016, "Deep Metric Learning via Lifted Structured Feature Embedding") uses the whole test
split as both query and gallery, each query excluded from its own gallery:
``protocol="all"`` returns the same dataset object twice with ``exclude_self=True``.
``protocol="half"`` makes disjoint sets instead (within each class, alternate images in
dataset order go to query and gallery), for protocols with a separate gallery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from fam.errors import FamBenchError


class LabelledSubset(Subset):
    """A ``Subset`` that keeps the dataset attributes (``labels`` restricted to it)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        super().__init__(dataset, indices)
        self.labels = torch.as_tensor(dataset.labels)[torch.as_tensor(indices, dtype=torch.long)]
        for name in ("classes", "has_masks", "mean", "std", "image_size"):
            setattr(self, name, getattr(dataset, name))


@dataclass(frozen=True)
class RetrievalSplit:
    """``query`` and ``gallery`` datasets; ``exclude_self``: drop each query from its own
    ranking (the sets are the same object)."""

    query: Dataset
    gallery: Dataset
    exclude_self: bool


def retrieval_split(dataset: Dataset, protocol: str = "all") -> RetrievalSplit:
    """Query/gallery sets of a labelled test ``dataset`` (see the module docstring)."""
    if protocol == "all":
        return RetrievalSplit(dataset, dataset, exclude_self=True)
    if protocol != "half":
        raise FamBenchError(
            f"retrieval protocol must be 'all' (test set against itself, self excluded) or "
            f"'half' (disjoint halves per class); got {protocol!r}."
        )
    labels = torch.as_tensor(dataset.labels)
    order = torch.argsort(labels, stable=True)
    rank = torch.empty_like(order)
    # position of each image within its class, in dataset order
    _, counts = torch.unique(labels[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank[order] = torch.arange(len(order)) - starts
    query = torch.nonzero(rank % 2 == 0).flatten().tolist()
    gallery = torch.nonzero(rank % 2 == 1).flatten().tolist()
    return RetrievalSplit(
        LabelledSubset(dataset, query), LabelledSubset(dataset, gallery), exclude_self=False
    )
