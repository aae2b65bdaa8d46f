"""What every task's LightningModule shares: the optimiser, loss history, channels_last."""

from __future__ import annotations

import pytorch_lightning as L
import torch
from torch import Tensor, nn

from fam.errors import FamBenchError

OPTIMIZERS = ("adam", "adamw", "sgd")


class TaskModule(L.LightningModule):
    """Trains ``self.model`` (the explained embedding network) with a task loss.

    Subclasses implement ``loss(batch) -> Tensor``. ``train_losses`` keeps every step's
    loss as a detached device tensor (read it after ``fit``; no per-step host sync);
    ``monitor_history`` the ``(step, value)`` pairs of an optional validation monitor.
    ``optimizer``: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (momentum 0.9); no
    schedule, so short runs behave the same whatever ``max_steps`` is.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise FamBenchError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        self.model = model
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.channels_last = channels_last
        self.train_losses: list[Tensor] = []
        self.monitor_history: list[tuple[int, float]] = []

    def images(self, images: Tensor) -> Tensor:
        """Inputs in the layout the model was converted to (channels_last on CUDA)."""
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def loss(self, batch) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.train_losses.append(loss.detach())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)
