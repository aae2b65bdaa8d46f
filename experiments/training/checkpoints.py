"""Checkpoint cache (canonical keys, atomic writes) and the loader of every checkpoint format.

:func:`load_weights` reads a file without running pickled code
(:mod:`experiments.training.checkpoint_files`: ``.pt`` / ``.pth``, Lightning ``.ckpt``
and ``.safetensors``; objects the safe loader does not build are named in a note). The
state_dict is found in the file (``key``, else the first of
:data:`~experiments.training.checkpoint_files.NESTED_KEYS` that holds one, e.g. FEAT's
``params`` or Lightning's ``state_dict``), the prefix that holds the
model (``prefix``, else the one whose keys fit the model best: ``module.``, ``model.``,
``encoder.``, ``backbone.``, ``encoder.encoder.``, ...) is stripped, and foreign key names
are mapped onto the suite's (:mod:`experiments.models.layouts`: FEAT, easyfsl, solo-learn).
Everything outside the prefix (heads, projectors, optimiser state) is dropped and reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.plain import short_hash
from experiments.atomic import atomic_write
from experiments.models.layouts import RENAMES, check_model, identify
from experiments.training.checkpoint_files import find_state_dict, read_checkpoint, unread_entries
from fam.errors import FamBenchError

log = logging.getLogger(__name__)

SHOWN = 6


def cache_path(
    cache_dir: str | os.PathLike, task: str, model: nn.Module, key: Mapping[str, Any]
) -> Path:
    """``cache_dir/<task>-<model>-<hash>.pt``; ``<model>`` is ``model.model_name`` (set by
    ``build_model``) or the class name, lower-cased."""
    name = str(getattr(model, "model_name", None) or type(model).__name__).lower()
    name = re.sub(r"[^a-z0-9_.]+", "_", name)
    return Path(cache_dir) / f"{task}-{name}-{short_hash(key, strict=True)}.pt"


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` (on CPU) to ``path`` atomically (tmp file + rename), so
    an interrupted or concurrent writer never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, partial(torch.save, state))
    return path


def weights_id(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of tensors by content: each name (sorted), dtype, shape and bytes. The same
    weights saved as ``.pth``, ``.ckpt`` or ``.safetensors``, under any key prefix, have
    one id; any changed value, dtype or shape gives another."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoadReport:
    """What :func:`load_weights` loaded.

    ``missing``: model entries the file lacked (only BatchNorm ``num_batches_tracked``
    counters may be missing; anything else is an error). ``unexpected``: file entries not
    loaded (outside the model's prefix, or classifier heads the model drops). ``layout``:
    the recognised foreign layout (``"feat_resnet12"``, ``"feat_convnet"``,
    ``"easyfsl_resnet"``, ``"solo_learn_resnet"``) or ``None``. ``notes``: warnings that
    were logged (e.g. FEAT's max embedding loaded into a GAP Conv-4). ``weights_id``:
    :func:`weights_id` of the tensors loaded (the same weights in any file format share it).
    """

    model: nn.Module = field(repr=False)
    path: Path
    key: str | None
    prefix: str
    layout: str | None
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weights_id: str = ""

    def summary(self) -> str:
        where = f"key {self.key!r}, " if self.key else ""
        layout = f"{self.layout} layout, " if self.layout else ""
        dropped = _shown(self.unexpected)
        return (
            f"Loaded {self.loaded} tensors from {self.path} ({layout}{where}prefix "
            f"{self.prefix!r}); {len(self.missing)} missing {_shown(self.missing)}; "
            f"{len(self.unexpected)} unexpected, not loaded {dropped}"
        )


def _shown(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{items[:SHOWN]}{more}"


def _candidate_prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    prefixes = {""}
    for k in state:
        parts = k.split(".")
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    return sorted(prefixes, key=lambda p: (len(p), p))


def _select(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    prefix: str | None,
) -> tuple[str, str]:
    """``(prefix, rename name)`` under which most checkpoint keys are model keys.

    Two prefixes that fit equally well and hold different weights (MoCo's
    ``encoder_q.``/``encoder_k.``, solo-learn's ``backbone.``/``momentum_backbone.``, a
    student and its teacher) are ambiguous: an error names them, never a silent pick."""
    prefixes = [prefix] if prefix is not None else _candidate_prefixes(state)
    best, best_hits = ("" if prefix is None else prefix, ""), -1
    tied: dict[str, dict[str, torch.Tensor]] = {}
    for candidate in prefixes:
        inside = [k for k in state if k.startswith(candidate)]
        for name, rename in RENAMES.items():
            mapped = {rename(k[len(candidate) :]): k for k in inside}
            hits = sum(k in expected for k in mapped)
            if hits > best_hits:
                best, best_hits, tied = (candidate, name), hits, {}
            if hits == best_hits and candidate not in tied:
                tied[candidate] = {m: state[k] for m, k in mapped.items() if m in expected}
    if prefix is None and best_hits > 0 and len(tied) > 1:
        first = tied[best[0]]
        if any(
            weights.keys() != first.keys()
            or any(not torch.equal(weights[k], first[k]) for k in first)
            for weights in tied.values()
        ):
            names = sorted(tied, key=lambda p: (len(p), p))
            copies = ("momentum", "encoder_k", "teacher", "target", "ema")
            online = [p for p in names if not any(c in p for c in copies)]
            raise FamBenchError(
                f"The checkpoint holds {len(names)} networks that fit the model equally well "
                f"(key prefixes {names[:6]}) with different weights, e.g. an encoder and its "
                "momentum copy or teacher. Name the one to explain with "
                f"model.checkpoint_prefix={(online or names)[0]} (load_weights(..., "
                "prefix=...)); for MoCo that is the query encoder (encoder_q.), for "
                "solo-learn backbone."
            )
    return best


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    key: str | None = None,
    prefix: str | None = None,
    payload: Any = None,
) -> LoadReport:
    """Load checkpoint ``path`` into ``model`` (module docstring for formats and layouts).

    Args:
        model: the network; its ``state_dict`` names are the target.
        path: ``.pt`` / ``.pth`` / ``.ckpt`` / ``.safetensors``.
        key: the entry of the file holding the state_dict (dotted for nesting;
            ``model.checkpoint_key``); ``None`` finds it.
        prefix: the key prefix holding the model (``model.checkpoint_prefix``, e.g.
            ``"backbone."``; ``""`` for none); ``None`` finds it.
        payload: the file's content when already read (:func:`read_checkpoint`).

    Returns:
        A :class:`LoadReport` (also logged): missing and unexpected keys, layout.

    Raises:
        FamBenchError: the file cannot be read safely, holds no state_dict, or does not fit
            the model (the message names the first missing/unexpected keys and shapes).
    """
    path = Path(path)
    if payload is None:
        payload = read_checkpoint(path)
    where, state = find_state_dict(payload, key, path)
    if prefix is not None and prefix and not prefix.endswith("."):
        prefix += "."
    expected = model.state_dict()
    layout = identify(state, where)
    chosen, rename_name = _select(state, expected, prefix)
    rename = RENAMES[rename_name]
    ignore = tuple(getattr(model, "checkpoint_ignore", ()))
    mapped, unexpected, stray = {}, [], []
    for k, value in state.items():
        if not k.startswith(chosen):
            unexpected.append(k)
            continue
        name = rename(k[len(chosen) :])
        if name in expected:
            mapped[name] = value
        elif ignore and name.startswith(ignore):
            unexpected.append(k)
        else:
            stray.append(name)
    missing = [k for k in expected if k not in mapped]
    _check_fit(mapped, stray, missing, expected, path, model, layout)
    notes = check_model(layout, model)
    unread = unread_entries(payload)
    if unread:
        shown = _shown([f"{k} ({v})" for k, v in unread.items()])
        notes.append(
            f"{path}: entries holding objects the safe loader does not build were not read "
            f"(their classes' code never runs): {shown}; the state_dict "
            f"{where or '(top level)'} was read as plain tensors."
        )
    model.load_state_dict(mapped, strict=False)
    report = LoadReport(
        model=model,
        path=path,
        key=where,
        prefix=chosen,
        layout=layout.name if layout else None,
        loaded=len(mapped),
        missing=missing,
        unexpected=sorted(unexpected),
        notes=notes,
        weights_id=weights_id(mapped),
    )
    log.info(report.summary())
    for note in notes:
        log.warning(note)
    return report


def _check_fit(
    state: Mapping[str, torch.Tensor],
    stray: list[str],
    missing: list[str],
    expected: Mapping[str, torch.Tensor],
    path: Path,
    model: nn.Module,
    layout: Any,
) -> None:
    # BatchNorm counters do not change the forward; checkpoints older than torch 0.4.1 lack them
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if not (missing or stray or shapes):
        return
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", stray),
        ("shape mismatches", shapes),
    ):
        if items:
            problems.append(f"{len(items)} {label}: {_shown(items)}")
    hint = (
        f" The file looks like a {layout.origin} checkpoint, which fits {layout.fits}."
        if layout is not None
        else ""
    )
    raise FamBenchError(
        f"Checkpoint {path} does not fit the model {type(model).__name__} "
        f"({getattr(model, 'model_name', 'custom')}): "
        + "; ".join(problems)
        + "."
        + hint
        + " Check that the model config (name, width, pools, cifar_stem, ...) matches the one "
        "the checkpoint was trained with; model.checkpoint_key / model.checkpoint_prefix "
        "choose the entry and prefix."
    )
