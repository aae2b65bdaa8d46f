"""The embedding ``pooling`` shared by the suite's networks: ``"gap"`` or ``"flatten"``."""

from __future__ import annotations

import torch
from torch import Tensor

POOLINGS = ("gap", "flatten")


def check_pooling(pooling: str) -> None:
    """Raise ``ValueError`` unless ``pooling`` is ``"gap"`` or ``"flatten"``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'gap' or 'flatten', got {pooling!r}")


def pool_embedding(features: Tensor, pooling: str) -> Tensor:
    """``(N, C, h, w) -> (N, D)``: global average (``D = C``) or flattened (``D = C*h*w``)."""
    if pooling == "gap":
        return features.mean(dim=(2, 3))
    return torch.flatten(features, 1)
