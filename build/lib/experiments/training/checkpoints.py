"""Checkpoint cache: canonical keys, atomic writes, strict ``weights_only`` loading."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.atomic import atomic_write
from experiments.plain import to_plain
from fam.errors import FamBenchError

# Lightning checkpoints hold the LightningModule's state_dict; the suite's task modules
# keep the explained network as ``self.model`` (heads live beside it and are dropped).
LIGHTNING_PREFIXES = ("model.", "backbone.", "encoder.", "net.")
SHOWN = 6


def key_hash(key: Mapping[str, Any]) -> str:
    """sha256[:16] of the canonical JSON of ``key`` (sorted keys, no whitespace).

    ``key`` must be plain JSON data (dicts, lists, strings, numbers, booleans, None);
    Hydra/OmegaConf configs inside it are converted (resolved) first.
    """
    try:
        text = json.dumps(
            key, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_omegaconf_to_plain
        )
    except (TypeError, ValueError) as err:
        raise FamBenchError(
            f"The checkpoint cache key must be plain JSON data (dicts, lists, str, numbers, "
            f"bool, None); {err}. Convert configs with OmegaConf.to_container(cfg, "
            "resolve=True)."
        ) from err
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _omegaconf_to_plain(value: Any) -> Any:
    plain = to_plain(value)  # a new object for OmegaConf configs, ``value`` otherwise
    if plain is not value:
        return plain
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON data")


def cache_path(
    cache_dir: str | os.PathLike, task: str, model: nn.Module, key: Mapping[str, Any]
) -> Path:
    """``cache_dir/<task>-<model>-<hash>.pt``; ``<model>`` is ``model.model_name`` (set by
    ``build_model``) or the class name, lower-cased."""
    name = str(getattr(model, "model_name", None) or type(model).__name__).lower()
    name = re.sub(r"[^a-z0-9_.]+", "_", name)
    return Path(cache_dir) / f"{task}-{name}-{key_hash(key)}.pt"


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` (on CPU) to ``path`` atomically (tmp file + rename), so
    an interrupted or concurrent writer never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, partial(torch.save, state))
    return path


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state_dict or a Lightning checkpoint into ``model`` strictly.

    Reads with ``torch.load(..., weights_only=True)``. A Lightning checkpoint's
    ``state_dict`` is reduced to the entries under the prefix that holds the model
    (``model.``, ``backbone.``, ...; found by matching the model's own keys), so training-
    only heads beside it are ignored. ``module.`` (DataParallel/DDP) prefixes are stripped,
    and entries the model declares in ``checkpoint_ignore`` (``fc.`` for torchvision
    ResNets) are dropped. Anything else that does not fit is a :class:`FamBenchError`
    naming the file and the keys/shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FamBenchError(
            f"Checkpoint {path} does not exist. Give the path of a saved state_dict or "
            "Lightning checkpoint (.pt/.ckpt), or leave the checkpoint unset to train."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: all mean "not loadable"
        raise FamBenchError(
            f"Checkpoint {path} could not be read with torch.load(weights_only=True): "
            f"{err}. It must be a state_dict or a Lightning checkpoint of plain tensors."
        ) from err
    state = _state_dict_of(payload, path)
    expected = model.state_dict()
    state = _strip_prefix(
        state, expected, lightning=isinstance(payload, Mapping) and "state_dict" in payload
    )
    ignore = tuple(getattr(model, "checkpoint_ignore", ()))
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    _check_fit(state, expected, path, model)
    model.load_state_dict(state, strict=True)
    return model


def _state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise FamBenchError(
            f"Checkpoint {path} is neither a state_dict (name -> tensor) nor a Lightning "
            "checkpoint with a 'state_dict' entry."
        )
    return dict(payload)


def _strip_prefix(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], lightning: bool
) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if not lightning or not expected:
        return state
    wanted = set(expected)
    best, best_hits = "", len(wanted & set(state))
    for prefix in LIGHTNING_PREFIXES:
        hits = sum(k.startswith(prefix) and k[len(prefix) :] in wanted for k in state)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return state
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def _check_fit(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path,
    model: nn.Module,
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            problems.append(f"{len(items)} {label}: {items[:SHOWN]}{more}")
    raise FamBenchError(
        f"Checkpoint {path} does not fit the model {type(model).__name__} "
        f"({getattr(model, 'model_name', 'custom')}): " + "; ".join(problems) + ". Check that "
        "the model config (name, width, pools, cifar_stem, ...) matches the one the checkpoint "
        "was trained with."
    )
