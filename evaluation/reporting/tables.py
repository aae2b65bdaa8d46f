"""The leaderboard frame: one row per table x method entry x metric, with its statistics.

:func:`build_leaderboard` groups the rows into tables and entries
(:mod:`evaluation.reporting.pooling`) and computes each cell. With ``pool_seeds`` the
seeds of one configuration form a seed level: the entry's value is the mean of its
per-seed means and the interval the t interval over seeds (``t-seeds``); ``n`` stays the
number of samples and ``n_seeds`` says how many seeds.

Statistics (:mod:`evaluation.stats`): Wilson intervals for binary metrics, t intervals
otherwise; for few-shot the clustered t interval over episodes (clipped to [0, 1] for
binary metrics). Paired tests of every entry against the reference on the samples both
scored (paired by seed and ``sample_id``), chosen by the table's design: for few-shot a
paired t over episode-mean differences (``t-episodes``), otherwise exact McNemar for
binary metrics and Wilcoxon signed-rank for continuous ones; Holm-corrected over all
comparisons of a table; each table's legend names its tests. Per-sample differences
within the metric's identity tolerance (float noise) count as none. Each cell gives the
direction against the reference (better or worse) beside its stars. Ranks use the means
rounded as displayed (:func:`evaluation.reporting.render.display_decimals`), so float
noise never ranks; bold marks the best only when no other entry ties it at that
rounding. ``n`` is given per metric. The sanity column is the mean rank correlation
after full randomisation (lower is better). The ground-truth oracle (``mask`` vs
``random``, paired, Holm over the table's metrics) flags metrics that do not separate
the two. The degenerate column counts the rows whose map is constant or non-finite.
Entries with identical values on every sample are listed as one row (e.g.
``fam_ablation = fam (weights=abs_sum)`` under a dot product, where the drop is the
share), not as rivals. Warnings the runs wrote (``warnings.json``) are shown beside their
table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evaluation import registry, stats
from evaluation.reporting.loading import check_columns
from evaluation.reporting.pooling import (
    DESCRIPTIVE_KEYS,
    dedupe,
    entry_labels,
    normalise,
    table_headings,
)
from evaluation.reporting.render import display_decimals
from evaluation.summary import (
    centre_prior_warning,
    cluster_column,
    full_randomisation,
    identical_groups,
    identity_tolerance,
    metric_columns,
    oracle_check,
    paired_clusters,
    summarise_sanity,
)

SAMPLE_KEYS: tuple[str, ...] = ("seed", "sample_id")


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
        decimals = display_decimals(pd.Series([r["mean"] for r in group], dtype=float))
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
    """Aggregate per-sample results into a tidy leaderboard (the rules:
    :mod:`evaluation.reporting.pooling` and this module's docstring).

    ``results``: ``results.csv`` rows (``run``, ``table_id``, ``seed``, ``settings_id``,
    ``method_options``, ``experiment`` ... optional; see
    :func:`evaluation.reporting.pooling.normalise`). ``sanity``, ``warnings``,
    ``configs``: as :func:`evaluation.reporting.loading.load_results` puts them in
    ``results.attrs`` (used when not given). Returns one row per table x entry x metric
    with :data:`LEADERBOARD_COLUMNS`; ``table`` numbers the tables in heading order.
    """
    check_columns(results)
    attrs = dict(results.attrs)
    sanity = attrs.get("sanity") if sanity is None else sanity
    warnings = attrs.get("warnings") or {} if warnings is None else warnings
    configs = attrs.get("configs") or {} if configs is None else configs
    frame, global_notes = normalise(results, configs)
    non_finite = (
        frame["degenerate_reason"].astype(str) == "non-finite"
        if "degenerate_reason" in frame.columns
        else pd.Series(False, index=frame.index)
    )
    for column in metric_columns(frame):
        # Non-finite maps are excluded (and counted in n_excluded), never scored.
        frame[column] = pd.to_numeric(frame[column], errors="coerce").mask(non_finite)
    frame, dedupe_notes = dedupe(frame)
    if sanity is not None and "run" not in sanity.columns:
        sanity = sanity.assign(run="")

    table_keys = ["table_id"] if pool_seeds else ["table_id", "seed"]
    tables: dict[tuple, pd.DataFrame] = {}
    for key, table in frame.groupby(table_keys, sort=True):
        key = (key[0], "") if pool_seeds else tuple(key)
        table = table.copy()
        table["label_"] = entry_labels(table)
        tables[key] = table
    headings = table_headings(tables, configs)

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
