"""Any model by a dotted path: ``model=custom model.target=<class or factory function>``.

:func:`build_custom` imports the target (a class such as ``mypkg.nets.SmallNet``, or a
factory function such as ``torchvision.models.resnet50`` or ``timm.create_model``), calls it
with ``kwargs`` and checks what came back. It builds exactly that model or raises
:class:`FamBenchError`; it never falls back to another model. Then:

- ``strip_head`` (``auto``, ``true`` or ``false``): a classifier head named ``fc``,
  ``head`` or ``classifier`` (a ``Linear``, or a ``Sequential`` of
  ``Linear``/``Dropout``/activation layers; one level down too, e.g. timm's ``head.fc``)
  may be replaced by ``nn.Identity``, so the network returns the feature the head reads.
  ``auto`` (the default) strips a head only when its output size (the checkpoint's head
  weight when a checkpoint holds one, else the module's) equals a class count that is
  named: by the checkpoint (an integer ``num_classes`` / ``n_classes`` / ``nb_classes`` /
  ``num_labels`` among its non-tensor entries, e.g. Lightning's ``hyper_parameters``) or
  by the model's code when the user left it (a ``num_classes`` attribute, as timm sets
  it, or the default of a ``num_classes`` argument, as torchvision's ResNet has 1000). A
  ``num_classes`` the user passes in ``model.kwargs`` names no classes here: many
  metric-learning models set the size of their embedding layer ``fc`` that way. Any
  other head is explained as it is (an embedding layer named ``fc`` stays in place).
  ``true`` strips every such head, ``false`` none. Each strip is a warning
  (:attr:`HeadStrip.warning`, in the run's ``warnings.json``) naming the layer and the
  dimensions before and after; the stripped names go into ``checkpoint_ignore``, so a
  checkpoint's head entries are dropped on load.
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fam.errors import FamBenchError
from fam.tokens import token_default_layer

log = logging.getLogger(__name__)

HEAD_NAMES = ("fc", "head", "classifier")
#: argument / hyper-parameter names that state a number of classes
CLASS_COUNT_KEYS = ("num_classes", "n_classes", "nb_classes", "num_labels")
STRIP_CHOICES = ("auto", "true", "false")
_HEAD_PARTS = (nn.Linear, nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Flatten)
PROBE_BATCH = 2


def locate(target: str, key: str = "model.target") -> Any:
    """The object at dotted path ``target`` (``pkg.module.Name`` or ``pkg.module.Cls.create``);
    ``key`` is the setting named in errors."""
    if not isinstance(target, str) or not target.strip() or target.startswith("."):
        raise FamBenchError(
            f"{key} must be a dotted path such as 'torchvision.models.resnet50' or "
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
                    f"Cannot import {key} {target!r}: importing {name!r} failed "
                    f"({err}). Install the missing package in the run's environment."
                ) from err
            error = err
            continue
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise FamBenchError(
                    f"Cannot import {key} {target!r}: {name!r} has no attribute "
                    f"{attr!r}. Check the spelling; the path must name a class or a function."
                )
            obj = getattr(obj, attr)
        return obj
    raise FamBenchError(
        f"Cannot import {key} {target!r} ({error}). Give a dotted path to a class or "
        "factory function importable from the run's Python path (install your package, or "
        "put its folder on PYTHONPATH)."
    )


def _reshape_callable(path: str) -> Any:
    fn = locate(str(path), "model.reshape")
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


def classifier_heads(model: nn.Module) -> list[str]:
    """Dotted names of the head-shaped children (``fc`` / ``head`` / ``classifier``, or one
    level down in such a module, e.g. timm's ``head.fc``): candidates, not verdicts."""
    found = []
    for name in HEAD_NAMES:
        child = getattr(model, name, None)
        if not isinstance(child, nn.Module):
            continue
        if _is_head(child):
            found.append(name)
            continue
        for inner in HEAD_NAMES:
            grandchild = getattr(child, inner, None)
            if isinstance(grandchild, nn.Module) and _is_head(grandchild):
                found.append(f"{name}.{inner}")
    return found


def _replace(model: nn.Module, name: str) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())


