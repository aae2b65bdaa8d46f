"""Training (PyTorch Lightning) for the suite's embedding networks, shared by every family.

``train_or_load`` loads a checkpoint, reuses a cached one, or trains with the task
family object it is given (the family builds its LightningModule and its loader); the
checkpoint cache and loader (:mod:`experiments.training.checkpoints`) and the base
LightningModule (:mod:`experiments.training.base`) are the rest. Each family's task
metrics live in its own package (:mod:`experiments.tasks.fewshot`,
:mod:`experiments.tasks.neighbour`).
"""

from experiments.training.checkpoints import load_weights, save_weights
from experiments.training.train import cached_checkpoint, fit, train_or_load

__all__ = [
    "cached_checkpoint",
    "fit",
    "load_weights",
    "save_weights",
    "train_or_load",
]
