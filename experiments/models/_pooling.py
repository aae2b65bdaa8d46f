"""The embedding ``pooling`` shared by the suite's networks: ``"gap"`` or ``"flatten"``.

:class:`EmbeddingPool` is a module (not a function call inside ``forward``) so that
module-hook methods see it: zennit's LRP composites give ``nn.AdaptiveAvgPool2d`` their
pooling rule (``Norm``: relevance in proportion to each position's activation), where a
functional mean would pass the gradient, ``R / (h w)`` to every position, including
positions whose activation is zero and that cannot pass relevance further down. It has
no parameters or buffers, so state_dict keys are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class EmbeddingPool(nn.Module):
    """:func:`pool_embedding` as a module: ``(N, C, h, w) -> (N, D)``."""

    def __init__(self, pooling: str = "gap") -> None:
        super().__init__()
        check_pooling(pooling)
        self.pooling = pooling
        self.average = nn.AdaptiveAvgPool2d(1) if pooling == "gap" else nn.Identity()

    def forward(self, features: Tensor) -> Tensor:
        return torch.flatten(self.average(features), 1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"
