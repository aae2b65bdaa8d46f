"""Content identity of data on disk: sha256 of every file's bytes, cached and parallel.

A dataset read from ``data.root`` is identified by what its files hold, not by where they
lie or how big they are: a file rewritten at the same size is another dataset (another
cached model, another ``table_id``, a refused resume). :func:`file_digests` reads each
file in 1 MiB blocks (never whole into memory) on a few threads (``hashlib`` and file
reads release the GIL), and remembers each digest under ``(path, size, mtime_ns)`` in an
SQLite file in the model cache folder (``<cache_dir>/file-digests.sqlite``), so a second
run re-reads only the files that changed. A file whose size and modification time are
both unchanged is taken as unchanged (as ``git status`` and ``make`` do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 1 << 20
DIGEST_CACHE = "file-digests.sqlite"
#: threads reading files; more than a few only queue on the same disk
THREADS = min(8, 2 * (os.cpu_count() or 1))
#: images hashed per block of an in-memory (or memory-mapped) array dataset
ARRAY_BLOCK = 1024


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes, read in :data:`BLOCK` blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """``(path, size, mtime_ns) -> digest`` in an SQLite file; ``None`` path: in memory
    only. A cache that cannot be opened or written costs time, never correctness: it is
    reported once and the digests are computed."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._db: sqlite3.Connection | None = None
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS digests "
                "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, digest TEXT)"
            )
        except (OSError, sqlite3.Error) as err:
            self._unusable(err)

    def _unusable(self, err: BaseException) -> None:
        log.warning(
            "the file-digest cache %s cannot be used (%s); every data file is hashed anew "
            "(slower, same identity)",
            self.path,
            err,
        )
        if self._db is not None:
            self._db.close()
        self._db = None

    def lookup(self, keys: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        if self._db is None or not keys:
            return {}
        wanted = {path: (size, mtime) for path, size, mtime in keys}
        found: dict[str, str] = {}
        try:
            names = list(wanted)
            for i in range(0, len(names), 900):  # SQLite's limit of bound parameters
                chunk = names[i : i + 900]
                rows = self._db.execute(
                    f"SELECT path, size, mtime_ns, digest FROM digests WHERE path IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
                for path, size, mtime, digest in rows:
                    if wanted[path] == (size, mtime):
                        found[path] = digest
        except sqlite3.Error as err:
            self._unusable(err)
        return found

    def store(self, rows: Sequence[tuple[str, int, int, str]]) -> None:
        if self._db is None or not rows:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as err:
            self._unusable(err)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def file_digests(
    paths: Sequence[str | os.PathLike], cache: DigestCache | None = None
) -> list[str | None]:
    """The sha256 of each file (``None`` for a file that cannot be read), in order; each
    file is stat-ed once, and read only when ``cache`` does not know its
    ``(path, size, mtime_ns)``."""
    keys: list[tuple[str, int, int] | None] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            keys.append(None)
            continue
        keys.append((os.fspath(path), stat.st_size, stat.st_mtime_ns))
    known = cache.lookup([k for k in keys if k is not None]) if cache is not None else {}
    todo = sorted({k for k in keys if k is not None and k[0] not in known})

    def digest(key: tuple[str, int, int]) -> str | None:
        try:
            return file_digest(key[0])
        except OSError:
            return None

    with ThreadPoolExecutor(THREADS) as pool:
        computed = dict(zip(todo, pool.map(digest, todo, chunksize=64), strict=True))
    if cache is not None:
        cache.store([(*k, d) for k, d in computed.items() if d is not None])
    out: list[str | None] = []
    for key in keys:
        if key is None:
            out.append(None)
        else:
            out.append(known.get(key[0]) or computed.get(key))
    return out


def array_digest(images) -> str:
    """sha256 of every pixel of an image array ``(N, ...)`` (a memory map is read block by
    block, never copied whole)."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(images.shape), str(images.dtype))).encode())
    for i in range(0, len(images), ARRAY_BLOCK):
        block = images[i : i + ARRAY_BLOCK]
        if hasattr(block, "numpy"):
            block = block.detach().cpu().numpy()
        digest.update(np.ascontiguousarray(block).data)
    return digest.hexdigest()
