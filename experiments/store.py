"""The output store: a run folder's lock, fingerprint claim, result shards and merge.

- **Own folder**: a folder holding files no run wrote (someone's ``results.csv``) is
  refused, naming them, before anything is written into it.
- **Lock**: ``.lock`` holds an exclusive ``flock`` for the run's lifetime; a second run
  started on the same folder is refused. The lock dies with its process (a killed run
  leaves no stale lock to clear by hand).
- **Claim**: ``run.json`` records the config fingerprint; a folder that holds results of
  another config is refused with the changed keys (resume must never mix results). A
  folder whose earlier run wrote no shard yet is taken over.
- **Shards**: each unit is written atomically to ``shards/unit_<u>.pt`` (tmp + replace),
  so a run killed at any point and started again redoes at most the units in flight.
- **Merge**: shards are read one at a time, in unit order, into ``results.csv``,
  ``curves.npz`` and ``sanity.csv``; nothing else is held in memory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evaluation.plain import flatten
from experiments.atomic import atomic_write, atomic_write_bytes
from fam.errors import FamBenchError

SHARD_DIR = "shards"
#: what a run writes into its folder (besides Hydra's ``.hydra/`` and ``<job>.log``)
RUN_FILES = frozenset(
    {
        ".lock",
        "run.json",
        SHARD_DIR,
        "task_metrics.csv",
        "results.csv",
        "curves.npz",
        "sanity.csv",
        "summary.csv",
        "summary_by_correct.csv",
        "warnings.json",
        "settings.json",
        "environment.json",
        "report.html",
        "maps.png",
        "curves.png",
        "summary.png",
        "sanity.png",
        "model.pt",
        "model.task.pt",
        "logs",
    }
)
#: what may stand in a folder before the run's ``run.json`` does: Hydra writes its
#: config and log before the run starts; shards are checked against the fingerprint
_BEFORE_CLAIM = frozenset({".lock", ".hydra", SHARD_DIR})
#: the log Hydra writes for ``fam-bench`` / ``run.py`` (the job is named after
#: :mod:`experiments.cli`, where ``hydra.main`` is called); ``hydra.job.name`` renames it
HYDRA_LOG = "cli.log"
#: leftovers of an atomic write killed half-way (:mod:`experiments.atomic`)
_ATOMIC_TMP = re.compile(r"^\..+\.\d+\.tmp$")
#: a disk with less free space than this cannot take a run's outputs
MIN_FREE_BYTES = 1 << 20


def _unwritable(out: Path, err: OSError) -> FamBenchError:
    return FamBenchError(
        f"The output folder {out} cannot be written ({err.strerror or err}). Choose a "
        "writable folder with hydra.run.dir=<folder> (or free some space)."
    )


def _hydra_log() -> str | None:
    """The log file Hydra writes into the run folder (``<job name>.log``), if under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{HydraConfig.get().job.name}.log"
    except Exception:  # noqa: BLE001 - not started by Hydra (Python API, tests)
        return None


def foreign_files(out: Path, hydra_log: str | None = None) -> list[str]:
    """Entries of ``out`` that no run wrote: anything outside :data:`RUN_FILES`, and run
    outputs in a folder without the ``run.json`` every run writes first."""
    if not out.is_dir():
        return []
    claimed = (out / "run.json").is_file()
    ours = (RUN_FILES if claimed else _BEFORE_CLAIM) | {".hydra", HYDRA_LOG, hydra_log or HYDRA_LOG}
    return sorted(
        p.name for p in out.iterdir() if p.name not in ours and not _ATOMIC_TMP.match(p.name)
    )


def refuse_foreign_files(out: Path, hydra_log: str | None = None) -> None:
    """A run never writes into a folder holding files it did not write."""
    foreign = foreign_files(out, hydra_log)
    if foreign:
        shown = ", ".join(foreign[:8]) + (
            f" (+{len(foreign) - 8} more)" if len(foreign) > 8 else ""
        )
        raise FamBenchError(
            f"The output folder {out} holds files no run of fam-bench wrote ({shown}); a run "
            "would write results.csv, report.html and more beside them, and overwrite any of "
            "the same name. Use a new or empty folder (hydra.run.dir=<folder>)."
        )


