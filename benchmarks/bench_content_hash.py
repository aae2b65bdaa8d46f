"""Content identity of an on-disk dataset: the cost of hashing every file's bytes.

``N`` small files (``SIZE`` random bytes each, the size of a small JPEG) in a fresh
temporary folder, identified four ways by :mod:`experiments.data.content`:

- (a) ``stat`` only: path + size + mtime of each file, what identity cost before
  contents were hashed (the floor: every variant stats each file once);
- (b) cold, one thread: every file read and hashed (sha256) in one thread;
- (c) cold: every file read and hashed on ``THREADS`` threads, digests written to the
  SQLite cache (what the first run on a dataset pays);
- (d) warm: the cache knows every ``(path, size, mtime_ns)``, no file is read (what every
  later run pays).

The files were just written, so they sit in the page cache: (b) and (c) measure hashing
and system calls, not the disk; a cold disk adds its read time to (b) and (c) only.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from experiments.data import content

N = 100_000
SIZE = 2048


def _write(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        folder = root / f"class_{i % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(os.urandom(SIZE))
        paths.append(path)
    return paths


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(args) -> str:
    n = 2_000 if getattr(args, "quick", False) else N
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _write(root / "data", n)
        stat_only = _time(lambda: [os.stat(p) for p in paths])
        threads = content.THREADS
        content.THREADS = 1
        one = _time(lambda: content.file_digests(paths))
        content.THREADS = threads
        cache = content.DigestCache(root / content.DIGEST_CACHE)
        cold = _time(lambda: content.file_digests(paths, cache))
        warm = _time(lambda: content.file_digests(paths, cache))
        cache.close()
    rows = [
        ("(a) stat only (path + size + mtime)", stat_only),
        ("(b) sha256 of every file, 1 thread", one),
        (f"(c) sha256 of every file, {threads} threads, cache written (first run)", cold),
        ("(d) cache warm, nothing read (later runs)", warm),
    ]
    lines = [
        f"### Content identity: {n:,} files of {SIZE} bytes",
        "",
        "| identity | seconds | µs per file | × stat |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in rows:
        lines.append(
            f"| {name} | {seconds:.2f} | {seconds / n * 1e6:.1f} | {seconds / stat_only:.1f} |"
        )
    return "\n".join(lines)
