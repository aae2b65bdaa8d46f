"""Which rows form a leaderboard table, which entries it has, and its heading in words.

Pooling rules (what a reader of the numbers should know):

- **A table is one ``table_id``** (a hash the runner writes of everything that changes a
  number except the method and the seed: data, model and its training configuration,
  task, metric settings, evaluation protocol) **and one seed**. Runs that differ in
  anything else, e.g. only in training steps, are two tables.
- **Method entries** are ``(method, settings_id)``: the same method with other options is
  another entry, labelled by the options (``fam (contribution=product)``).
- **A sample counts once.** Rows with the same ``(table_id, seed, method, settings_id,
  sample_id)`` from several run folders (a folder passed twice, a repeated run) are kept
  once (the first folder in path order) and the table notes how many were dropped, and
  whether their values differed. The same key twice in one ``results.csv`` is refused.
- **Seeds** are separate tables unless ``--pool-seeds``: then the seeds of one
  configuration form a seed level (:mod:`evaluation.reporting.tables`).
- **Headings in words**: each table's heading names the experiment, data, model (its
  config name) and task, then what distinguishes it from the other tables of that
  experiment, derived from the runs' ``run.json`` configs (e.g. ``pools [T,T,F,F], 300
  training steps``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from evaluation.plain import flatten
from evaluation.summary import method_labels, metric_columns
from fam.errors import FamBenchError

#: what identifies a table when a results.csv has no table_id (written by an older run.py)
FALLBACK_TABLE_KEYS: tuple[str, ...] = (
    "experiment",
    "dataset",
    "model",
    "model_id",
    "task",
    "settings_id",
)
DESCRIPTIVE_KEYS: tuple[str, ...] = ("experiment", "dataset", "model", "task", "model_id")
#: config keys (and their sub-keys) that never tell tables apart: what was run (the method
#: list and each method's options, which make entries, not tables), display options
NOT_DISTINGUISHING: tuple[str, ...] = (
    "methods",
    "method",
    "metrics",
    "name",
    "eval.figure_samples",
    "eval.progress",
)


def _distinguishing(key: str) -> bool:
    return not any(key == k or key.startswith(f"{k}.") for k in NOT_DISTINGUISHING)


def _config_key(config: dict) -> str:
    """A table key from a run.json config: every key but the seed and the lists of what ran."""
    flat = {
        k: v
        for k, v in flatten(config, keep_empty=False).items()
        if k != "seed" and _distinguishing(k)
    }
    return json.dumps(flat, sort_keys=True, default=str)


def normalise(results: pd.DataFrame, configs: dict[str, dict]) -> tuple[pd.DataFrame, list[str]]:
    """Fill the optional columns, derive a table_id where missing; returns notes.

    Without ``table_id`` (results written by an older run.py) a run's table is keyed by its
    ``run.json`` config (all but the seed and the method/metric lists) with the
    descriptive columns and ``settings_id``, or by those columns alone without a config;
    ``seed`` comes from the config when the file has none.
    """
    notes = []
    frame = results.copy()
    frame.attrs = {}  # pandas compares attrs on merge; DataFrames there break it
    if "seed" not in frame.columns and "run" in frame.columns:
        frame["seed"] = frame["run"].map(lambda r: (configs.get(r) or {}).get("seed", ""))
    for column in ("run", "seed", "settings_id", *DESCRIPTIVE_KEYS):
        if column not in frame.columns:
            frame[column] = ""
        frame[column] = frame[column].astype(object).where(frame[column].notna(), "")
        frame[column] = frame[column].map(_text)
    if "table_id" not in frame.columns or frame["table_id"].isna().any():
        present = [c for c in FALLBACK_TABLE_KEYS if c in results.columns]
        derived = frame[present].astype(str).agg("/".join, axis=1)
        by_config = frame["run"].map(lambda r: _config_key(configs[r]) if r in configs else "")
        derived = (derived + "/" + by_config).map(
            lambda s: "legacy-" + hashlib.sha1(s.encode()).hexdigest()[:8]
        )
        if "table_id" in frame.columns:
            frame["table_id"] = frame["table_id"].where(frame["table_id"].notna(), derived)
        else:
            frame["table_id"] = derived
        keyed = f"their run.json config and {present}" if configs else f"{present} only"
        notes.append(
            "some results.csv files have no table_id (written by an older run.py): their "
            f"tables are keyed by {keyed}; re-run them for tables keyed by everything that "
            "changes a number."
        )
    frame["table_id"] = frame["table_id"].map(_text)
    return frame, notes


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def dedupe(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Each (table, seed, method, settings_id, sample) once (module docstring); notes per table."""
    keys = ["table_id", "seed", "method", "settings_id", "sample_id"]
    within = frame.duplicated(subset=[*keys, "run"], keep=False)
    if within.any():
        example = frame.loc[within, [*keys, "run"]].iloc[0].to_dict()
        raise FamBenchError(
            f"{int(within.sum())} rows of one results.csv share (table_id, seed, method, "
            f"settings_id, sample_id), e.g. {example}; each sample is scored once per method "
            "in a run. The file was edited or merged by hand: restore it from the run "
            "(delete results.csv and run the same command again to re-merge the shards)."
        )
    frame = frame.sort_values("run", kind="stable")
    repeated = frame.duplicated(subset=keys, keep="first")
    notes: dict[str, list[str]] = {}
    if repeated.any():
        columns = metric_columns(frame)
        for table_id, dropped in frame[repeated].groupby("table_id"):
            kept = frame[~repeated & (frame["table_id"] == table_id)]
            both = dropped.merge(kept, on=keys, suffixes=("", "_kept"))
            differ = 0.0
            for column in columns:
                diff = (both[column].astype(float) - both[f"{column}_kept"].astype(float)).abs()
                differ = max(differ, float(diff.max(skipna=True)) if diff.notna().any() else 0.0)
            runs = sorted(set(dropped["run"]))
            text = (
                f"{len(dropped)} rows were the same samples evaluated again (a folder passed "
                f"twice or a repeated run: {', '.join(runs)}); each sample is counted once"
            )
            if differ > 0:
                text += (
                    f" (the repeats differed by up to {differ:.3g}: the runs are not deterministic)"
                )
            notes[str(table_id)] = [text + "."]
    return frame[~repeated].reset_index(drop=True), notes


