"""Training (PyTorch Lightning) for the suite's embedding networks, shared by every family.

``train_or_load`` loads a checkpoint, reuses a cached one, or trains with the task
family object it is given (the family builds its LightningModule and its loader); the
checkpoint cache and loader (:mod:`experiments.training.checkpoints`) and the base
LightningModule (:mod:`experiments.training.base`) are the rest. The metric helpers
score a trained network on its task.
"""

from experiments.training.checkpoints import load_weights, save_weights
from experiments.training.metrics import embed, fewshot_accuracy, knn_accuracy, recall_at_k
from experiments.training.train import cached_checkpoint, fit, train_or_load

__all__ = [
    "cached_checkpoint",
    "embed",
    "fewshot_accuracy",
    "fit",
    "knn_accuracy",
    "load_weights",
    "recall_at_k",
    "save_weights",
    "train_or_load",
]
