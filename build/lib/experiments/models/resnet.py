"""torchvision ResNet-18/50 as embedding networks (no ``fc``), for SimCLR and retrieval."""

from __future__ import annotations

from typing import Literal

import torchvision
from torch import Tensor, nn

from experiments.models._pooling import check_pooling, pool_embedding

ARCHITECTURES = ("resnet18", "resnet50")


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``: ``forward`` returns the embedding.

    Module names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
    torchvision state_dict loads once its ``fc.*`` entries are dropped (the checkpoint
    loader does that, see ``checkpoint_ignore``). Weights are never downloaded: the network
    starts from torchvision's random initialisation (``weights=None``).

    Args:
        arch: ``"resnet18"`` (``D = 512``) or ``"resnet50"`` (``D = 2048``).
        cifar_stem: replace the 7x7 stride-2 ``conv1`` with a 3x3 stride-1 one and drop the
            max-pool (the SimCLR CIFAR variant): a 32 px image keeps a 4x4 ``layer4`` map
            instead of 1x1.
        pooling: ``"gap"`` or ``"flatten"`` of the ``layer4`` map.
        zero_init_residual: torchvision's option (last BN of each block starts at zero).
    """

    default_target_layer = "layer4"
    checkpoint_ignore = ("fc.",)

    def __init__(
        self,
        arch: Literal["resnet18", "resnet50"] = "resnet18",
        cifar_stem: bool = False,
        pooling: Literal["gap", "flatten"] = "gap",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        check_pooling(pooling)
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        else:
            self.conv1 = net.conv1
            self.maxpool = net.maxpool
        self.bn1, self.relu = net.bn1, net.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.pooling = pooling
        self.embedding_dim = net.fc.in_features if pooling == "gap" else None

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W) -> (N, D)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return pool_embedding(x, self.pooling)
