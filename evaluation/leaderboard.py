"""Merge run outputs into a leaderboard that never compares the incomparable.

``python -m evaluation.leaderboard OUTPUT_DIRS... [--out DIR] [--reference fam]
[--pool-seeds]`` finds every ``results.csv`` under the given folders (recursively, so a
Hydra multirun folder works as one argument) and writes ``leaderboard.csv`` (tidy: one
row per table x method entry x metric), ``leaderboard.md`` and ``leaderboard.html``.

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
  configuration form a seed level: the entry's value is the mean of its per-seed means
  and the interval the t interval over seeds (``t-seeds``); ``n`` stays the number of
  samples and ``n_seeds`` says how many seeds.
- **Headings in words**: each table's heading names the experiment, data, model (its
  config name) and task, then what distinguishes it from the other tables of that
  experiment, derived from the runs' ``run.json`` configs (e.g. ``pools [T,T,F,F], 300
  training steps``).

Statistics (:mod:`evaluation.stats`): Wilson intervals for binary metrics, t intervals
otherwise; for few-shot the clustered t interval over episodes (clipped to [0, 1] for
binary metrics). Paired tests of every entry against the reference on the samples both
scored (paired by seed and ``sample_id``), chosen by the table's design: for few-shot a
paired t over episode-mean differences (``t-episodes``), otherwise exact McNemar for
binary metrics and Wilcoxon signed-rank for continuous ones; Holm-corrected over all
comparisons of a table; each table's legend names its tests. Per-sample differences
within the metric's identity tolerance (float noise) count as none. Each cell gives the
direction against the reference (better or worse) beside its stars. Ranks use the means
rounded as displayed, so float noise never ranks; bold marks the best only when no other
entry ties it at that rounding. ``n`` is given per metric. The sanity column is the mean
rank correlation after full randomisation (lower is better). The ground-truth oracle
(``mask`` vs ``random``, paired, Holm over the table's metrics) flags metrics that do not
separate the two. The degenerate column counts the rows whose map is constant or
non-finite. Entries with identical values on every sample are listed as one row (e.g.
``fam_ablation = fam (weights=abs_sum)`` under a dot product, where the drop is the
share), not as rivals. Warnings the runs wrote (``warnings.json``) are shown beside their
table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation import registry, stats
from evaluation.summary import (
    centre_prior_warning,
    cluster_column,
    full_randomisation,
    identical_groups,
    identity_tolerance,
    method_labels,
    metric_columns,
    oracle_check,
    paired_clusters,
    summarise_sanity,
)
from fam.errors import FamBenchError, exit_on_user_error

REQUIRED_COLUMNS: tuple[str, ...] = ("sample_id", "method")
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
SAMPLE_KEYS: tuple[str, ...] = ("seed", "sample_id")
# Significance markers on Holm-adjusted p-values, strictest first.
P_MARKERS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
ALPHA = 0.05
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


LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "table",
    "heading",
    "table_id",
    "seed",
    *DESCRIPTIVE_KEYS,
    "score",
    "method",
    "method_name",
    "settings_id",
    "metric",
    "better",
    "mean",
    "ci95_low",
    "ci95_high",
    "interval",
    "n",
    "n_excluded",
    "n_samples",
    "n_seeds",
    "rank",
    "best",
    "reference",
    "test",
    "n_pairs",
    "p_value",
    "p_holm",
    "versus",
    "degenerate_rate",
    "n_degenerate",
    "identical_to",
    "oracle_p",
    "oracle_separates",
    "warnings",
    "notes",
)


def metric_direction(metric: str) -> str:
    """``"lower"`` if a smaller value of ``metric`` is better, else ``"higher"``."""
    return registry.direction(metric)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (:func:`evaluation.stats.holm`)."""
    return stats.holm(p_values)


# -- loading --------------------------------------------------------------------------------
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


