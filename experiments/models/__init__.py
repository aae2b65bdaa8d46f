"""Embedding networks for the suite: ``build_model`` by name, ``build_model_from_config``.

Every model's ``forward`` returns the embedding ``(N, D)`` the task compares (no
training-only head), names its ``default_target_layer`` (the last convolutional block) and
its embedding ``pooling`` (``"gap"`` or ``"flatten"``).

| name | module | target layer | embedding (default) | options |
|---|---|---|---|---|
| conv4 | Conv4 | encoder.3 | GAP, D = 64 | hidden, pools, pooling |
| resnet12 | ResNet12 | layer4 | GAP, D = 640 | channels, pools, pooling |
| resnet18 | ResNetEncoder | layer4 | GAP, D = 512 | cifar_stem, stem_padding, pooling |
| resnet50 | ResNetEncoder | layer4 | GAP, D = 2048 | cifar_stem, stem_padding, pooling |
| custom | ``model.target`` | its own / last conv child | its own | ``model.kwargs`` |

Model configs (``conf/model/*.yaml``), the keys :func:`build_model_from_config` accepts:

- built-in: ``name`` (a key of :data:`MODELS`), ``options`` (the model's keyword
  arguments), ``checkpoint``, ``checkpoint_key``, ``checkpoint_prefix``, ``target_layer``,
  ``input_size``;
- custom (``conf/model/custom.yaml``): ``target`` (dotted path to a class or factory
  function), ``kwargs``, ``strip_head`` (``auto``/``true``/``false``, default ``auto``:
  :mod:`experiments.models.custom`), ``checkpoint``, ``checkpoint_key``,
  ``checkpoint_prefix``, ``target_layer``, ``input_size`` (probe size, by default
  ``data.image_size``), ``reshape`` (dotted path of a callable that reads a token layer
  as ``(N, K, h, w)``, :mod:`fam.tokens`) and ``name`` (the label, by default the target
  path).

Anything else is an error, so a typo or a Hydra-style ``model._target_`` never leaves the
built-in model running in place of the one meant.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from evaluation.plain import plain_container
from experiments.config import MISSING_TARGET
from experiments.models.conv4 import Conv4
from experiments.models.custom import STRIP_CHOICES, build_custom, locate, probe_embedding
from experiments.models.resnet import ResNetEncoder
from experiments.models.resnet12 import ResNet12
from experiments.models.variants import Conv4GlobalMax
from fam.errors import FamBenchError

__all__ = [
    "MODELS",
    "Conv4",
    "Conv4GlobalMax",
    "ResNet12",
    "ResNetEncoder",
    "build_model",
    "build_model_from_config",
]

MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "conv4": (Conv4, {}),
    "resnet12": (ResNet12, {}),
    "resnet18": (ResNetEncoder, {"arch": "resnet18"}),
    "resnet50": (ResNetEncoder, {"arch": "resnet50"}),
}

#: keys shared by every model config (what the pipeline reads besides building)
COMMON_KEYS = ("name", "checkpoint", "checkpoint_key", "checkpoint_prefix", "target_layer")
BUILTIN_KEYS = (*COMMON_KEYS, "options", "input_size")
CUSTOM_KEYS = (*COMMON_KEYS, "target", "kwargs", "strip_head", "input_size", "reshape")


def build_model_from_config(
    model_cfg: Mapping[str, Any],
    *,
    class_counts: Mapping[int, str] | None = None,
    checkpoint_state: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """Build the model a ``model`` config names: ``(module, label)``.

    ``class_counts`` and ``checkpoint_state`` (the checkpoint's named class counts and its
    state_dict) decide ``strip_head=auto`` for a custom model.

    ``label`` is the config ``name`` for a built-in model (``"conv4"``) and the target path
    for a custom one (``"torchvision.models.resnet50"``); the module carries it as
    ``model_name`` (cache file names). The checkpoint is not loaded here
    (``experiments.training.load_weights``). Raises :class:`FamBenchError` for unknown
    keys, an unknown name, an unimportable or non-callable target, kwargs that do not fit,
    or a forward that does not return ``(N, D)`` on a probe batch (``input_size``).
    """
    cfg = plain_container(model_cfg)
    if not isinstance(cfg, Mapping):
        raise FamBenchError(f"The model config must be a mapping, got {type(cfg).__name__}.")
    cfg = dict(cfg)
    if "_target_" in cfg:
        raise FamBenchError(
            f"model._target_={cfg['_target_']!r} is not a model key: build your own model "
            f"with model=custom model.target={cfg['_target_']} (its keyword arguments under "
            "model.kwargs.<name>=...)."
        )
    input_size = cfg.get("input_size")
    if "target" in cfg:
        _check_keys(cfg, CUSTOM_KEYS, "model=custom")
        target = cfg["target"]
        if not target:
            raise FamBenchError(MISSING_TARGET)
        strip = str(cfg.get("strip_head", "auto")).lower()
        if strip not in STRIP_CHOICES:
            raise FamBenchError(
                f"model.strip_head must be one of {list(STRIP_CHOICES)}, got {strip!r}."
            )
        model = build_custom(
            str(target),
            cfg.get("kwargs") or {},
            strip_head=strip,
            target_layer=cfg.get("target_layer"),
            input_size=input_size,
            class_counts=class_counts,
            checkpoint_state=checkpoint_state,
            reshape=cfg.get("reshape"),
        )
        label = str(target)
        if cfg.get("target_layer") is None and getattr(model, "default_target_layer", None) is None:
            raise FamBenchError(
                f"{target} has no convolutional child to explain by default; set "
                "model.target_layer=<dotted module name> (see model.named_modules())."
            )
    else:
        _check_keys(cfg, BUILTIN_KEYS, f"model {cfg.get('name')!r}")
        label = str(cfg.get("name"))
        model = build_model(label, **(cfg.get("options") or {}))
        if input_size is not None:
            probe_embedding(model, int(input_size), label)
    model.model_name = label
    return model, label


def _check_keys(cfg: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise FamBenchError(
            f"The config of {what} has unknown key(s) {unknown}; it accepts {list(allowed)}. "
            "For your own model use model=custom model.target=<dotted path>."
        )


def build_model(name: str, **options: Any) -> nn.Module:
    """Build a built-in embedding network by name, or any module from a Hydra ``_target_``.

    ``build_model("conv4", pools=[True, True, False, False])``;
    ``build_model("resnet18", cifar_stem=True)``;
    ``build_model("mine", _target_="pkg.Net", width=32, default_target_layer="body.5")``.

    For a ``_target_`` module, ``default_target_layer`` and ``pooling`` given here (and not
    taken by its constructor) are set on the built module as labels; nothing is stripped
    (:func:`build_model_from_config` with ``target`` is the config route). The returned
    module carries ``model_name`` (used in cache names).
    """
    options = {k: plain_container(v) for k, v in options.items()}
    if "_target_" in options:
        return _build_target(name, options)
    if name not in MODELS:
        raise FamBenchError(
            f"Unknown model {name!r}. Use one of {sorted(MODELS)}, or model=custom "
            "model.target=<dotted path to a class or factory function> for any other."
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
    target = options.pop("_target_")
    try:
        taken = set(inspect.signature(locate(target)).parameters)
    except (TypeError, ValueError):
        taken = set()
    labels = {
        k: options.pop(k)
        for k in ("default_target_layer", "pooling")
        if k in options and k not in taken
    }
    model = build_custom(target, options, strip_head="false")
    for attr, value in labels.items():
        setattr(model, attr, value)
    model.model_name = name
    return model
