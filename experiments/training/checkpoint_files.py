"""Reading a checkpoint file safely, and finding the state_dict inside it.

:func:`read_checkpoint` reads, always without running pickled code:

- plain state_dicts (``.pt`` / ``.pth``) and Lightning ``.ckpt`` files with
  ``torch.load(weights_only=True)``; OmegaConf objects in a Lightning checkpoint's
  ``hyper_parameters`` (solo-learn and any Hydra project store their config there) are
  allowed by name (:data:`OMEGACONF_GLOBALS`, plain data containers). Any other object
  (a ``pathlib.Path`` or ``argparse.Namespace`` among the hyper-parameters) is never
  built: the same weights_only unpickler reads it as an inert :class:`Unreadable`, and
  :func:`unread_entries` names the entries not read; a file that is such an object as a
  whole (a pickled model) is refused;
- ``.safetensors`` files (``safetensors.torch.load_file``, no pickle at all).

:func:`find_state_dict` finds the state_dict in the content (``key``, else the first of
:data:`NESTED_KEYS` that holds one, e.g. FEAT's ``params`` or Lightning's
``state_dict``). Loading it into a model is :func:`experiments.training.checkpoints.load_weights`.
"""

from __future__ import annotations

import collections
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, base, nodes
from safetensors import SafetensorError
from safetensors.torch import load_file

from fam.errors import FamBenchError

#: where state_dicts sit inside checkpoint files, tried in this order (nested ones too)
NESTED_KEYS = ("state_dict", "params", "model", "model_state_dict", "net", "network")


def _omegaconf_globals() -> list[Any]:
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