def _check_columns(results: pd.DataFrame) -> None:
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
    :func:`build_leaderboard` reads them.
    """
    frames, sanity, configs, warnings = [], [], {}, {}
    for path in find_results(dirs):
        try:
            frame = pd.read_csv(path, keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise FamBenchError(f"{path} is not a readable CSV file ({err}).") from err
        try:
            _check_columns(frame)
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


# -- pooling --------------------------------------------------------------------------------
def _config_key(config: dict) -> str:
    """A table key from a run.json config: every key but the seed and the lists of what ran."""
    flat = {k: v for k, v in _flatten(config).items() if k != "seed" and _distinguishing(k)}
    return json.dumps(flat, sort_keys=True, default=str)


def _normalise(results: pd.DataFrame, configs: dict[str, dict]) -> tuple[pd.DataFrame, list[str]]:
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


def _dedupe(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
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


def _labels(table: pd.DataFrame) -> pd.Series:
    labels = method_labels(table)
    # Entries are (method, settings_id); options the file does not record show as the id.
    for label, group in table.groupby(labels, sort=False):
        ids = group["settings_id"].unique()
        if len(ids) > 1:
            idx = group.index
            labels.loc[idx] = [f"{label} (settings {s})" for s in table.loc[idx, "settings_id"]]
    return labels


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for key, value in d.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: d}


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


def _headings(tables: dict[tuple, pd.DataFrame], configs: dict[str, dict]) -> dict[tuple, str]:
    """One heading per table, in words (module docstring); unique within the leaderboard."""
    flat: dict[tuple, dict[str, Any]] = {}
    for key, table in tables.items():
        runs = [r for r in dict.fromkeys(table["run"]) if r in configs]
        per_run = [_flatten(configs[r]) for r in runs]
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


# -- aggregation ----------------------------------------------------------------------------
def _clipped(
    found: stats.Interval, bounds: tuple[float, float] | None, what: str, clips: list[str]
) -> stats.Interval:
    """``found`` clipped to the metric's ``bounds``; each clip leaves a note in ``clips``
    (an interval reaching past the possible values is too wide to say much)."""
    if bounds is None or not (found.low < bounds[0] or found.high > bounds[1]):
        return found
    low, high = max(found.low, bounds[0]), min(found.high, bounds[1])
    clips.append(
        f"{what}: the {found.kind} interval [{found.low:.3g}, {found.high:.3g}] reaches past "
        f"the metric's range [{bounds[0]:g}, {bounds[1]:g}] and is shown clipped to "
        f"[{low:.3g}, {high:.3g}]; too few "
        f"{'seeds' if found.kind == 't-seeds' else 'samples'} for it to say much."
    )
    return stats.Interval(found.mean, low, high, found.n, found.kind)


def _cell_stats(
    group: pd.DataFrame,
    column: str,
    cluster: str | None,
    pool_seeds: bool,
    bounds: tuple[float, float] | None = None,
    clips: list[str] | None = None,
) -> tuple[stats.Interval, int]:
    """The entry's interval on ``column`` (clipped to ``bounds``, each clip noted in
    ``clips``) and its number of seeds."""
    spec = registry.spec_of(column)
    clips = [] if clips is None else clips
    what = f"{group['label_'].iloc[0]} / {column}" if "label_" in group else column
    values = group[column].astype(float)
    seeds = group["seed"]
    n_seeds = int(seeds[values.notna()].nunique())
    if pool_seeds and n_seeds > 1:
        seed_means = values.groupby(seeds).mean().dropna()
        found = stats.t_interval(seed_means.to_numpy())
        n = int(values.notna().sum())
        pooled = stats.Interval(found.mean, found.low, found.high, n, "t-seeds")
        return _clipped(pooled, bounds, what, clips), n_seeds
    clusters = None
    if cluster is not None:
        clusters = (group["seed"].astype(str) + "/" + group[cluster].astype(str)).to_numpy()
    found = stats.interval(values.to_numpy() / spec.scale, spec.binary, clusters)
    scaled = stats.Interval(
        found.mean * spec.scale,
        found.low * spec.scale,
        found.high * spec.scale,
        found.n,
        found.kind,
    )
    return _clipped(scaled, bounds, what, clips), n_seeds


def _decimals(means: pd.Series) -> int:
    finite = means[np.isfinite(means.astype(float))]
    return 1 if len(finite) and finite.abs().max() >= 10 else 3


def _rank(rows: list[dict]) -> None:
    """Ranks and ``best`` per metric on the displayed (rounded) means (module docstring)."""
    by_metric: dict[str, list[dict]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(row)
    for metric, group in by_metric.items():
        if metric == "sanity":
            # Near 0 is the goal, not "as low as possible": no rank among methods.
            for row in group:
                row["rank"], row["best"] = math.nan, False
            continue
        decimals = _decimals(pd.Series([r["mean"] for r in group], dtype=float))
        sign = -1.0 if metric_direction(metric) == "lower" else 1.0
        keyed = [
            (sign * round(r["mean"], decimals) if math.isfinite(r["mean"]) else -math.inf, r)
            for r in group
        ]
        for value, row in keyed:
            if value == -math.inf:
                row["rank"], row["best"] = math.nan, False
                continue
            row["rank"] = 1 + sum(1 for other, _ in keyed if other > value)
        reference = next((v for v, r in keyed if r["reference"] == r["method"]), None)
        for value, row in keyed:
            # Equal at the shown rounding: no "better"/"worse", however small the p-value.
            if row["versus"] and reference is not None and value == reference:
                row["versus"] = "tied"
        top = [row for value, row in keyed if row["rank"] == 1]
        for row in group:
            row["best"] = len(top) == 1 and row is top[0]


def _table_score(table: pd.DataFrame, configs: dict[str, dict]) -> str | None:
    """The ``metric.score`` all of the table's runs used (``None``: unknown or mixed)."""
    if "run" not in table:
        return None
    scores = {
        ((configs.get(run) or {}).get("metric") or {}).get("score") for run in set(table["run"])
    }
    return scores.pop() if len(scores) == 1 else None


