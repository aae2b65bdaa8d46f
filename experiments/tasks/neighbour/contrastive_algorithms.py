"""The self-supervised algorithms of the ``contrastive`` family, selected by
``task.algorithm``, and :func:`register_algorithm`, the entry point that adds one.

An algorithm is a :class:`ContrastiveModule`: the training module (a
:class:`~experiments.training.base.TaskModule`) that trains the explained encoder on two
augmented views (``TwoViews``), built from the task config by :meth:`from_config`, with
its own option checks in :meth:`check_config` (run when the config is built). All use
lightly's heads and losses. Heads, predictors and momentum copies belong to the task
module, not to ``model``: the explained (and saved) encoder is always the online
backbone.

- ``simclr`` (Chen et al., ICML 2020): :class:`SimCLRModule`.
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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.training.base import TaskModule


class ContrastiveModule(TaskModule):
    """One algorithm of the contrastive family: its training module.

    Subclasses set ``algorithm`` (the ``task.algorithm`` that selects them), implement
    ``loss(batch)`` on a ``(view_a, view_b, labels)`` batch and :meth:`from_config`, and
    override :meth:`check_config` when some task options do not apply to them; register
    them with :func:`register_algorithm`.
    """

    #: the ``task.algorithm`` that selects this module
    algorithm: ClassVar[str]

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise a ``FamBenchError`` for options of ``config`` (the family's
        ``ContrastiveConfig``) this algorithm cannot take; none by default."""

    @classmethod
    def from_config(
        cls, model: nn.Module, embedding_dim: int, config: Any, optim: dict[str, Any]
    ) -> ContrastiveModule:
        """The module training ``model`` (whose embeddings have ``embedding_dim``) with
        ``config``'s options and the optimiser keywords ``optim``."""
        raise NotImplementedError


#: ``task.algorithm`` -> its module class (filled by :func:`register_algorithm`)
ALGORITHMS: dict[str, type[ContrastiveModule]] = {}


def register_algorithm(cls: type[ContrastiveModule]) -> type[ContrastiveModule]:
    """Class decorator / call: make ``cls`` available as ``task.algorithm == cls.algorithm``
    (the single entry point to add a contrastive algorithm)."""
    if not (isinstance(cls, type) and issubclass(cls, ContrastiveModule)):
        raise TypeError("a contrastive algorithm is a ContrastiveModule subclass")
    if not getattr(cls, "algorithm", None):
        raise TypeError("a contrastive algorithm needs the class attribute `algorithm`")
    ALGORITHMS[cls.algorithm] = cls
    return cls


def _momentum_copy(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


@register_algorithm
class SimCLRModule(ContrastiveModule):
    """NT-Xent between the projections of two augmented views (see ``TwoViews``).

    The projection head (lightly's ``SimCLRProjectionHead``: Linear-BN-ReLU-Linear,
    hidden = embedding dim, output ``projection_dim``) is training-only: it belongs to
    this module, not to ``model``, so it is neither saved with the embedding network nor
    part of what is explained. ``temperature`` is NT-Xent's (lightly's default 0.5).
    Under DDP the loss gathers negatives from all processes (lightly does so only when
    the world size is above 1).
    """

    algorithm = "simclr"

    def __init__(
        self,
        model: nn.Module,
        embedding_dim: int,
        projection_dim: int = 128,
        temperature: float = 0.5,
        **optim,
    ) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(model, **optim)
        self.head = SimCLRProjectionHead(embedding_dim, embedding_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    @classmethod
    def from_config(cls, model, embedding_dim, config, optim):
        return cls(model, embedding_dim, config.projection_dim, config.temperature, **optim)

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        view_a, view_b, _ = batch
        z_a = self.head(self.model(self.images(view_a)))
        z_b = self.head(self.model(self.images(view_b)))
        return self.criterion(z_a.float(), z_b.float())


@register_algorithm
class MoCoModule(ContrastiveModule):
    """MoCo v2 (module docstring); ``projection_dim`` outputs, hidden = embedding dim."""

    algorithm = "moco"

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

    @classmethod
    def from_config(cls, model, embedding_dim, config, optim):
        c = config
        return cls(
            model, embedding_dim, c.projection_dim, c.temperature, c.momentum, c.queue_size, **optim
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


@register_algorithm
class BYOLModule(ContrastiveModule):
    """BYOL (module docstring): projector and predictor to ``projection_dim``, hidden
    ``2 x`` the embedding dim."""

    algorithm = "byol"

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

    @classmethod
    def from_config(cls, model, embedding_dim, config, optim):
        return cls(model, embedding_dim, config.projection_dim, config.momentum, **optim)

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


@register_algorithm
class SimSiamModule(ContrastiveModule):
    """SimSiam (module docstring): projector to ``projection_dim`` (hidden = embedding
    dim), predictor bottleneck ``projection_dim // 4``."""

    algorithm = "simsiam"

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

    @classmethod
    def from_config(cls, model, embedding_dim, config, optim):
        return cls(model, embedding_dim, config.projection_dim, **optim)

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        view_a, view_b, _ = batch
        z = [self.head(self.model(self.images(v))) for v in (view_a, view_b)]
        p = [self.predictor(zi).float() for zi in z]
        z = [zi.detach().float() for zi in z]
        return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))
