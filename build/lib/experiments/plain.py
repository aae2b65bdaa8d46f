"""OmegaConf containers (Hydra configs) to plain Python data."""

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