def _table_rows(
    table: pd.DataFrame,
    reference: str,
    pool_seeds: bool,
    sanity: pd.DataFrame | None,
    score: str | None = None,
    clips: list[str] | None = None,
) -> list[dict]:
    labels = list(dict.fromkeys(table["label_"]))
    names = table.groupby("label_")["method"].first()
    has_reference = reference in labels
    cluster = cluster_column(table)
    columns = [c for c in metric_columns(table) if table[c].notna().any()]
    oracle = oracle_check(table, keys=SAMPLE_KEYS).set_index("metric")
    groups = identical_groups(table, keys=SAMPLE_KEYS)
    identical = {label: " = ".join(g) for g in groups for label in g}
    tolerance = {column: identity_tolerance(table, column) for column in columns}
    rows: list[dict] = []
    for label in labels:
        group = table[table["label_"] == label]
        flags = group["degenerate"] if "degenerate" in group else pd.Series(dtype=object)
        flagged = flags.map(lambda v: str(v).lower() in ("true", "1", "1.0"))
        degenerate = float(flagged.mean()) if len(flags) else math.nan
        n_degenerate = int(flagged.sum()) if len(flags) else 0
        for column in columns:
            bounds = registry.value_bounds(column, score)
            found, n_seeds = _cell_stats(group, column, cluster, pool_seeds, bounds, clips)
            p_value, test, n_pairs, versus = math.nan, "", 0, ""
            if has_reference and label != reference:
                x, y, clusters = paired_clusters(
                    table, label, reference, column, SAMPLE_KEYS, cluster
                )
                n_pairs = int(x.size)
                p_value, test = stats.paired_test(
                    x, y, registry.is_binary(column), clusters, tolerance[column]
                )
                if n_pairs and x.mean() != y.mean():
                    lower_better = metric_direction(column) == "lower"
                    versus = "better" if (x.mean() < y.mean()) == lower_better else "worse"
            rows.append(
                dict(
                    method=label,
                    method_name=str(names[label]),
                    settings_id=str(group["settings_id"].iloc[0]),
                    metric=column,
                    better=metric_direction(column),
                    mean=found.mean,
                    ci95_low=found.low,
                    ci95_high=found.high,
                    interval=found.kind,
                    n=found.n,
                    n_excluded=len(group) - found.n,
                    n_samples=len(group),
                    n_seeds=n_seeds,
                    reference=reference if has_reference else "",
                    test=test,
                    n_pairs=n_pairs,
                    p_value=p_value,
                    versus=versus,
                    degenerate_rate=degenerate,
                    n_degenerate=n_degenerate,
                    identical_to=identical.get(label, ""),
                    oracle_p=oracle["oracle_p"].get(column, math.nan),
                    oracle_separates=oracle["oracle_separates"].get(column, None),
                )
            )
    adjusted = holm([r["p_value"] for r in rows])
    for row, p in zip(rows, adjusted, strict=True):
        row["p_holm"] = p
    if sanity is not None and not sanity.empty:
        rows += _sanity_rows(table, sanity, labels, names, reference if has_reference else "")
    _rank(rows)
    return rows