def _linears(head: nn.Module) -> tuple[str, nn.Linear, nn.Linear] | None:
    """``(name of the last Linear inside head, first Linear, last Linear)``; ``None`` for an
    identity head."""
    named = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not named:
        return None
    return named[-1][0], named[0][1], named[-1][1]


@dataclass(frozen=True)
class HeadStrip:
    """A head replaced by identity: ``layer``, the model's output size ``before`` and the
    embedding size ``after`` (the head's input), and ``why`` (the class count's source)."""

    target: str
    layer: str
    before: int
    after: int
    why: str

    @property
    def warning(self) -> dict[str, Any]:
        """The ``warnings.json`` entry (code ``head_stripped``)."""
        return {
            "code": "head_stripped",
            "layer": self.layer,
            "before": self.before,
            "after": self.after,
            "message": (
                f"{self.target}: its {self.layer} ({self.after} -> {self.before}) was replaced "
                f"by identity ({self.why}), so the explained embedding is the {self.after}-d "
                f"input of {self.layer}, not the model's {self.before}-d output. If "
                f"{self.layer} is your embedding, set model.strip_head=false."
            ),
        }


def named_class_counts(payload: Any, depth: int = 4) -> dict[int, str]:
    """Class counts a checkpoint names: integer ``num_classes`` / ``n_classes`` /
    ``nb_classes`` / ``num_labels`` entries among its non-tensor entries (Lightning's
    ``hyper_parameters``, an ``args`` dict), ``{count: "where"}``."""
    found: dict[int, str] = {}

    def walk(node: Any, where: str, level: int) -> None:
        if level > depth or not isinstance(node, Mapping):
            return
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key in CLASS_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                found.setdefault(value, f"the checkpoint's {path} = {value}")
            elif not isinstance(value, torch.Tensor):
                walk(value, path, level + 1)

    walk(payload, "", 0)
    return found


def _model_class_counts(factory: Any, kwargs: Mapping[str, Any], model: nn.Module) -> dict:
    """Class counts the model's code names when the user passed none in ``kwargs``: a
    ``num_classes`` attribute (timm) or the default of a ``num_classes`` argument of the
    factory or of the module's class (torchvision's ResNet: 1000)."""
    if any(k in kwargs for k in CLASS_COUNT_KEYS):
        return {}
    found: dict[int, str] = {}
    attribute = getattr(model, "num_classes", None)
    if isinstance(attribute, int) and not isinstance(attribute, bool):
        found[attribute] = f"the model's num_classes = {attribute}"
    for owner in (factory, type(model)):
        try:
            parameters = inspect.signature(owner).parameters
        except (TypeError, ValueError):
            continue
        for key in CLASS_COUNT_KEYS:
            default = parameters[key].default if key in parameters else None
            if isinstance(default, int) and not isinstance(default, bool):
                name = getattr(owner, "__qualname__", str(owner))
                found.setdefault(default, f"{default} is the default {key} of {name}")
    return found


def strip_heads(
    model: nn.Module,
    target: str,
    mode: str,
    counts: Mapping[int, str],
    checkpoint_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[HeadStrip], list[str]]:
    """Apply ``strip_head`` (module docstring): ``(strips, notes on heads kept)``; an
    identity head counts as a strip of size 0 under ``true`` (its checkpoint entries go).

    ``counts``: named class counts ``{count: source}``; ``checkpoint_state``: the
    checkpoint's state_dict, whose head weight (found by key suffix) gives the head's
    output size in place of the module's."""
    strips, kept = [], []
    if mode == "false":
        return strips, kept
    for name in classifier_heads(model):
        linears = _linears(model.get_submodule(name))
        if linears is None:  # already an identity: nothing to strip
            if mode == "true":
                strips.append(HeadStrip(target, name, 0, 0, "model.strip_head=true"))
            continue
        inner, first, last = linears
        before, after = last.out_features, first.in_features
        weight = ".".join(p for p in (name, inner, "weight") if p)
        stored = _stored_rows(checkpoint_state, weight, model, name)
        source = "the checkpoint's"
        if stored is None:
            stored, source = before, "its"
        if mode == "true":
            why = "model.strip_head=true"
        elif stored in counts:
            why = f"strip_head=auto: {source} {stored} outputs are classes, {counts[stored]}"
        else:
            kept.append(
                f"{target}: {name} ({after} -> {stored}) is explained as part of the "
                f"embedding: {stored} is no class count the checkpoint or the model names "
                "(model.strip_head=true strips it)."
            )
            continue
        strips.append(HeadStrip(target, name, stored, after, why))
    for strip in strips:
        _replace(model, strip.layer)
    return strips, kept


