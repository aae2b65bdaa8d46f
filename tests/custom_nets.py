"""Small user models for the ``model=custom`` tests (importable as ``custom_nets.<Name>``)
and a real Lightning checkpoint of any module (:func:`fit_and_save`)."""

from __future__ import annotations

import urllib.error

import torch
from torch import nn


class FcEmbedder(nn.Module):
    """A metric-learning embedder whose embedding layer is named ``fc``: 16 channels,
    global average pooling, then ``fc`` 16 -> 8 (the embedding, no classes)."""

    def __init__(self, width: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.fc = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


def offline_pretrained(pretrained: bool = False) -> nn.Module:
    """A factory that downloads its weights when ``pretrained``: offline, urllib fails."""
    if pretrained:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    return FcEmbedder()


def fit_and_save(module, path) -> None:
    """One Lightning training step of ``module`` on 4 random 16 px images (its optimiser
    decides whether the weights change), then ``trainer.save_checkpoint(path)``."""
    import pytorch_lightning as pl

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 16, 16))
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(path)