def _sanity_rows(
    table: pd.DataFrame, sanity: pd.DataFrame, labels: list[str], names: pd.Series, reference: str
) -> list[dict]:
    """Mean Spearman after full randomisation per entry (from the table's runs)."""
    mine = sanity[sanity["run"].isin(set(table["run"]))]
    rows = []
    for label in labels:
        name = names[label]
        # sanity.csv names the method only; entries sharing a name cannot be told apart there
        if sum(1 for other in labels if names[other] == name) > 1:
            continue
        rows_of = mine[mine["method"] == name]
        if rows_of.empty:
            continue
        summary = full_randomisation(summarise_sanity(rows_of))
        if summary.empty:
            continue
        last = summary.iloc[0]
        rows.append(
            dict(
                method=label,
                method_name=str(name),
                settings_id=str(table.loc[table["label_"] == label, "settings_id"].iloc[0]),
                metric="sanity",
                better="lower",
                mean=float(last["mean"]),
                ci95_low=float(last["ci95_low"]),
                ci95_high=float(last["ci95_high"]),
                interval=f"t (after {last['layer']})",
                n=int(last["n"]),
                n_excluded=int(last["n_excluded"]),
                n_samples=int(last["n"] + last["n_excluded"]),
                n_seeds=int(rows_of["run"].nunique()),
                reference=reference,
                test="",
                n_pairs=0,
                p_value=math.nan,
                p_holm=math.nan,
                versus="",
                degenerate_rate=math.nan,
                n_degenerate=0,
                identical_to="",
                oracle_p=math.nan,
                oracle_separates=None,
            )
        )
    return rows


def _score_of(table: pd.DataFrame, configs: dict[str, dict]) -> str:
    """The score the table's metrics read (``metric.score`` of its runs), or ``""``."""
    if "score" in table.columns and table["score"].notna().any():
        return str(table["score"].dropna().iloc[0])
    for run in dict.fromkeys(table["run"]):
        score = ((configs.get(run) or {}).get("metric") or {}).get("score")
        if score is not None:
            return str(score)
    return ""


def _warnings_of(table: pd.DataFrame, warnings: dict[str, list[dict]]) -> list[str]:
    """The table's runs' warnings, once each; the centre-prior check is made again on the
    table itself (its runs pooled), in place of each run's own."""
    found: dict[str, None] = {}
    for run in dict.fromkeys(table["run"]):
        for entry in warnings.get(run, []):
            if entry.get("code") == "centre_prior":
                continue
            text = f"{entry.get('code', 'warning')}: {entry.get('message', '')}"
            found.setdefault(text, None)
    centre = centre_prior_warning(table)
    if centre is not None:
        found.setdefault(f"{centre['code']}: {centre['message']}", None)
    return list(found)


