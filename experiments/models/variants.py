"""Architecture variants that other codebases' checkpoints need (same weights, other forward)."""

from __future__ import annotations

from torch import Tensor

from experiments.models.conv4 import Conv4


class Conv4GlobalMax(Conv4):
    """Conv-4 whose embedding is the global max of the last map, as in FEAT's and the
    ProtoNet reference code's ``ConvNet`` (``MaxPool2d(5)`` over the 5x5 map at 84 px).

    Parameters and their names are :class:`Conv4`'s, so a FEAT ConvNet checkpoint loads into
    either; only this one reproduces FEAT's embedding. FAM has no closed form for a max
    embedding and explains it by forward ablation (one pass per channel).
    """

    def __init__(self, in_channels: int = 3, hidden: int = 64, pools=(True,) * 4) -> None:
        super().__init__(in_channels, hidden, pools, "gap")
        self.pooling = "max"

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, hidden)``."""
        return self.encoder(images).amax(dim=(2, 3))