def _stored_rows(
    state: Mapping[str, torch.Tensor] | None, weight: str, model: nn.Module, head: str
) -> int | None:
    """Output size of the head's ``weight`` in the checkpoint: under a key prefix that also
    holds the rest of the model (so an ``fc`` inside a block is never taken for it)."""
    if not state:
        return None
    anchor = next((k for k in model.state_dict() if not k.startswith(head + ".")), None)
    for key in sorted((k for k in state if k == weight or k.endswith("." + weight)), key=len):
        prefix = key[: -len(weight)]
        if (anchor is None or prefix + anchor in state) and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


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
    strip_head: str = "auto",
    target_layer: str | None = None,
    input_size: int | None = None,
    class_counts: Mapping[int, str] | None = None,
    checkpoint_state: Mapping[str, torch.Tensor] | None = None,
    reshape: str | None = None,
) -> nn.Module:
    """Build ``target(**kwargs)`` as an embedding network (module docstring).

    Args:
        target: dotted path to an ``nn.Module`` class or a function returning one.
        kwargs: keyword arguments of the call.
        strip_head: ``"auto"``, ``"true"`` or ``"false"`` (module docstring); the strips
            are ``model.head_strips`` (:class:`HeadStrip`), heads kept ``model.head_notes``.
        target_layer: the explained layer; checked to exist (``None``: the module's
            ``default_target_layer`` or the last convolutional child).
        input_size: side of the probe images; ``None`` skips the probe.
        class_counts: class counts the checkpoint names (:func:`named_class_counts`).
        checkpoint_state: the checkpoint's state_dict (its head shapes decide ``auto``).
        reshape: dotted path of a callable ``(layer output) -> (N, K, h, w)`` for a target
            layer the suite cannot read by itself (:mod:`fam.tokens`); set on the model as
            ``reshape_transform``.

    Raises:
        FamBenchError: the target cannot be imported, is not callable, the kwargs do not fit
            it, the call raises (quoted with its type), it does not return an ``nn.Module``,
            or the module does not map
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
    except Exception as err:  # the user's code (a download offline, a bad kwarg): quoted
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FamBenchError(
            f"Building {target}(**{kwargs}) failed with {type(err).__name__}: {first}. This "
            "is the model's own error: check model.kwargs (pretrained weights need the "
            "network, or a local checkpoint: model.checkpoint=<file>)."
        ) from err
    if not isinstance(model, nn.Module):
        raise FamBenchError(
            f"model.target {target!r} built a {type(model).__name__}, not a torch.nn.Module."
        )
    counts = {**_model_class_counts(factory, kwargs, model), **dict(class_counts or {})}
    strips, kept = strip_heads(model, target, strip_head, counts, checkpoint_state)
    if strips:
        ignore = tuple(getattr(model, "checkpoint_ignore", ()))
        model.checkpoint_ignore = ignore + tuple(f"{s.layer}." for s in strips)
    model.head_strips = [s for s in strips if s.before]
    model.head_notes = kept
    for strip in model.head_strips:
        log.warning("WARNING: %s", strip.warning["message"])
    for note in kept:
        log.info(note)
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
