"""Checkpoint cache (canonical keys, atomic writes) and the loader of every checkpoint format.

:func:`load_weights` reads, always without running pickled code:

- plain state_dicts (``.pt`` / ``.pth``) and Lightning ``.ckpt`` files with
  ``torch.load(weights_only=True)``; OmegaConf objects in a Lightning checkpoint's
  ``hyper_parameters`` (solo-learn and any Hydra project store their config there) are
  allowed by name (:data:`OMEGACONF_GLOBALS`, plain data containers). Any other object
  (a ``pathlib.Path`` or ``argparse.Namespace`` among the hyper-parameters) is never
  built: the same weights_only unpickler reads it as an inert :class:`Unreadable`, the
  state_dict is used and a note names the entries not read; a file that is such an
  object as a whole (a pickled model) is refused;
- ``.safetensors`` files (``safetensors.torch.load_file``, no pickle at all).

The state_dict is found in the file (``key``, else the first of :data:`NESTED_KEYS` that
holds one, e.g. FEAT's ``params`` or Lightning's ``state_dict``), the prefix that holds the
model (``prefix``, else the one whose keys fit the model best: ``module.``, ``model.``,
``encoder.``, ``backbone.``, ``encoder.encoder.``, ...) is stripped, and foreign key names
are mapped onto the suite's (:mod:`experiments.models.layouts`: FEAT, easyfsl, solo-learn).
Everything outside the prefix (heads, projectors, optimiser state) is dropped and reported.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.atomic import atomic_write
from experiments.plain import to_plain
from fam.errors import FamBenchError

log = logging.getLogger(__name__)

#: where state_dicts sit inside checkpoint files, tried in this order (nested ones too)
NESTED_KEYS = ("state_dict", "params", "model", "model_state_dict", "net", "network")
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


def _omegaconf_globals() -> list[Any]:
    from omegaconf import DictConfig, ListConfig, base, nodes

    node_types = [
        getattr(nodes, n)
        for n in (
            "AnyNode",
            "StringNode",
            "IntegerNode",
            "FloatNode",
            "BooleanNode",
            "BytesNode",
            "PathNode",
            "InterpolationResultNode",
        )
        if hasattr(nodes, n)
    ]
    containers = [collections.defaultdict, dict, list, tuple, set, int, float, bool, str]
    return [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, typing.Any] + (
        node_types + containers
    )


#: classes a Lightning ``hyper_parameters`` entry may hold besides plain data: OmegaConf's
#: containers and nodes (data only, no code runs when they are rebuilt)
OMEGACONF_GLOBALS = _omegaconf_globals()


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The content of a checkpoint file, read without running pickled code (module doc)."""
    path = Path(path)
    what = _not_a_checkpoint(path)
    if what is not None:
        raise FamBenchError(
            f"Checkpoint {path} {what}. Give the path of a saved state_dict, a Lightning "
            "checkpoint or a .safetensors file, or leave the checkpoint unset to train."
        )
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise FamBenchError(
                f"Checkpoint {path} is not a readable safetensors file: {err}."
            ) from err
    try:
        with torch.serialization.safe_globals(OMEGACONF_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: all mean "not loadable"
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if unsupported:
            payload = _read_around_objects(path)
            if payload is not None:
                return payload
        why = (
            f"it holds a pickled {unsupported.group(1)} object, which weights_only loading "
            "refuses (it could run code). Save the weights alone, e.g. "
            "torch.save(model.state_dict(), path), or as .safetensors"
            if unsupported
            else _torch_reason(err)
        )
        raise FamBenchError(
            f"Checkpoint {path} could not be read with torch.load(weights_only=True): {why}."
        ) from err


class Unreadable:
    """What an object the safe loader refuses (a ``pathlib.Path`` or ``argparse.Namespace``
    in Lightning's ``hyper_parameters``, a user's class) is read as: an inert stand-in that
    keeps only the refused global's name. Its class's code never runs: the weights_only
    unpickler builds this in its place and hands it the object's arguments, which are
    dropped."""

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unread {self.global_name}>"


def _read_around_objects(path: Path) -> Any:
    """The checkpoint with every refused global read as an :class:`Unreadable` (still the
    weights_only unpickler: only plain data and tensors are built), or ``None`` when the
    file as a whole is such an object (a pickled model, not a state_dict)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type("Unreadable", (Unreadable,), {"global_name": n}), n) for n in names]
    with torch.serialization.safe_globals([*OMEGACONF_GLOBALS, *stand_ins]):
        payload = torch.load(path, map_location="cpu", weights_only=True)
    return None if isinstance(payload, Unreadable) else payload


def unread_entries(payload: Any, where: str = "", depth: int = 6) -> dict[str, str]:
    """``{dotted entry: refused global}`` of the :class:`Unreadable` stand-ins in a
    checkpoint's content (mappings and lists, ``depth`` levels down)."""
    if isinstance(payload, Unreadable):
        return {where or "<top>": payload.global_name}
    found: dict[str, str] = {}
    if depth and isinstance(payload, Mapping):
        items = payload.items()
    elif depth and isinstance(payload, list | tuple):
        items = enumerate(payload)
    else:
        return found
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            found.update(unread_entries(value, f"{where}.{key}" if where else str(key), depth - 1))
    return found


#: how every file ``torch.save`` writes begins: a zip archive, or (legacy) a pickle
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when it cannot be a checkpoint at all, else ``None``."""
    if path.is_dir():
        return "is a folder, not a file (give the weights file inside it)"
    if not path.exists():
        return "does not exist"
    size = path.stat().st_size
    if size == 0:
        return "is an empty file (0 bytes): its writing was interrupted or it was never written"
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return None
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith(_TORCH_MAGIC):
        return (
            f"is not a torch file ({size} bytes, beginning {head!r}: neither the zip archive "
            "torch.save writes nor a pickle nor safetensors)"
        )
    return None


def _torch_reason(err: BaseException) -> str:
    """torch.load's complaint in one line, without its advice to load with
    ``weights_only=False`` (which would run any code the file holds)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [
        line
        for line in lines
        if "weights_only" not in line
        and "Weights only load failed" not in line
        and not line.startswith(("(1)", "(2)", "Please file", "Check the documentation"))
    ]
    detail = lines[0].removeprefix("WeightsUnpickler error: ") if lines else ""
    return f"it is damaged or truncated ({type(err).__name__}{': ' + detail if detail else ''})"


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    # 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def find_state_dict(
    payload: Any, key: str | None, path: Path
) -> tuple[str | None, dict[str, torch.Tensor]]:
    """``(where, state_dict)``: ``payload[key]`` (dotted for nesting), the payload itself, or
    the first :data:`NESTED_KEYS` entry (searched two levels deep) that is a state_dict."""
    if key:
        node = payload
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                top = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
                raise FamBenchError(
                    f"Checkpoint {path} has no entry {key!r} (model.checkpoint_key); its "
                    f"top-level entries are {top}."
                )
            node = node[part]
        if not _is_state_dict(node):
            raise FamBenchError(
                f"Checkpoint {path}: entry {key!r} is not a state_dict (name -> tensor)."
            )
        return key, dict(node)
    if _is_state_dict(payload):
        return None, dict(payload)
    frontier: list[tuple[str, Any]] = [("", payload)]
    for _ in range(2):
        deeper = []
        for where, node in frontier:
            if not isinstance(node, Mapping):
                continue
            for name in NESTED_KEYS:
                if name in node:
                    found = f"{where}{name}"
                    if _is_state_dict(node[name]):
                        return found, dict(node[name])
                    deeper.append((found + ".", node[name]))
        frontier = deeper
    top = sorted(map(str, payload)) if isinstance(payload, Mapping) else type(payload).__name__
    raise FamBenchError(
        f"Checkpoint {path} holds no state_dict (name -> tensor) at its top level or under "
        f"{list(NESTED_KEYS)}; its top-level entries are {top}. Name the entry with "
        "model.checkpoint_key=<key> (dotted for nested entries)."
    )


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
    from experiments.models.layouts import RENAMES

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
    from experiments.models.layouts import RENAMES, check_model, identify

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
