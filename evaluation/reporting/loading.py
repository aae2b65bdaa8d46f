"""Finding and reading run outputs for the leaderboard and the run report.

:func:`find_results` finds every ``results.csv`` under the given folders (recursively, so
a Hydra multirun folder works as one argument), each file once; :func:`load_results`
concatenates them with a ``run`` column (the folder) and carries what lies beside each
file (``run.json`` config, ``warnings.json``, ``sanity.csv``) in the frame's ``attrs``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation import registry
from evaluation.summary import metric_columns
from fam.errors import FamBenchError

REQUIRED_COLUMNS: tuple[str, ...] = ("sample_id", "method")


def find_results(dirs: Iterable[str | Path]) -> list[Path]:
    """Every ``results.csv`` under ``dirs`` (recursively), each file once, in a stable order."""
    found: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "results.csv":
            files = [d]
        elif d.is_dir():
            files = sorted(d.rglob("results.csv"))
        else:
            raise FamBenchError(
                f"{d} does not exist; pass run output folders (e.g. outputs/2026-01-01/12-00-00 "
                "or a multirun folder)."
            )
        if not files:
            raise FamBenchError(
                f"no results.csv under {d}: a finished run writes results.csv in its Hydra "
                "output folder (outputs/DATE/TIME, or one subfolder per job of a multirun). "
                "Check the path, or finish/resume the run first (python run.py ... again)."
            )
        for f in files:
            found.setdefault(f.resolve(), None)
    return sorted(found)


def check_columns(results: pd.DataFrame) -> None:
    """Refuse results without ``sample_id`` and ``method`` or without a metric column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise FamBenchError(
            f"results are missing the column(s) {missing}; a results.csv written by run.py has "
            "sample_id, method, table_id, seed, ... plus one column per metric. Pass run "
            "output folders, not other CSV files."
        )
    if not metric_columns(results):
        raise FamBenchError(
            f"results have no metric column; expected at least one of {registry.available()}."
        )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FamBenchError(f"{path} is not readable JSON ({err}).") from err


def load_results(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """The ``results.csv`` files under ``dirs`` concatenated, with a ``run`` column (folder).

    The frame's ``attrs`` carry what lies beside each file: ``configs`` (run -> the
    ``run.json`` config), ``warnings`` (run -> ``warnings.json`` entries) and ``sanity``
    (the ``sanity.csv`` rows with a ``run`` column, or ``None``);
    :func:`evaluation.reporting.tables.build_leaderboard` reads them.
    """
    frames, sanity, configs, warnings = [], [], {}, {}
    for path in find_results(dirs):
        try:
            frame = pd.read_csv(path, keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise FamBenchError(f"{path} is not a readable CSV file ({err}).") from err
        try:
            check_columns(frame)
        except FamBenchError as err:
            raise FamBenchError(f"{path}: {err}") from err
        run = str(path.parent)
        frame["run"] = run
        frames.append(frame)
        run_json = _read_json(path.parent / "run.json")
        if isinstance(run_json, dict) and isinstance(run_json.get("config"), dict):
            configs[run] = run_json["config"]
        found = _read_json(path.parent / "warnings.json")
        if isinstance(found, list):
            warnings[run] = [w for w in found if isinstance(w, dict)]
        if (path.parent / "sanity.csv").is_file():
            rows = pd.read_csv(path.parent / "sanity.csv")
            rows["run"] = run
            sanity.append(rows)
    results = pd.concat(frames, ignore_index=True)
    results.attrs = {
        "configs": configs,
        "warnings": warnings,
        "sanity": pd.concat(sanity, ignore_index=True) if sanity else None,
    }
    return results
