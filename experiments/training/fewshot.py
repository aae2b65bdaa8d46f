"""Prototypical Networks (Snell et al., NeurIPS 2017), trained episodically."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.training.base import TaskModule
from fam.errors import FamBenchError
from fam.similarity import pairwise

SIMILARITIES = ("euclidean", "euclidean_distance", "cosine")


class ProtoNetModule(TaskModule):
    """Episode loss: cross-entropy of the queries over logits to the class prototypes.

    A batch is one episode's images ``(W*(S+Q), 3, H, W)``: ``W*S`` support images then
    ``W*Q`` queries, each class-major. Prototypes are the mean support embeddings.

    Logits: ``similarity="euclidean"`` uses ``-||q - p||^2`` (the paper's; no
    temperature), ``"euclidean_distance"`` ``-||q - p||`` (easyfsl's; no temperature).
    ``similarity="cosine"`` uses ``tau * cos(q, p)``: cosine logits lie in
    [-1, 1], too flat for a softmax over classes, so they are scaled by ``tau``. With
    ``temperature=None`` (default) ``tau`` is learned, starting at 10, as a log-parameter
    (so it stays positive) of this module (not of the embedding network, which is what is
    saved and explained); a number fixes ``tau`` to it.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_shot: int,
        n_query: int,
        similarity: str = "euclidean",
        temperature: float | None = None,
        **optim,
    ) -> None:
        super().__init__(model, **optim)
        if similarity not in SIMILARITIES:
            raise FamBenchError(
                f"ProtoNet similarity must be one of {SIMILARITIES}, got {similarity!r}."
            )
        if temperature is not None and temperature <= 0:
            raise FamBenchError(f"The cosine temperature must be > 0, got {temperature}.")
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.similarity = similarity
        log_tau = torch.tensor(math.log(10.0 if temperature is None else temperature))
        if similarity == "cosine" and temperature is None:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    def logits(self, query: Tensor, prototypes: Tensor) -> Tensor:
        """``(Q, D), (W, D) -> (Q, W)``."""
        scores = pairwise(self.similarity, query, prototypes)
        if self.similarity != "cosine":
            return scores
        return self.log_temperature.exp() * scores

    def loss(self, images: Tensor) -> Tensor:
        emb = self.model(self.images(images)).float()
        n_support = self.n_way * self.n_shot
        if emb.shape[0] != n_support + self.n_way * self.n_query:
            raise FamBenchError(
                f"Episode batch has {emb.shape[0]} images; {self.n_way}-way {self.n_shot}-shot "
                f"{self.n_query}-query needs {n_support + self.n_way * self.n_query}."
            )
        prototypes = emb[:n_support].view(self.n_way, self.n_shot, -1).mean(dim=1)
        target = torch.arange(self.n_way, device=emb.device).repeat_interleave(self.n_query)
        return F.cross_entropy(self.logits(emb[n_support:], prototypes), target)
