"""ResNet-12, the few-shot standard backbone (Oreshkin et al. 2018; Lee et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from zennit.layer import Sum

from experiments.models._pooling import EmbeddingPool, check_pooling


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class ResidualBlock(nn.Module):
    """Three conv3x3-BN (LeakyReLU(0.1) between them), a 1x1 conv-BN shortcut, the
    activation after the sum, then an optional 2x2 max-pool.

    The activation follows the addition as in MetaOptNet/FEAT, so the block's output (the
    explained feature map) is non-negative like a ReLU network's.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_channels, out_channels),
            nn.LeakyReLU(0.1),
            *_conv_bn(out_channels, out_channels),
            nn.LeakyReLU(0.1),
            *_conv_bn(out_channels, out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        # The residual addition as a module (zennit's Sum, summing a stacked last axis),
        # so LRP splits relevance between the branches instead of copying it to both.
        self.add = Sum(dim=-1)
        self.activation = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` (``H' = H // 2`` when pooling)."""
        summed = self.add(torch.stack([self.body(x), self.shortcut(x)], dim=-1))
        return self.pool(self.activation(summed))


class ResNet12(nn.Module):
    """Four residual blocks of widths ``channels`` (64-160-320-640 in the literature).

    Args:
        pools: which blocks end with a 2x2 max-pool (as in :class:`Conv4`). All four at
            84 px give the classic 5x5 map; pool fewer at small sizes to keep detail.
        pooling: ``"gap"`` (``D = channels[-1]``) or ``"flatten"`` (``D = channels[-1]*h*w``).

    Blocks are ``layer1`` ... ``layer4``; ``default_target_layer`` is ``layer4``.
    """

    default_target_layer = "layer4"

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        pools: Sequence[bool] = (True, True, True, True),
        pooling: Literal["gap", "flatten"] = "gap",
    ) -> None:
        super().__init__()
        if len(pools) != 4 or len(channels) != 4:
            raise ValueError(
                f"ResNet12 needs four blocks: got pools={list(pools)}, channels={list(channels)}"
            )
        check_pooling(pooling)
        widths = [in_channels, *channels]
        for i in range(4):
            self.add_module(
                f"layer{i + 1}", ResidualBlock(widths[i], widths[i + 1], bool(pools[i]))
            )
        self.pooling = pooling
        self.pool = EmbeddingPool(pooling)
        self.embedding_dim = channels[-1] if pooling == "gap" else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, D)``."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(images))))
        return self.pool(x)
