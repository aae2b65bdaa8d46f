"""torchvision-style ResNets as embedding networks (no ``fc``), for SimCLR and retrieval.

``resnet18`` / ``resnet50`` are torchvision's networks; ``easyfsl_resnet12`` is easyfsl's
``resnet12()`` (torchvision ``BasicBlock`` s in layers ``[1, 1, 2, 1]`` of widths
64-160-320-640), so checkpoints of those libraries load by their own key names.
"""

from __future__ import annotations

from typing import Literal

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from experiments.models._pooling import check_pooling, pool_embedding

ARCHITECTURES = ("resnet18", "resnet50", "easyfsl_resnet12")


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``: ``forward`` returns the embedding.

    Module names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
    torchvision state_dict loads once its ``fc.*`` entries are dropped (the checkpoint
    loader does that, see ``checkpoint_ignore``). Weights are never downloaded: the network
    starts from torchvision's random initialisation (``weights=None``).

    Args:
        arch: ``"resnet18"`` (``D = 512``), ``"resnet50"`` (``D = 2048``) or
            ``"easyfsl_resnet12"`` (``D = 640``; easyfsl's ``resnet12()``, whose stem is
            always the 3x3 one: give ``cifar_stem=True``).
        cifar_stem: replace the 7x7 stride-2 ``conv1`` with a 3x3 stride-1 one and drop the
            max-pool (the SimCLR CIFAR variant): a 32 px image keeps a 4x4 ``layer4`` map
            instead of 1x1.
        stem_padding: padding of the 3x3 CIFAR ``conv1``. 1 (the SimCLR paper, easyfsl)
            keeps the size; solo-learn pads by 2 (a 32 px image becomes 34 px), so its
            CIFAR checkpoints need ``stem_padding=2``. The weights have the same shape
            either way, which is why the loader checks it (see ``experiments.models.layouts``).
        pooling: ``"gap"`` or ``"flatten"`` of the ``layer4`` map.
        zero_init_residual: torchvision's option (last BN of each block starts at zero).
    """

    default_target_layer = "layer4"
    checkpoint_ignore = ("fc.",)

    def __init__(
        self,
        arch: Literal["resnet18", "resnet50", "easyfsl_resnet12"] = "resnet18",
        cifar_stem: bool = False,
        pooling: Literal["gap", "flatten"] = "gap",
        zero_init_residual: bool = False,
        stem_padding: int = 1,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        if arch == "easyfsl_resnet12" and not cifar_stem:
            raise ValueError("easyfsl_resnet12 has the 3x3 stem only: set cifar_stem=True")
        if int(stem_padding) < 0:
            raise ValueError(f"stem_padding must be >= 0, got {stem_padding}")
        check_pooling(pooling)
        if arch == "easyfsl_resnet12":
            net = _easyfsl_resnet12(zero_init_residual)
        else:
            net = getattr(torchvision.models, arch)(
                weights=None, zero_init_residual=zero_init_residual
            )
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=int(stem_padding), bias=False)
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
        width = 640 if arch == "easyfsl_resnet12" else net.fc.in_features
        self.embedding_dim = width if pooling == "gap" else None

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W) -> (N, D)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return pool_embedding(x, self.pooling)


def _easyfsl_resnet12(zero_init_residual: bool) -> nn.Module:
    """easyfsl's ``resnet12()`` body: torchvision BasicBlocks, layers [1, 1, 2, 1], widths
    64-160-320-640, stride 1 in layer1 and 2 after; its initialisation (kaiming fan_out)."""
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.bn1, net.relu, net.maxpool = nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.Identity()
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 160, 320, 640), (1, 1, 2, 1), strict=True)):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(inplanes, planes, stride, downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        setattr(net, f"layer{i + 1}", nn.Sequential(*layers))
        inplanes = planes
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    if zero_init_residual:
        for module in net.modules():
            if isinstance(module, BasicBlock):
                nn.init.constant_(module.bn2.weight, 0)
    return net
