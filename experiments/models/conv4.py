"""Conv-4, the standard few-shot backbone (Vinyals et al. 2016; Snell et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from experiments.models._pooling import EmbeddingPool, check_pooling


def conv_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four conv-BN-ReLU(-maxpool) blocks of ``hidden`` filters.

    Args:
        hidden: filters per block (64 in the literature).
        pools: which blocks end with a 2x2 max-pool. The classic setting pools all four
            (84 px -> 5x5); at 32 px the suite's default pools two, so the last map is 8x8
            and explanations keep spatial detail.
        pooling: how the embedding is made from the last map: ``"gap"`` (global average,
            ``D = hidden``) or ``"flatten"`` (``D = hidden * h * w``).

    ``default_target_layer`` is the last block, ``encoder.3``.
    """

    default_target_layer = "encoder.3"

    def __init__(
        self,
        in_channels: int = 3,
        hidden: int = 64,
        pools: Sequence[bool] = (True, True, True, True),
        pooling: Literal["gap", "flatten"] = "gap",
    ) -> None:
        super().__init__()
        if len(pools) != 4:
            raise ValueError(f"pools needs one flag per block (4), got {list(pools)}")
        check_pooling(pooling)
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.encoder = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], bool(pools[i])) for i in range(4))
        )
        self.pooling = pooling
        self.pool = EmbeddingPool(pooling)
        self.embedding_dim = hidden if pooling == "gap" else None

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, D)``."""
        return self.pool(self.encoder(images))
