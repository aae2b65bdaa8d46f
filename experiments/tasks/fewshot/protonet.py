"""Prototypical Networks (Snell et al., NeurIPS 2017): ``task.algorithm=protonet``.

Reference: the class prototype (mean support embedding). Explained similarity:
``task.similarity=euclidean`` the negative squared distance ``-||e - p||^2`` (or, with
``task.distance=euclidean``, easyfsl's unsquared ``-||e - p||``), or ``cosine``. Causal
score: the episode softmax over the prototypes at the model's own temperature (a cosine
model's learned or fixed ``tau``; 1 for the distances). Average Drop / Increase in
Confidence read the probability (or ``max(cos, 0)`` for a cosine model under
``metric.score=similarity``; skipped with a note for the raw negative distance).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.tasks.fewshot.algorithm import FewShotAlgorithm, register_algorithm, split_episode
from experiments.tasks.fewshot.episodes import EpisodeClassifier
from experiments.training.base import TaskModule
from fam.errors import FamBenchError
from fam.similarity import pairwise

#: ``task.distance``: the similarity each names (``fam.similarity``)
DISTANCES = {"squared_euclidean": "euclidean", "euclidean": "euclidean_distance"}
#: the similarities :class:`ProtoNetModule` trains with
SIMILARITIES = ("euclidean", "euclidean_distance", "cosine")


@register_algorithm
class ProtoNet(FewShotAlgorithm):
    """Prototypical Networks, ``task.similarity`` euclidean or cosine (module docstring)."""

    name = "protonet"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # cosine logits are tau * cos (learned from 10 unless task.temperature fixes it);
        # the squared distance has no temperature (tau = 1)
        fixed = config.temperature if config.temperature is not None else 10.0
        self.log_temperature = torch.tensor(float(fixed) if self.cosine else 1.0).log()

    @classmethod
    def check_options(cls, config: Any) -> None:
        if config.similarity not in ("euclidean", "cosine"):
            raise FamBenchError(
                f"task.similarity must be 'euclidean' or 'cosine' for ProtoNet, got "
                f"{config.similarity!r}."
            )
        if config.distance not in DISTANCES:
            raise FamBenchError(
                f"task.distance must be one of {list(DISTANCES)}, got {config.distance!r}."
            )

    @classmethod
    def reads(cls, config: Any) -> frozenset[str]:
        """The distance with the euclidean similarity, the temperature with cosine."""
        if config.similarity == "euclidean":
            return frozenset(("similarity", "distance"))
        return frozenset(("similarity", "temperature"))

    @property
    def cosine(self) -> bool:
        return self.config.similarity == "cosine"

    @property
    def similarity_name(self) -> str:  # type: ignore[override]
        """The score the model decides with: ``euclidean`` (``-||e - p||^2``),
        ``euclidean_distance`` (``-||e - p||``, ``task.distance=euclidean``) or ``cosine``."""
        if self.cosine:
            return "cosine"
        return DISTANCES[self.config.distance]

    @property
    def similarity_label(self) -> str:
        return f"{self.similarity_name} similarity to the prototype"

    @property
    def similarity_confidence(self):
        """``max(cos, 0)`` for a cosine model; none for the negative distances."""
        return _shifted_cosine if self.cosine else None

    @property
    def requires_task_state(self) -> bool:
        return self.cosine and self.config.temperature is None

    @property
    def temperature(self) -> float:
        """The model's own logit scale: the softmax over prototypes is of ``tau * s``."""
        return float(self.log_temperature.detach().exp())

    def training_module(self, model, train_set, optim):
        c = self.config
        module = self._episode_module(
            ProtoNetModule,
            model,
            similarity=self.similarity_name,
            temperature=c.temperature,
            **optim,
        )
        if self.cosine:
            self.log_temperature = module.log_temperature  # live, saved in the sidecar
        return module

    def task_state(self, module):
        if not self.requires_task_state:  # euclidean, or a fixed temperature: nothing learned
            return {}
        return {"log_temperature": module.log_temperature.detach().cpu().clone()}

    def load_task_state(self, state):
        if self.requires_task_state:
            self.log_temperature = state["log_temperature"].detach().clone()

    def classifier(self, support, n_way, n_shot):
        prototypes = support.view(n_way, n_shot, -1).mean(1)
        similarity, tau = self.similarity_name, self.temperature
        return EpisodeClassifier(
            prototypes,
            similarity,
            lambda emb: torch.softmax(tau * pairwise(similarity, emb, prototypes), dim=1),
            # the nearest prototype by the similarity itself
            decision=lambda emb: pairwise(similarity, emb, prototypes),
        )


def _shifted_cosine(similarity: Tensor) -> Tensor:
    return similarity.clamp_min(0)


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
        support, query = split_episode(emb, self.n_way, self.n_shot, self.n_query)
        prototypes = support.view(self.n_way, self.n_shot, -1).mean(dim=1)
        target = torch.arange(self.n_way, device=emb.device).repeat_interleave(self.n_query)
        return F.cross_entropy(self.logits(query, prototypes), target)
