"""Small helpers shared by the format readers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fam.errors import FamBenchError


def check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise FamBenchError(
            f"The {name} dataset has splits {', '.join(repr(s) for s in allowed)}; got "
            f"split={split!r}."
        )


def check_option(name: str, option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise FamBenchError(
            f"The {name} dataset option {option} must be one of "
            f"{', '.join(repr(s) for s in allowed)}; got {value!r}."
        )


def contiguous(values: Sequence) -> tuple[list[int], list]:
    """Map arbitrary class keys to ``0..C-1`` in sorted key order: (labels, sorted keys)."""
    keys = sorted(set(values))
    position = {k: i for i, k in enumerate(keys)}
    return [position[v] for v in values], keys


def first_missing(paths: Sequence[Path]) -> Path | None:
    for path in paths:
        if not path.is_file():
            return path
    return None
