"""Self-supervised algorithms of the ``contrastive`` family, selected by ``task.algorithm``.

All train on two augmented views (``TwoViews``) with lightly's heads and losses. Heads,
predictors and momentum copies belong to the task module, not to ``model``: the
explained (and saved) encoder is always the online backbone.

- ``simclr`` (Chen et al., ICML 2020): :class:`~experiments.training.contrastive.SimCLRModule`.
- ``moco`` (v2; Chen et al., arXiv 2003.04297): query encoder + 2-layer MLP projector;
  keys from a momentum copy (``task.momentum``); InfoNCE at ``task.temperature`` against
  a queue of ``task.queue_size`` past keys (lightly's ``NTXentLoss`` memory bank).
- ``byol`` (Grill et al., NeurIPS 2020): online backbone + projector + predictor; target
  = momentum copy of backbone + projector, its momentum rising from ``task.momentum`` to 1
  on a cosine schedule; symmetric negative cosine loss.
- ``simsiam`` (Chen & He, CVPR 2021): projector + predictor, stop-gradient on the other
  branch, symmetric negative cosine loss; no momentum encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from experiments.training.base import TaskModule
from experiments.training.contrastive import SimCLRModule


def _momentum_copy(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


class MoCoModule(TaskModule):
    """MoCo v2 (module docstring); ``projection_dim`` outputs, hidden = embedding dim."""

    def __init__(
        self,
        model: nn.Module,
        embedding_dim: int,
        projection_dim: int = 128,
        temperature: float = 0.2,
        momentum: float = 0.99,
        queue_size: int = 4096,
        **optim,
    ) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        super().__init__(model, **optim)
        self.head = MoCoProjectionHead(embedding_dim, embedding_dim, projection_dim)
        self.model_momentum = _momentum_copy(model)
        self.head_momentum = _momentum_copy(self.head)
        self.momentum = momentum
        self.criterion = NTXentLoss(
            temperature=temperature, memory_bank_size=(queue_size, projection_dim)
        )

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        from lightly.models.utils import update_momentum

        update_momentum(self.model, self.model_momentum, self.momentum)
        update_momentum(self.head, self.head_momentum, self.momentum)
        view_a, view_b, _ = batch
        query = self.head(self.model(self.images(view_a)))
        with torch.no_grad():
            key = self.head_momentum(self.model_momentum(self.images(view_b)))
        return self.criterion(query.float(), key.float())


class BYOLModule(TaskModule):
    """BYOL (module docstring): projector and predictor to ``projection_dim``, hidden
    ``2 x`` the embedding dim."""

    def __init__(
        self,
        model: nn.Module,
        embedding_dim: int,
        projection_dim: int = 128,
        momentum: float = 0.99,
        **optim,
    ) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        super().__init__(model, **optim)
        hidden = 2 * embedding_dim
        self.head = BYOLProjectionHead(embedding_dim, hidden, projection_dim)
        self.predictor = BYOLPredictionHead(projection_dim, hidden, projection_dim)
        self.model_momentum = _momentum_copy(model)
        self.head_momentum = _momentum_copy(self.head)
        self.momentum = momentum
        self.criterion = NegativeCosineSimilarity()

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        steps = max(1, int(getattr(self.trainer, "max_steps", 1) or 1))
        m = cosine_schedule(self.global_step, steps, self.momentum, 1.0)
        update_momentum(self.model, self.model_momentum, m)
        update_momentum(self.head, self.head_momentum, m)
        view_a, view_b, _ = batch
        views = (self.images(view_a), self.images(view_b))
        p = [self.predictor(self.head(self.model(v))).float() for v in views]
        with torch.no_grad():
            z = [self.head_momentum(self.model_momentum(v)).float() for v in views]
        return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))


class SimSiamModule(TaskModule):
    """SimSiam (module docstring): projector to ``projection_dim`` (hidden = embedding
    dim), predictor bottleneck ``projection_dim // 4``."""

    def __init__(
        self, model: nn.Module, embedding_dim: int, projection_dim: int = 128, **optim
    ) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__(model, **optim)
        self.head = SimSiamProjectionHead(embedding_dim, embedding_dim, projection_dim)
        self.predictor = SimSiamPredictionHead(
            projection_dim, max(1, projection_dim // 4), projection_dim
        )
        self.criterion = NegativeCosineSimilarity()

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        view_a, view_b, _ = batch
        z = [self.head(self.model(self.images(v))) for v in (view_a, view_b)]
        p = [self.predictor(zi).float() for zi in z]
        z = [zi.detach().float() for zi in z]
        return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))


#: ``task.algorithm`` -> ``(model, embedding_dim, task config, optimiser kwargs) -> module``
ALGORITHMS: dict[str, Callable[[nn.Module, int, Any, dict[str, Any]], TaskModule]] = {
    "simclr": lambda model, dim, c, optim: SimCLRModule(
        model, dim, c.projection_dim, c.temperature, **optim
    ),
    "moco": lambda model, dim, c, optim: MoCoModule(
        model, dim, c.projection_dim, c.temperature, c.momentum, c.queue_size, **optim
    ),
    "byol": lambda model, dim, c, optim: BYOLModule(
        model, dim, c.projection_dim, c.momentum, **optim
    ),
    "simsiam": lambda model, dim, c, optim: SimSiamModule(model, dim, c.projection_dim, **optim),
}
