"""Training (PyTorch Lightning) and task metrics for the suite's embedding networks.

``train_or_load`` loads a checkpoint, reuses a cached one, or trains: ProtoNet episodes
(``fewshot``), SimCLR (``contrastive``, lightly) or deep metric learning (``retrieval``,
pytorch-metric-learning). The metric helpers score a trained network on its task.
"""

from experiments.training.checkpoints import key_hash, load_weights, save_weights
from experiments.training.train import cached_checkpoint, fit, train_or_load

__all__ = [
    "cached_checkpoint",
    "fit",
    "key_hash",
    "load_weights",
    "save_weights",
    "train_or_load",
]
