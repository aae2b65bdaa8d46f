"""Embedding networks for the suite and the ``build_model`` factory.

Every model's ``forward`` returns the embedding ``(N, D)`` the task compares (no
training-only head), names its ``default_target_layer`` (the last convolutional block) and
its embedding ``pooling`` (``"gap"`` or ``"flatten"``).

| name | module | target layer | embedding (default) | options |
|---|---|---|---|---|
| conv4 | Conv4 | encoder.3 | GAP, D = 64 | hidden, pools, pooling |
| resnet12 | ResNet12 | layer4 | GAP, D = 640 | channels, pools, pooling |
| resnet18 | ResNetEncoder | layer4 | GAP, D = 512 | cifar_stem, pooling |
| resnet50 | ResNetEncoder | layer4 | GAP, D = 2048 | cifar_stem, pooling |
| any | Hydra _target_ | its own or the option | its own | the target's kwargs |
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from experiments.models.conv4 import Conv4
from experiments.models.resnet import ResNetEncoder
from experiments.models.resnet12 import ResNet12
from experiments.plain import to_plain
from fam.errors import FamBenchError

__all__ = ["MODELS", "Conv4", "ResNet12", "ResNetEncoder", "build_model"]

MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "conv4": (Conv4, {}),
    "resnet12": (ResNet12, {}),
    "resnet18": (ResNetEncoder, {"arch": "resnet18"}),
    "resnet50": (ResNetEncoder, {"arch": "resnet50"}),
}


def build_model(name: str, **options: Any) -> nn.Module:
    """Build an embedding network by name, or any module from a Hydra ``_target_``.

    ``build_model("conv4", pools=[True, True, False, False])``;
    ``build_model("resnet18", cifar_stem=True)``;
    ``build_model("mine", _target_="pkg.Net", width=32, default_target_layer="body.5")``.

    For a ``_target_`` module, ``default_target_layer`` and ``pooling`` given here (and not
    taken by its constructor) are set on the built module as labels. The returned module
    carries ``model_name`` (used in cache names).
    """
    options = {k: to_plain(v) for k, v in options.items()}
    if "_target_" in options:
        return _build_target(name, options)
    if name not in MODELS:
        raise FamBenchError(
            f"Unknown model {name!r}. Use one of {sorted(MODELS)} or give a Hydra "
            "`_target_` (a dotted path to an nn.Module class) with its keyword arguments."
        )
    cls, fixed = MODELS[name]
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in fixed
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FamBenchError(
            f"Model {name!r} does not take option(s) {unknown}; it accepts {accepted}."
        )
    try:
        model = cls(**fixed, **options)
    except ValueError as err:
        raise FamBenchError(f"Model {name!r}: {err}") from err
    model.model_name = name
    return model


def _build_target(name: str, options: dict[str, Any]) -> nn.Module:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    taken = _constructor_args(options["_target_"])
    labels = {
        k: options.pop(k)
        for k in ("default_target_layer", "pooling")
        if k in options and k not in taken
    }
    try:
        model = instantiate(options)
    except InstantiationException as err:
        raise FamBenchError(f"Model {name!r}: building _target_ failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise FamBenchError(
            f"Model {name!r}: _target_ {options['_target_']!r} built a "
            f"{type(model).__name__}, not a torch.nn.Module."
        )
    for attr, value in labels.items():
        setattr(model, attr, value)
    model.model_name = name
    return model


def _constructor_args(target: str) -> set[str]:
    from hydra.utils import get_class

    try:
        return set(inspect.signature(get_class(target).__init__).parameters)
    except (ImportError, ValueError, TypeError) as err:
        raise FamBenchError(
            f"Cannot import model _target_ {target!r} ({err}); give a dotted path to an "
            "nn.Module class importable from the run's Python path."
        ) from err
