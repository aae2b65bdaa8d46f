"""SimpleShot (Wang et al., arXiv 1911.04623): ``task.algorithm=simpleshot``.

The network is trained as a plain classifier of the training classes (linear head,
cross-entropy on ``trainer.batch_size`` images a step; the head is training-only), then
evaluated by nearest centroid on CL2N features (centred with the training split's mean
embedding, then L2-normalised). The mean is recomputed from the training split with the
evaluated network, so a checkpoint needs no sidecar. Reference: the CL2N centroid.
Explained similarity: ``-||normalise(e - mean) - centroid||^2``. Causal score: the
softmax of ``-d^2 / T`` over the episode's classes (``T = task.temperature``, default 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from experiments.embedding import embed
from experiments.tasks.fewshot.algorithm import FewShotAlgorithm, register_algorithm
from experiments.tasks.fewshot.episodes import EpisodeClassifier
from experiments.training.base import TaskModule
from experiments.training.batches import IndexedBatches, labels_of, pass_through
from fam.errors import FamBenchError


class CL2NDistance:
    """SimpleShot's score ``-|| normalise(emb - mean) - ref ||^2`` with ``ref`` a CL2N
    centroid; ``(N, D), (N, D) -> (N,)``."""

    def __init__(self, mean: Tensor) -> None:
        self.mean = mean

    def transform(self, emb: Tensor) -> Tensor:
        return F.normalize(emb - self.mean.to(emb), dim=1)

    def __call__(self, emb: Tensor, ref: Tensor) -> Tensor:
        return -(self.transform(emb) - ref).pow(2).sum(1)


@register_algorithm
class SimpleShot(FewShotAlgorithm):
    """SimpleShot (module docstring)."""

    name = "simpleshot"
    similarity_name = "cl2n_euclidean"
    options = ("temperature",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.mean: Tensor | None = None

    def training_module(self, model, train_set, optim):
        dim = embed(model, train_set, torch.arange(2)).shape[1]
        classes = int(labels_of(train_set).max()) + 1
        return SimpleShotModule(model, dim, classes, **optim)

    def train_loader(self, train_set, trainer, seed):
        w = trainer.num_workers
        return DataLoader(
            IndexedBatches(train_set),
            batch_size=min(trainer.batch_size, len(train_set)),
            shuffle=True,
            collate_fn=pass_through,
            drop_last=True,
            num_workers=w,
            persistent_workers=w > 0,
        )

    def prepare(self, model, train_set):
        self.mean = embed(model, train_set).mean(0)

    def classifier(self, support, n_way, n_shot):
        if self.mean is None:
            raise FamBenchError("simpleshot needs the training-split mean: call prepare first.")
        score = CL2NDistance(self.mean.to(support.device))
        centroids = score.transform(support).view(n_way, n_shot, -1).mean(1)
        t = self.config.temperature or 1.0

        def probabilities(emb: Tensor) -> Tensor:
            d = (score.transform(emb)[:, None] - centroids[None]).pow(2).sum(-1)
            return torch.softmax(-d / t, dim=1)

        return EpisodeClassifier(centroids, score, probabilities)


class SimpleShotModule(TaskModule):
    """SimpleShot's training: the network as a plain classifier of the training classes
    (linear head, cross-entropy on class-balanced batches); the head is training-only."""

    def __init__(self, model: nn.Module, embedding_dim: int, num_classes: int, **optim) -> None:
        super().__init__(model, **optim)
        self.head = nn.Linear(embedding_dim, num_classes)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.head(self.model(self.images(images)).float()), labels)
