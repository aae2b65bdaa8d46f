"""OmegaConf containers (Hydra configs) to plain Python data, and nested dicts to dotted keys."""

from __future__ import annotations

from typing import Any


def to_plain(value: Any) -> Any:
    """``value`` as plain dicts/lists (resolved) when it is an OmegaConf ``DictConfig`` or
    ``ListConfig``; any other value is returned as it is (the same object)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # without omegaconf nothing can be one of its configs
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def flatten(d: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    return _flatten(d)
