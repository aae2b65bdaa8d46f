"""Any model by a dotted path: ``model=custom model.target=<class or factory function>``.

:func:`build_custom` imports the target (a class such as ``mypkg.nets.SmallNet``, or a
factory function such as ``torchvision.models.resnet50`` or ``timm.create_model``), calls it
with ``kwargs`` and checks what came back. It builds exactly that model or raises
:class:`FamBenchError`; it never falls back to another model. Then:

- ``strip_head`` (default): a classifier head named ``fc``, ``head`` or ``classifier`` (a
  ``Linear``, or a ``Sequential`` of ``Linear``/``Dropout``/activation layers; one level
  down too, e.g. timm's ``head.fc``) is replaced by ``nn.Identity``, so the network returns
  its pooled feature, the embedding FAM's closed form explains. The stripped names go into
  ``checkpoint_ignore``, so a checkpoint's head entries are dropped on load.
- ``default_target_layer``: kept when the module names one; for a ViT (``patch_embed`` and
  ``blocks``) its last block (:func:`fam.tokens.token_default_layer`); otherwise the last
  top-level child that holds a convolution (``layer4`` of a torchvision or timm ResNet,
  ``features`` of a VGG/DenseNet/MobileNet). ``model.target_layer`` overrides it.
- ``reshape``: a dotted path to a callable that turns the target layer's output into a
  feature map ``(N, K, h, w)``, for token layouts the suite does not read by itself.
- a probe: two images ``(2, 3, S, S)`` go through the network in eval mode (its own seeded
  generator, so the global RNG is untouched) and the output must be a tensor ``(2, D)``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fam.errors import FamBenchError
from fam.tokens import token_default_layer

log = logging.getLogger(__name__)

HEAD_NAMES = ("fc", "head", "classifier")
_HEAD_PARTS = (nn.Linear, nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Flatten)
PROBE_BATCH = 2


def locate(target: str) -> Any:
    """The object at dotted path ``target`` (``pkg.module.Name`` or ``pkg.module.Cls.create``)."""
    if not isinstance(target, str) or not target.strip() or target.startswith("."):
        raise FamBenchError(
            f"model.target must be a dotted path such as 'torchvision.models.resnet50' or "
            f"'mypkg.nets.SmallNet', got {target!r}."
        )
    parts = target.split(".")
    module, error = None, None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # only "this very module is missing" moves on to a shorter path; a missing
            # import *inside* the user's module is their error and is reported as such
            if err.name is not None and not (name == err.name or name.startswith(err.name + ".")):
                raise FamBenchError(
                    f"Cannot import model.target {target!r}: importing {name!r} failed "
                    f"({err}). Install the missing package in the run's environment."
                ) from err
            error = err
            continue
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise FamBenchError(
                    f"Cannot import model.target {target!r}: {name!r} has no attribute "
                    f"{attr!r}. Check the spelling; the path must name a class or a function."
                )
            obj = getattr(obj, attr)
        return obj
    raise FamBenchError(
        f"Cannot import model.target {target!r} ({error}). Give a dotted path to a class or "
        "factory function importable from the run's Python path (install your package, or "
        "put its folder on PYTHONPATH)."
    )


def _reshape_callable(path: str) -> Any:
    fn = locate(str(path))
    if not callable(fn):
        raise FamBenchError(
            f"model.reshape={path!r} is a {type(fn).__name__}, not a callable "
            "(layer output) -> (N, K, h, w)."
        )
    return fn


def _check_kwargs(target: str, factory: Any, kwargs: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise FamBenchError(
            f"model.kwargs {sorted(kwargs)} do not fit {target}: {err}. It takes {accepted}; "
            "pass them as +model.kwargs.<name>=<value>."
        ) from err


def _is_head(module: nn.Module | None) -> bool:
    if isinstance(module, nn.Linear | nn.Identity):
        return True
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return all(isinstance(m, _HEAD_PARTS) for m in module) and any(
            isinstance(m, nn.Linear) for m in module
        )
    return False


def strip_classifier_head(model: nn.Module) -> list[str]:
    """Replace the classifier head (``fc`` / ``head`` / ``classifier``, or one level down
    in such a module) by ``nn.Identity``; return the dotted names replaced."""
    stripped = []
    for name in HEAD_NAMES:
        child = getattr(model, name, None)
        if not isinstance(child, nn.Module):
            continue
        if _is_head(child):
            setattr(model, name, nn.Identity())
            stripped.append(name)
            continue
        for inner in HEAD_NAMES:  # e.g. timm's head.fc inside a pooling head
            grandchild = getattr(child, inner, None)
            if isinstance(grandchild, nn.Module) and _is_head(grandchild):
                setattr(child, inner, nn.Identity())
                stripped.append(f"{name}.{inner}")
    return stripped


def last_conv_block(model: nn.Module) -> str | None:
    """The name of the last top-level child that holds a ``Conv2d`` (``None`` if none)."""
    found = None
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) or any(isinstance(m, nn.Conv2d) for m in child.modules()):
            found = name
    return found


def probe_embedding(model: nn.Module, input_size: int, label: str) -> int:
    """Run ``(2, 3, S, S)`` through ``model`` in eval mode; return ``D`` of its ``(2, D)``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(PROBE_BATCH, 3, input_size, input_size, generator=generator)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(images.to(device))
    except Exception as err:  # any failure of the user's forward is a config mismatch here
        raise FamBenchError(
            f"Model {label}: its forward failed on a probe batch (2, 3, {input_size}, "
            f"{input_size}): {type(err).__name__}: {err}. Check model.kwargs and the input "
            "size (model.input_size, by default data.image_size)."
        ) from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise FamBenchError(
            f"Model {label}: forward returned a {type(out).__name__}, not a tensor. The suite "
            "explains an embedding (N, D): wrap the model so that forward returns it."
        )
    if out.dim() != 2 or out.shape[0] != PROBE_BATCH:
        hint = (
            " It returns a feature map: add global pooling (for timm, num_classes=0 keeps "
            "timm's pooling)."
            if out.dim() == 4
            else ""
        )
        raise FamBenchError(
            f"Model {label}: forward returned shape {tuple(out.shape)} on a probe batch of "
            f"{PROBE_BATCH} images; the suite needs an embedding (N, D).{hint}"
        )
    return int(out.shape[1])


