"""Atomic file writes: write a temporary file in the same folder, then ``os.replace`` it.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written file. The temporary name is ``.<name>.<pid>.tmp`` beside ``path``
(same filesystem, so the rename is atomic; unique per process); it is removed when the
write fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills ``tmp``, then it is
    renamed over ``path``. The parent folder must exist."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