def entry_labels(table: pd.DataFrame) -> pd.Series:
    """Entry label per row of one table (:func:`evaluation.summary.method_labels`); entries
    whose options the file does not record are told apart by their ``settings_id``."""
    labels = method_labels(table)
    # Entries are (method, settings_id); options the file does not record show as the id.
    for label, group in table.groupby(labels, sort=False):
        ids = group["settings_id"].unique()
        if len(ids) > 1:
            idx = group.index
            labels.loc[idx] = [f"{label} (settings {s})" for s in table.loc[idx, "settings_id"]]
    return labels


def _value_words(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value_words(v) for v in value) + "]"
    return str(value)


def _phrase(key: str, value: Any) -> str:
    """A config difference in words (``trainer.max_steps: 300`` -> ``300 training steps``)."""
    last = key.rsplit(".", 1)[-1]
    text = _value_words(value)
    if key == "trainer.max_steps":
        return f"{text} training steps"
    if key == "seed":
        return f"seed {text}"
    if key.startswith("model.") and last == "pooling":
        return text.upper()
    if key.startswith("model.") and last == "hidden":
        return f"{text} channels"
    if last == "pools":
        return f"pools {text}"
    if key.startswith("eval.") and last in ("n_way", "n_shot", "n_query"):
        return f"{text}-{last.removeprefix('n_')}"
    return f"{key}={text}"


def table_headings(tables: dict[tuple, pd.DataFrame], configs: dict[str, dict]) -> dict[tuple, str]:
    """One heading per table, in words (module docstring); unique within the leaderboard."""
    flat: dict[tuple, dict[str, Any]] = {}
    for key, table in tables.items():
        runs = [r for r in dict.fromkeys(table["run"]) if r in configs]
        per_run = [flatten(configs[r], keep_empty=False) for r in runs]
        if not per_run:
            flat[key] = {}
            continue
        shared = {
            k: v
            for k, v in per_run[0].items()
            if _distinguishing(k) and all(json.dumps(p.get(k)) == json.dumps(v) for p in per_run)
        }
        flat[key] = shared
    headings = {}
    by_experiment: dict[str, list[tuple]] = {}
    for key, table in tables.items():
        by_experiment.setdefault(str(table["experiment"].iloc[0]), []).append(key)
    for keys in by_experiment.values():
        all_keys = sorted({k for key in keys for k in flat[key]})
        varying = [
            k
            for k in all_keys
            if len({json.dumps(flat[key].get(k), sort_keys=True) for key in keys}) > 1
            and all(k in flat[key] for key in keys)
        ]
        for key in keys:
            table = tables[key]
            first = table.iloc[0]
            model_words = [_phrase(k, flat[key][k]) for k in varying if k.startswith("model.")]
            other_words = [_phrase(k, flat[key][k]) for k in varying if not k.startswith("model.")]
            model = str(first["model"]) or "model"
            if model_words:
                model += f" ({', '.join(model_words)})"
            parts = [p for p in (str(first["dataset"]), model, str(first["task"])) if p]
            text = " / ".join(parts)
            if first["experiment"]:
                text = f"{first['experiment']}: {text}"
            if other_words:
                text += ", " + ", ".join(other_words)
            headings[key] = text
    counts: dict[str, int] = {}
    for text in headings.values():
        counts[text] = counts.get(text, 0) + 1
    for key, text in headings.items():
        if counts[text] > 1:
            table_id, seed = key
            extra = f"table {table_id}" + (f", seed {seed}" if seed != "" else "")
            headings[key] = f"{text} ({extra})"
    return headings