def build_custom(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    strip_head: bool = True,
    target_layer: str | None = None,
    input_size: int | None = None,
    reshape: str | None = None,
) -> nn.Module:
    """Build ``target(**kwargs)`` as an embedding network (module docstring).

    Args:
        target: dotted path to an ``nn.Module`` class or a function returning one.
        kwargs: keyword arguments of the call.
        strip_head: replace the classifier head by identity.
        target_layer: the explained layer; checked to exist (``None``: the module's
            ``default_target_layer`` or the last convolutional child).
        input_size: side of the probe images; ``None`` skips the probe.
        reshape: dotted path of a callable ``(layer output) -> (N, K, h, w)`` for a target
            layer the suite cannot read by itself (:mod:`fam.tokens`); set on the model as
            ``reshape_transform``.

    Raises:
        FamBenchError: the target cannot be imported, is not callable, the kwargs do not fit
            it, it does not return an ``nn.Module``, or the module does not map
            ``(N, 3, S, S)`` to ``(N, D)``.
    """
    kwargs = dict(kwargs or {})
    factory = locate(target)
    if not callable(factory):
        raise FamBenchError(
            f"model.target {target!r} is a {type(factory).__name__}, not a class or function."
        )
    _check_kwargs(target, factory, kwargs)
    try:
        model = factory(**kwargs)
    except TypeError as err:  # e.g. a factory that forwards **kwargs to a class
        raise FamBenchError(f"Building {target}(**{kwargs}) failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise FamBenchError(
            f"model.target {target!r} built a {type(model).__name__}, not a torch.nn.Module."
        )
    if strip_head:
        stripped = strip_classifier_head(model)
        if stripped:
            ignore = tuple(getattr(model, "checkpoint_ignore", ()))
            model.checkpoint_ignore = ignore + tuple(f"{n}." for n in stripped)
            log.info("%s: classifier head %s replaced by identity", target, stripped)
    names = dict(model.named_modules())
    if target_layer is not None and target_layer not in names:
        raise FamBenchError(
            f"model.target_layer={target_layer!r} is not a module of {target}; its top-level "
            f"modules are {[n for n, _ in model.named_children()]}."
        )
    if reshape is not None:
        model.reshape_transform = _reshape_callable(reshape)
    if getattr(model, "default_target_layer", None) is None:
        default = token_default_layer(model) or last_conv_block(model)
        if default is not None:
            model.default_target_layer = default
    if input_size is not None:
        model.embedding_dim = probe_embedding(model, int(input_size), target)
    return model
