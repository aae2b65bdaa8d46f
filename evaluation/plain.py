"""Plain-data helpers shared by the whole project: configs to plain data, dotted
flattening, and the one short hash behind every stored id.

``plain`` turns a dataclass (the typed run config) or an OmegaConf container into plain
dicts and lists; ``flatten`` writes nested dicts as dotted keys; ``short_hash`` is the
sha256 prefix of a value's canonical JSON. Every id the suite stores goes through
``short_hash``: ``model_id``, ``table_id``, ``settings_id``, the run fingerprint (its
default form) and the model-cache file names (``strict=True``), so neither form may change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fam.errors import FamBenchError


def plain_container(value: Any) -> Any:
    """``value`` as plain dicts/lists (resolved) when it is an OmegaConf ``DictConfig`` or
    ``ListConfig``; any other value is returned as it is (the same object)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def plain(value: Any) -> Any:
    """Dataclasses and OmegaConf containers as plain JSON-able data; any other value is
    returned as it is (the same object)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return plain_container(value)


def flatten(d: Any, *, keep_empty: bool = True) -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``. An empty dict below the top is kept as a value
    (``{"a": {}} -> {"a": {}}``) or, with ``keep_empty=False``, dropped (no key)."""
    return _flatten(d, "", keep_empty)


def _flatten(d: Any, prefix: str, keep_empty: bool) -> dict[str, Any]:
    if not isinstance(d, dict) or (keep_empty and not d):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k), keep_empty))
    return out


def short_hash(value: Any, length: int = 16, *, strict: bool = False) -> str:
    """sha256 prefix of the canonical JSON of ``value`` (sorted keys).

    The default form (JSON's default separators; a value JSON cannot write is written as
    its ``str``) identifies runs, tables and settings. ``strict=True`` is the model cache's
    form: compact separators, and ``value`` must be plain JSON data (dicts, lists, str,
    numbers, bool, None; OmegaConf configs are converted, resolved); anything else, or
    nan/inf, is a :class:`~fam.errors.FamBenchError`.
    """
    if not strict:
        text = json.dumps(value, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:length]
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_config
        )
    except (TypeError, ValueError) as err:
        raise FamBenchError(
            f"The checkpoint cache key must be plain JSON data (dicts, lists, str, numbers, "
            f"bool, None); {err}. Convert configs with OmegaConf.to_container(cfg, "
            "resolve=True)."
        ) from err
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _json_config(value: Any) -> Any:
    converted = plain_container(value)  # a new object for OmegaConf configs
    if converted is not value:
        return converted
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON data")