def build_leaderboard(
    results: pd.DataFrame,
    reference: str = "fam",
    *,
    pool_seeds: bool = False,
    sanity: pd.DataFrame | None = None,
    warnings: dict[str, list[dict]] | None = None,
    configs: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Aggregate per-sample results into a tidy leaderboard (module docstring for the rules).

    ``results``: ``results.csv`` rows (``run``, ``table_id``, ``seed``, ``settings_id``,
    ``method_options``, ``experiment`` ... optional; see :func:`_normalise`). ``sanity``,
    ``warnings``, ``configs``: as :func:`load_results` puts them in ``results.attrs``
    (used when not given). Returns one row per table x entry x metric with
    :data:`LEADERBOARD_COLUMNS`; ``table`` numbers the tables in heading order.
    """
    _check_columns(results)
    attrs = dict(results.attrs)
    sanity = attrs.get("sanity") if sanity is None else sanity
    warnings = attrs.get("warnings") or {} if warnings is None else warnings
    configs = attrs.get("configs") or {} if configs is None else configs
    frame, global_notes = _normalise(results, configs)
    non_finite = (
        frame["degenerate_reason"].astype(str) == "non-finite"
        if "degenerate_reason" in frame.columns
        else pd.Series(False, index=frame.index)
    )
    for column in metric_columns(frame):
        # Non-finite maps are excluded (and counted in n_excluded), never scored.
        frame[column] = pd.to_numeric(frame[column], errors="coerce").mask(non_finite)
    frame, dedupe_notes = _dedupe(frame)
    if sanity is not None and "run" not in sanity.columns:
        sanity = sanity.assign(run="")

    table_keys = ["table_id"] if pool_seeds else ["table_id", "seed"]
    tables: dict[tuple, pd.DataFrame] = {}
    for key, table in frame.groupby(table_keys, sort=True):
        key = (key[0], "") if pool_seeds else tuple(key)
        table = table.copy()
        table["label_"] = _labels(table)
        tables[key] = table
    headings = _headings(tables, configs)

    rows = []
    order = sorted(tables, key=lambda k: (headings[k], k))
    for number, key in enumerate(order, start=1):
        table = tables[key]
        first = table.iloc[0]
        notes = list(global_notes) + dedupe_notes.get(key[0], [])
        seeds = sorted(set(table["seed"]))
        if pool_seeds and len(seeds) > 1:
            notes.append(f"seeds {', '.join(seeds)} pooled as a seed level (--pool-seeds).")
        score = _score_of(table, configs)
        clips: list[str] = []
        table_rows = _table_rows(
            table, reference, pool_seeds, sanity, _table_score(table, configs), clips
        )
        notes += clips
        for row in table_rows:
            row.update(
                table=number,
                score=score,
                heading=headings[key],
                table_id=key[0],
                seed=",".join(seeds) if pool_seeds else key[1],
                warnings=json.dumps(_warnings_of(table, warnings)),
                notes=json.dumps(notes),
                **{k: str(first[k]) for k in DESCRIPTIVE_KEYS},
            )
        rows.extend(table_rows)
    board = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    return board.reset_index(drop=True)


# -- rendering ------------------------------------------------------------------------------
#: how each paired test reads in a table's legend (:func:`evaluation.stats.paired_test`)
TEST_WORDS: dict[str, str] = {
    "t-episodes": "paired t over the episode means of the differences, G-1 df (queries of "
    "one episode share prototypes)",
    "wilcoxon": "Wilcoxon signed-rank over independent samples",
    "mcnemar-exact": "exact McNemar over independent samples",
}


def _is_true(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "1.0")


def _json_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value:
        return []
    return list(json.loads(value))


def format_cell(row: pd.Series | dict, decimals: int, n_common: int | None = None) -> str:
    """``mean [low, high]`` (bold when best), ``n=`` when fewer samples, ``worse ***``."""
    mean = float(row["mean"])
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.{decimals}f}"
    if _is_true(row["best"]):
        text = f"**{text}**"
    low, high = float(row["ci95_low"]), float(row["ci95_high"])
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{decimals}f}, {high:.{decimals}f}]"
    if n_common is not None and int(row["n"]) != n_common:
        text += f" (n={int(row['n'])})"
    p = float(row["p_holm"]) if row["p_holm"] == row["p_holm"] else math.nan
    if math.isfinite(p):
        mark = next((mark for level, mark in P_MARKERS if p < level), "")
        if mark and row["versus"] in ("better", "worse"):
            text += f" {row['versus']} {mark}"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``); ``|`` is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(r) for r in rows)])


def table_view(table: pd.DataFrame) -> dict[str, Any]:
    """What one leaderboard table shows (shared by Markdown and HTML).

    ``header`` and ``rows`` (cells as text, ``**`` marking bold), ``legend``, ``oracle``
    (lines), ``notes`` and ``warnings``. Entries that are identical on every sample are one
    row labelled ``a = b``.
    """
    table = table.assign(
        **{
            c: table[c].astype(object).where(table[c].notna(), "")
            for c in ("reference", "identical_to", "versus")
        }
    )
    reference = next((r for r in table["reference"] if r), "")
    metrics = list(dict.fromkeys(table["metric"]))
    flagged = {
        r.metric
        for r in table.itertuples()
        if r.oracle_separates is not None
        and str(r.oracle_separates) in ("False", "false", "0", "0.0")
    }
    order = table.groupby("method", sort=False)["rank"].mean().sort_values(kind="stable").index
    header = ["method"]
    for m in metrics:
        arrow = "↓" if metric_direction(m) == "lower" else "↑"
        name = "sanity ρ (fully randomised)" if m == "sanity" else m
        header.append(f"{name} {arrow}" + (" ⚠" if m in flagged else ""))
    header += ["n", "degenerate"]
    cells = table.set_index(["method", "metric"])
    decimals = {m: _decimals(table.loc[table["metric"] == m, "mean"]) for m in metrics}
    body, shown = [], set()
    for method in order:
        if method in shown:
            continue
        mine = table[table["method"] == method]
        group = mine["identical_to"].iloc[0]
        members = group.split(" = ") if group else [method]
        shown.update(members)
        label = " = ".join(f"{m} (ref)" if m == reference else m for m in members)
        per_sample = mine[mine["metric"] != "sanity"]
        n_common = int(per_sample["n_samples"].max()) if len(per_sample) else None
        values = [
            format_cell(cells.loc[(method, m)], decimals[m], None if m == "sanity" else n_common)
            if (method, m) in cells.index
            else "–"
            for m in metrics
        ]
        degenerate = float(mine["degenerate_rate"].astype(float).max())
        count = int(pd.to_numeric(mine["n_degenerate"], errors="coerce").fillna(0).max())
        body.append(
            [
                label,
                *values,
                str(n_common) if n_common is not None else "–",
                f"{count} ({degenerate:.1%})" if math.isfinite(degenerate) else "–",
            ]
        )
    kinds = sorted(set(table.loc[table["metric"] != "sanity", "interval"]))
    legend = (
        f"Mean [95% interval: {', '.join(kinds)}]; bold: best, unless tied at the shown "
        "rounding; (n=k): the metric used k of the n samples."
    )
    legend += " degenerate: rows whose map is constant or non-finite (share of n)."
    if reference:
        tests = sorted({t for t in table["test"] if isinstance(t, str) and t})
        words = "; ".join(f"`{t}`: {TEST_WORDS.get(t, t)}" for t in tests)
        legend += (
            f" better/worse than `{reference}` with Holm-corrected p-values on paired "
            f"samples ({words}): * p<0.05, ** p<0.01, *** p<0.001 (none where the means "
            "are equal at the shown rounding)."
        )
    else:
        legend += " No reference method in this table, so no paired tests."
    oracle = []
    checked = table.drop_duplicates("metric")
    checked = checked[
        checked["oracle_separates"].map(lambda v: v is not None and v == v and v != "")
    ]
    if len(checked):
        good = [r.metric for r in checked.itertuples() if _is_true(r.oracle_separates)]
        bad = [r.metric for r in checked.itertuples() if not _is_true(r.oracle_separates)]
        if good:
            oracle.append(
                "Ground-truth check: `mask` beats `random` (paired, p<0.05) on "
                + ", ".join(good)
                + "."
            )
        if bad:
            oracle.append(
                "⚠ " + ", ".join(bad) + ": does not separate the ground truth from random "
                "here; do not trust its ranking on this setup."
            )
    first = table.iloc[0]
    per_sample = table[table["metric"] != "sanity"]
    seeds = pd.to_numeric(per_sample["n_seeds"], errors="coerce").fillna(1).clip(lower=1)
    samples = pd.to_numeric(per_sample["n_samples"], errors="coerce").fillna(0)
    n = int((samples / seeds).max()) if len(per_sample) else 0
    score = first["score"] if "score" in table.columns else ""
    return {
        "label": table_label(
            str(first["experiment"]), n, "" if score != score else str(score), int(seeds.max())
        ),
        "heading": str(first["heading"]),
        "table_id": str(first["table_id"]),
        "seed": str(first["seed"]) if first["seed"] == first["seed"] else "",
        "header": header,
        "rows": body,
        "legend": legend,
        "oracle": oracle,
        "notes": _json_list(first["notes"]),
        "warnings": _json_list(first["warnings"]),
    }


#: the line above every results table, ``Table: experiment=NAME n=N score=SCORE`` (plus
#: `` seeds=K`` when seeds are pooled; ``n`` is then per seed): README tests parse it
TABLE_LABEL = re.compile(
    r"^Table: experiment=(?P<experiment>\S+) n=(?P<n>\d+) score=(?P<score>\S*)"
    r"(?: seeds=(?P<seeds>\d+))?$"
)


def table_label(experiment: str, n: int, score: str, seeds: int = 1) -> str:
    """The parseable line that labels a results table (:data:`TABLE_LABEL`): the
    experiment (``conf/experiment/<name>.yaml``), samples per seed, and the score the
    metrics read (``metric.score``)."""
    text = f"Table: experiment={experiment or '-'} n={n} score={score or '-'}"
    return text + (f" seeds={seeds}" if seeds > 1 else "")


def views(board: pd.DataFrame) -> list[dict[str, Any]]:
    """:func:`table_view` of every table of a board, in table order."""
    return [table_view(t) for _, t in board.groupby("table", sort=True)]


def to_markdown(board: pd.DataFrame) -> str:
    """Render a :func:`build_leaderboard` frame (or its CSV read back) as Markdown."""
    if board.empty:
        return "No results.\n"
    parts = ["# Leaderboard", ""]
    for view in views(board):
        ident = f"table `{view['table_id']}`" + (f", seed {view['seed']}" if view["seed"] else "")
        parts += [f"## {view['heading']}", "", f"{ident}.", "", view["label"], ""]
        parts += [markdown_table(view["header"], view["rows"]), "", view["legend"], ""]
        parts += [f"{line}" for line in view["oracle"]] + ([""] if view["oracle"] else [])
        parts += [f"- note: {n}" for n in view["notes"]] + ([""] if view["notes"] else [])
        parts += [f"- **warning** {w}" for w in view["warnings"]]
        parts += [""] if view["warnings"] else []
    return "\n".join(parts)


def write_leaderboard(board: pd.DataFrame, out: str | Path, html: bool = True) -> tuple[Path, Path]:
    """Write ``leaderboard.csv``, ``leaderboard.md`` (and ``leaderboard.html``) into ``out``.

    Returns the CSV and Markdown paths.
    """
    out = Path(out)
    csv_path, md_path = out / "leaderboard.csv", out / "leaderboard.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        board.to_csv(csv_path, index=False)
        md_path.write_text(to_markdown(board), encoding="utf-8")
        if html:
            from evaluation.report import write_leaderboard_report

            write_leaderboard_report(board, out / "leaderboard.html")
    except OSError as err:
        raise FamBenchError(
            f"The leaderboard cannot be written to {out} ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}). Choose a writable folder "
            "with --out <folder>."
        ) from None
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.leaderboard",
        description="Merge run outputs (folders holding results.csv) into a leaderboard.",
    )
    parser.add_argument("dirs", nargs="+", help="run output folders, searched recursively")
    parser.add_argument("--out", default="outputs/leaderboard", help="where to write")
    parser.add_argument("--reference", default="fam", help="method the others are tested against")
    parser.add_argument(
        "--pool-seeds",
        action="store_true",
        help="pool the seeds of one configuration as a seed level (mean and interval over seeds)",
    )
    args = parser.parse_args(argv)
    board = build_leaderboard(
        load_results(args.dirs), reference=args.reference, pool_seeds=args.pool_seeds
    )
    if args.reference not in set(board["method"]):
        print(
            f"note: reference method {args.reference!r} is in none of the runs; "
            "no paired tests (choose one with --reference).",
            file=sys.stderr,
        )
    csv_path, md_path = write_leaderboard(board, args.out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path}, {md_path} and leaderboard.html", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