def check_output_folder(
    out: str | os.PathLike, flag: str = "hydra.run.dir", hydra_log: str | None = None
) -> None:
    """Refuse an output folder that cannot be written, before anything is written: a file
    standing at it or above it, a read-only mount (``os.access`` reports a read-only file
    system even to root), a full disk, or files no run wrote (:func:`refuse_foreign_files`)."""
    out = Path(out).absolute()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"Choose another folder with {flag}=<folder>"
    if not existing.is_dir():
        raise FamBenchError(
            f"The output folder {out} cannot be created: {existing} is a file, not a folder. "
            f"{fix}, or move that file."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FamBenchError(
            f"The output folder {out} cannot be written: {existing} is read-only (a read-only "
            f"mount or no write permission). {fix}."
        )
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        raise FamBenchError(
            f"The output folder {out} cannot be written: its disk is full ({free} bytes free "
            f"at {existing}). Free some space, or {fix[0].lower()}{fix[1:]}."
        )
    if existing == out:
        refuse_foreign_files(out, hydra_log)


class OutputStore:
    """One run folder (module docstring). Use as a context manager: it holds the lock."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self._lock_file = None

    # -- lock -----------------------------------------------------------------------------
    def __enter__(self) -> OutputStore:
        refuse_foreign_files(self.out, _hydra_log())  # before the lock file is written
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.out / ".lock", "a+")  # noqa: SIM115 - held open
        except OSError as err:
            raise _unwritable(self.out, err) from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lock_file.close()
            self._lock_file = None
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise FamBenchError(
                    f"Another run is writing to {self.out} (its lock {self.out / '.lock'} is "
                    "held). Wait for it to finish, or use another folder (hydra.run.dir=...)."
                ) from None
            raise
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- files ----------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.out / name
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            raise _unwritable(self.out, err) from None
        return path

    def write_json(self, name: str, value: Any) -> Path:
        text = json.dumps(value, indent=2, sort_keys=True, default=str)
        return self.write_bytes(name, text.encode())

    def write_frame(self, name: str, frame: pd.DataFrame) -> Path:
        return self.write_bytes(name, frame.to_csv(index=False).encode())

    # -- claim ----------------------------------------------------------------------------
    def claim(self, fingerprint: str, fingerprinted: dict) -> None:
        """Refuse a folder holding results of another config; record ours otherwise."""
        path = self.out / "run.json"
        if path.is_file() and self.done_units():
            previous = json.loads(path.read_text())
            if previous.get("fingerprint") != fingerprint:
                old, new = flatten(previous.get("config", {})), flatten(fingerprinted)
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise FamBenchError(
                    f"The output folder {self.out} holds results of a different configuration "
                    f"(changed: {', '.join(changed[:12]) or 'unknown'}); resuming would mix "
                    "them. Use the original settings to resume, or a new folder "
                    "(hydra.run.dir=...) for the new ones."
                )
            return
        # Taking the folder over: outputs of an earlier config must not sit beside ours.
        for stale in ("task_metrics.csv", "settings.json", "warnings.json"):
            (self.out / stale).unlink(missing_ok=True)
        self.write_json("run.json", {"fingerprint": fingerprint, "config": fingerprinted})

    # -- shards ---------------------------------------------------------------------------
    def shard_path(self, unit: int) -> Path:
        return self.out / SHARD_DIR / f"unit_{unit:06d}.pt"

    def done_units(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in (self.out / SHARD_DIR).glob("unit_*.pt")}

    def write_shard(self, unit: int, shard: dict) -> None:
        path = self.shard_path(unit)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, partial(torch.save, shard))
        except OSError as err:
            raise _unwritable(self.out, err) from None

    def load_shard(self, unit: int, fingerprint: str) -> dict:
        path = self.shard_path(unit)
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated file cannot come from os.replace; refuse it
            raise FamBenchError(
                f"Cannot read the result shard {path} ({err}); delete it and run again to "
                "recompute that unit."
            ) from err
        if shard.get("fingerprint") != fingerprint:
            raise FamBenchError(
                f"The result shard {path} was written under a different configuration; "
                "resuming would mix results. Resume with the original settings, or use a "
                "new output folder (hydra.run.dir=...)."
            )
        return shard

    # -- merge ----------------------------------------------------------------------------
    def merge(
        self,
        fingerprint: str,
        num_units: int,
        methods: list[str],
        front: list[str],
        metric_columns: list[str],
    ) -> dict[str, Any]:
        """Shards -> ``results.csv``, ``curves.npz``, ``sanity.csv``; returns the frames
        (and ``not_conserved``: the shards' Relevance-CAM samples flagged by the worker)."""
        rows, sanity, figure, not_conserved = [], [], None, []
        curves: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        sample_ids = []
        for u in range(num_units):
            shard = self.load_shard(u, fingerprint)
            rows.extend(shard["rows"])
            sanity.extend(shard.get("sanity", []))
            not_conserved.extend(shard.get("not_conserved", []))
            figure = shard.get("figure", figure)
            sample_ids.extend(shard["sample_ids"])
            for kind, values in shard["curves"].items():
                for k, name in enumerate(methods):
                    curves[name][kind].append(values[k])
            del shard
        results = pd.DataFrame(rows)
        columns = [c for c in metric_columns if c in results.columns]
        head = [c for c in front if c in results.columns]
        rest = [c for c in results.columns if c not in head and c not in columns]
        results = results[head + columns + rest]
        self.write_frame("results.csv", results)
        merged_curves = {
            name: {kind: torch.cat(parts).numpy() for kind, parts in kinds.items()}
            for name, kinds in curves.items()
        }
        if merged_curves:
            arrays = {
                f"{name}/{kind}": arr
                for name, kinds in merged_curves.items()
                for kind, arr in kinds.items()
            }

            def write_curves(tmp: Path) -> None:
                # A file object: given a path, np.savez would append ".npz" to the tmp name.
                with open(tmp, "wb") as f:
                    np.savez(f, sample_id=np.asarray(sample_ids), **arrays)

            atomic_write(self.out / "curves.npz", write_curves)
        sanity_frame = pd.DataFrame(sanity) if sanity else None
        if sanity_frame is not None:
            self.write_frame("sanity.csv", sanity_frame)
        return {
            "results": results,
            "curves": merged_curves,
            "figure": figure,
            "sanity": sanity_frame,
            "metric_columns": columns,
            "not_conserved": not_conserved,
        }
