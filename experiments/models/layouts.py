"""Other codebases' checkpoint layouts, recognised by the key names their own code writes.

- ``feat_resnet12``: FEAT's ResNet-12 (``{'params': model.state_dict()}``, keys
  ``encoder.layer1.0.conv1.weight`` ... ``bn3``, ``downsample.0/1``; easyfsl's
  ``feat_resnet12`` writes the same under ``backbone.``). Loads into ``model=resnet12``,
  keys renamed onto ``layerN.body.i`` / ``layerN.shortcut.i``.
- ``feat_convnet``: FEAT's ConvNet (``{'params': ...}``, ``encoder.encoder.0.0.weight``, or
  ``encoder.0.0.weight`` in its pre-trained file). Same names as ``model=conv4``; FEAT
  embeds by a global max, which :class:`~experiments.models.variants.Conv4GlobalMax` keeps.
- ``easyfsl_resnet``: easyfsl's ``resnet12()`` / ``resnet18()`` inside a
  ``FewShotClassifier`` (``backbone.conv1.weight`` 3x3, ``backbone.fc.weight``). Loads
  into ``ResNetEncoder(arch="easyfsl_resnet12" | "resnet18", cifar_stem=True)``.
- ``solo_learn_resnet``: solo-learn's Lightning ``state_dict`` (``backbone.*`` torchvision
  names, ``classifier.*``, ``projector.*``; ``fc`` is an identity there). CIFAR runs have a
  3x3 ``conv1`` with padding 2: ``ResNetEncoder(cifar_stem=True, stem_padding=2)``.

easyfsl has no Conv-4 module of its own (its backbones are the ResNets above, or any
module the user passes in, saved as ``backbone.<that module's keys>``), so a Conv-4 trained
with easyfsl loads as ``model=conv4`` when its module names are the suite's, or as
``model=custom`` with the user's own class otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from experiments.models.variants import Conv4GlobalMax
from fam.errors import FamBenchError


def same_name(key: str) -> str:
    return key


_FEAT_BLOCK = re.compile(r"^(layer[1-4])\.0\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")
_FEAT_BODY = {
    "conv1": "body.0",
    "bn1": "body.1",
    "conv2": "body.3",
    "bn2": "body.4",
    "conv3": "body.6",
    "bn3": "body.7",
    "downsample.0": "shortcut.0",
    "downsample.1": "shortcut.1",
}


def feat_resnet12_name(key: str) -> str:
    """FEAT's ``layer1.0.conv2.weight`` -> the suite's ``layer1.body.3.weight``."""
    match = _FEAT_BLOCK.match(key)
    if match is None:
        return key
    layer, part, rest = match.groups()
    return f"{layer}.{_FEAT_BODY[part]}.{rest}"


#: key maps tried by the loader, identity first (it wins ties)
RENAMES: dict[str, Callable[[str], str]] = {"": same_name, "feat_resnet12": feat_resnet12_name}


@dataclass(frozen=True)
class Layout:
    """A recognised foreign layout: where it comes from and the suite model it fits."""

    name: str
    origin: str
    fits: str
    prefix: str


def _find(state: Mapping[str, Tensor], suffix: str) -> str | None:
    return next((k for k in state if k == suffix or k.endswith("." + suffix)), None)


def identify(state: Mapping[str, Tensor], container: str | None) -> Layout | None:
    """Recognise FEAT / easyfsl / solo-learn checkpoints by their key names (module doc)."""
    key = _find(state, "layer1.0.conv3.weight")
    first = _find(state, "layer1.0.conv1.weight")
    if key is not None and first is not None and state[first].shape[1] == 3:
        prefix = key[: -len("layer1.0.conv3.weight")]
        origin = "easyfsl's feat_resnet12" if prefix.startswith("backbone.") else "FEAT"
        return Layout(
            "feat_resnet12",
            f"{origin} ResNet-12 (three 3x3 convs per block, no stem)",
            "model=resnet12 (widths 64-160-320-640, a max-pool after every block)",
            prefix,
        )
    conv = _find(state, "encoder.0.0.weight")
    if container == "params" and conv is not None and state[conv].shape[1:] == (3, 3, 3):
        return Layout(
            "feat_convnet",
            "FEAT ConvNet (Conv-4; FEAT embeds by a global max over the last map)",
            "model=conv4 (hidden=64, all four blocks pooled), or for FEAT's own embedding "
            "model=custom model.target=experiments.models.Conv4GlobalMax",
            conv[: -len("encoder.0.0.weight")],
        )
    stem = state.get("backbone.conv1.weight")
    if stem is None:
        return None
    cifar = tuple(stem.shape[-2:]) == (3, 3)
    if "backbone.fc.weight" in state and cifar:
        blocks = []
        for layer in range(1, 5):
            found = [int(m.group(1)) for k in state if (m := _block(k, layer))]
            blocks.append(1 + max(found, default=-1))
        arch = {(1, 1, 2, 1): "easyfsl_resnet12", (2, 2, 2, 2): "resnet18"}.get(tuple(blocks))
        fits = (
            f"model=custom model.target=experiments.models.ResNetEncoder "
            f"+model.kwargs.arch={arch} +model.kwargs.cifar_stem=true"
            if arch
            else f"no suite ResNet (blocks per layer {blocks}); use model=custom with "
            "easyfsl's own class"
        )
        return Layout(
            "easyfsl_resnet",
            "easyfsl ResNet (backbone.* of a FewShotClassifier)",
            fits,
            "backbone.",
        )
    if "classifier.weight" in state and "backbone.fc.weight" not in state:
        fits = (
            "a ResNetEncoder with cifar_stem=true and stem_padding=2 (solo-learn's CIFAR "
            "stem: 3x3, stride 1, padding 2, no max-pool)"
            if cifar
            else "model=resnet18 / resnet50 (the torchvision stem)"
        )
        return Layout(
            "solo_learn_resnet", "solo-learn ResNet (backbone.* + classifier)", fits, "backbone."
        )
    return None


def _block(key: str, layer: int) -> re.Match | None:
    return re.match(rf"^backbone\.layer{layer}\.(\d+)\.", key)


def check_model(layout: Layout | None, model: nn.Module) -> list[str]:
    """Refuse a model that would take the weights but compute something else; return notes
    for differences that are a choice (FEAT's max embedding in a GAP Conv-4)."""
    if layout is None:
        return []
    if layout.name == "solo_learn_resnet":
        conv1 = getattr(model, "conv1", None)
        if isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.padding != (2, 2):
            raise FamBenchError(
                "This is a solo-learn CIFAR ResNet checkpoint (backbone.* keys with a 3x3 "
                "conv1 and solo-learn's online classifier beside it). solo-learn pads that "
                f"conv1 by 2; this model pads it by {conv1.padding[0]}, so the weights would load "
                "and compute a shifted stem. Build the model with stem_padding=2, e.g. "
                "model=resnet18_cifar +model.options.stem_padding=2 (or "
                "+model.kwargs.stem_padding=2 with model=custom)."
            )
    if layout.name == "feat_convnet":
        if not isinstance(model, Conv4GlobalMax):
            return [
                "FEAT's ConvNet embeds by a global max over the last map; this model averages "
                "it (GAP). For FEAT's own embedding use model=custom "
                "model.target=experiments.models.Conv4GlobalMax."
            ]
    return []
