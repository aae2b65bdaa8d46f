"""SimCLR (Chen et al., ICML 2020) with lightly's projection head and NT-Xent loss."""

from __future__ import annotations

from torch import Tensor, nn

from experiments.training.base import TaskModule


class SimCLRModule(TaskModule):
    """NT-Xent between the projections of two augmented views (see ``TwoViews``).

    The projection head (lightly's ``SimCLRProjectionHead``: Linear-BN-ReLU-Linear,
    hidden = embedding dim, output ``projection_dim``) is training-only: it belongs to
    this module, not to ``model``, so it is neither saved with the embedding network nor
    part of what is explained. ``temperature`` is NT-Xent's (lightly's default 0.5).
    Under DDP the loss gathers negatives from all processes (lightly does so only when
    the world size is above 1).
    """

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

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        view_a, view_b, _ = batch
        z_a = self.head(self.model(self.images(view_a)))
        z_b = self.head(self.model(self.images(view_b)))
        return self.criterion(z_a.float(), z_b.float())
