"""One run's summary (``summary.csv``), and the pieces the leaderboard shares with it.

:func:`summarise` gives, per method entry and metric column, the mean with a 95%
interval chosen by :func:`evaluation.stats.interval` (Wilson for binary metrics, t for
continuous ones; episode-aware for few-shot, whose queries share prototypes), the count
``n`` it used and ``n_excluded`` (NaN values: an empty mask, a zero map for the energy
game, a non-finite map). Rows flagged ``degenerate_reason == "non-finite"`` are always
excluded; constant maps stay in (under ``metric.ties=smooth`` they score exactly as the
``random`` map of the sample, which is what an uninformative map deserves). Extra rows per method:
``<metric>_class_mean`` for metrics with :attr:`~evaluation.registry.MetricSpec.class_mean`
(``pointing_game_class_mean``, TorchRay's second number: the mean over classes of each
class's hit rate, t interval over classes) and ``degenerate`` (share of degenerate maps,
Wilson). With a ``sanity`` frame, ``metric == "sanity@<layer>"`` rows give the mean
Spearman correlation at each randomised layer (``step`` 1 = output layer only, the last
step = every layer randomised), and ``metric == "sanity"`` the value after the last step.

The ground-truth oracle (:func:`oracle_check`): with methods ``mask`` (the ground truth)
and ``random`` present, every metric is tested paired, ``mask`` against ``random``, with
the table's test (:func:`evaluation.stats.paired_test`: over episodes for few-shot), and
the p-values are Holm-corrected across the metrics of the table (``oracle_p``); a metric
under which the true object does not beat a random map (better mean and Holm p < 0.05)
is flagged ``oracle_separates == False``: it does not separate the ground truth from
random on this setup, so its ranking is not to be trusted here.

Identity by scale (:func:`identity_tolerance`): two entries are identical on a metric
when every per-sample difference is at most the metric's tolerance: the spec's explicit
``identical_tolerance``, else :data:`IDENTICAL_RTOL` of the metric's range over the table
(binary metrics: exact). Paired tests count such differences as zero, so float noise
between mathematically equal methods never yields a star.

Method entries: two rows of one method name with different ``method_options`` are two
entries, labelled by the options that differ (``fam (contribution=product)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evaluation import registry, stats
from fam.errors import FamBenchError

ORACLE, FLOOR = "mask", "random"
ORACLE_ALPHA = 0.05
#: the centre-prior floor, and the methods that explain nothing (floors and the oracle)
CENTRE = "center"
NOT_EXPLAINING = frozenset({CENTRE, FLOOR, ORACLE})
#: the centre floor's pointing game this close to the best method's warns (5 points)
CENTRE_MARGIN = 0.05
#: tasks whose samples share a reference set: few-shot queries of one episode share prototypes
CLUSTER_BY_TASK: dict[str, str] = {"fewshot": "episode"}
#: share of a metric's range over the table under which two per-sample values count as
#: identical (float noise): reassociating FAM's channel sum moves maps by 6e-7 and, through
#: the pixels it reorders, single deletion AUCs by up to 0.4% of their range on a Conv-4
IDENTICAL_RTOL = 1e-2
IDENTICAL_MIN_SAMPLES = 5
CONSTANT_COLUMNS: tuple[str, ...] = (
    "experiment",
    "dataset",
    "model",
    "task",
    "table_id",
    "model_id",
    "seed",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "method",
    "metric",
    "mean",
    "ci95_low",
    "ci95_high",
    "interval",
    "n",
    "n_excluded",
    "layer",
    "step",
    "oracle_p",
    "oracle_separates",
    "settings_id",
)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The per-sample metric columns of a results frame, in registry order."""
    order = {name: i for i, name in enumerate(registry.available())}
    cols = [c for c in frame.columns if registry.is_metric_column(c)]
    return sorted(cols, key=lambda c: (order[registry.spec_of(c).name], c))


def _options(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {"options": str(raw)}
    return value if isinstance(value, dict) else {"options": value}


def method_labels(results: pd.DataFrame) -> pd.Series:
    """Entry label per row: the method name, plus the options that tell apart its entries.

    ``fam`` run with ``{"contribution": "ablation"}`` and ``{"contribution": "product"}``
    gives ``fam (contribution=ablation)`` and ``fam (contribution=product)``.
    """
    if "method_options" not in results.columns:
        return results["method"].astype(str)
    raw = results["method_options"].astype(object).where(results["method_options"].notna(), "")
    labels = results["method"].astype(str).copy()
    for method, idx in results.groupby("method", sort=False).groups.items():
        variants = {str(v): _options(v) for v in raw.loc[idx].unique()}
        if len(variants) < 2:
            continue
        keys = sorted({k for opts in variants.values() for k in opts})
        varying = [k for k in keys if len({json.dumps(o.get(k)) for o in variants.values()}) > 1]
        names = {
            text: f"{method} ({', '.join(f'{k}={opts.get(k)}' for k in varying)})"
            for text, opts in variants.items()
        }
        labels.loc[idx] = raw.loc[idx].map(lambda v, names=names: names[str(v)])
    return labels


def cluster_column(results: pd.DataFrame) -> str | None:
    """The column whose values group dependent samples (``episode`` for few-shot), or None."""
    if "task" not in results.columns or "episode" not in results.columns:
        return None
    tasks = set(results["task"].dropna().astype(str))
    columns = {CLUSTER_BY_TASK.get(t) for t in tasks}
    column = columns.pop() if len(columns) == 1 else None
    if column is None or results[column].isna().all():
        return None
    return column


def _usable(frame: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce").astype(float)
    if "degenerate_reason" in frame.columns:
        values = values.where(frame["degenerate_reason"].astype(str) != "non-finite")
    return values


def _row(
    method: str, metric: str, values: pd.Series, binary: bool, clusters, scale: float = 1.0
) -> dict:
    """``scale``: binary values are hits times ``scale`` (1, or 100 for a percentage)."""
    n_total = len(values)
    found = stats.interval(values.to_numpy(float) / scale, binary, clusters)
    return {
        "method": method,
        "metric": metric,
        "mean": found.mean * scale,
        "ci95_low": found.low * scale,
        "ci95_high": found.high * scale,
        "interval": found.kind,
        "n": found.n,
        "n_excluded": n_total - found.n,
    }


def paired(
    frame: pd.DataFrame, a: str, b: str, column: str, keys: Sequence[str], label: str = "label_"
) -> tuple[np.ndarray, np.ndarray]:
    """Values of entries ``a`` and ``b`` on the samples both scored, matched on ``keys``."""
    keys = list(keys)
    ours = frame.loc[frame[label] == a, [*keys, column]]
    theirs = frame.loc[frame[label] == b, [*keys, column]]
    pairs = ours.merge(theirs, on=keys, suffixes=("_a", "_b")).dropna(
        subset=[f"{column}_a", f"{column}_b"]
    )
    return pairs[f"{column}_a"].to_numpy(float), pairs[f"{column}_b"].to_numpy(float)


def paired_clusters(
    frame: pd.DataFrame,
    a: str,
    b: str,
    column: str,
    keys: Sequence[str],
    cluster: str | None,
    label: str = "label_",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`paired` plus each pair's cluster (``None`` without ``cluster``); with a
    ``seed`` key the cluster is ``seed/episode`` (episodes of two seeds are two)."""
    if cluster is None:
        return (*paired(frame, a, b, column, keys, label), None)
    keys = list(keys)
    columns = [*dict.fromkeys([*keys, cluster]), column]
    ours = frame.loc[frame[label] == a, columns]
    theirs = frame.loc[frame[label] == b, [*keys, column]]
    pairs = ours.merge(theirs, on=keys, suffixes=("_a", "_b")).dropna(
        subset=[f"{column}_a", f"{column}_b"]
    )
    groups = pairs[cluster].astype(str)
    if "seed" in pairs.columns and "seed" != cluster:
        groups = pairs["seed"].astype(str) + "/" + groups
    return (
        pairs[f"{column}_a"].to_numpy(float),
        pairs[f"{column}_b"].to_numpy(float),
        groups.to_numpy(),
    )


def identity_tolerance(frame: pd.DataFrame, column: str) -> float:
    """Per-sample difference of ``column`` that counts as none (module docstring)."""
    spec = registry.spec_of(column)
    if spec.identical_tolerance is not None:
        return float(spec.identical_tolerance)
    if spec.binary:
        return 0.0
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    return IDENTICAL_RTOL * float(values.max() - values.min())


def _prepared(results: pd.DataFrame) -> pd.DataFrame:
    frame = results.copy()
    frame.attrs = {}  # pandas compares attrs on merge; DataFrames there break it
    frame["label_"] = method_labels(frame)
    for column in metric_columns(frame):
        frame[column] = _usable(frame, column)
    return frame


def oracle_check(
    results: pd.DataFrame,
    keys: Sequence[str] = ("sample_id",),
    label: str = "label_",
    cluster: str | None = "auto",
) -> pd.DataFrame:
    """Per metric column: does ``mask`` beat ``random``, paired? (module docstring).

    Columns ``metric, oracle_mean, floor_mean, n_pairs, test, oracle_p_raw, oracle_p``
    (Holm over the table's metrics), ``oracle_separates``; empty when either method is
    missing. ``cluster``: as :func:`summarise`.
    """
    frame = results if label in results.columns else _prepared(results)
    cluster = cluster_column(frame) if cluster == "auto" else cluster
    columns = [
        "metric",
        "oracle_mean",
        "floor_mean",
        "n_pairs",
        "test",
        "oracle_p_raw",
        "oracle_p",
        "oracle_separates",
    ]
    labels = set(frame[label])
    if ORACLE not in labels or FLOOR not in labels:
        return pd.DataFrame(columns=columns)
    rows = []
    for column in metric_columns(frame):
        x, y, clusters = paired_clusters(frame, ORACLE, FLOOR, column, keys, cluster, label)
        if x.size == 0:
            continue
        p, test = stats.paired_test(
            x, y, registry.is_binary(column), clusters, identity_tolerance(frame, column)
        )
        better = (
            x.mean() < y.mean() if registry.direction(column) == "lower" else (x.mean() > y.mean())
        )
        rows.append(
            {
                "metric": column,
                "oracle_mean": float(x.mean()),
                "floor_mean": float(y.mean()),
                "n_pairs": int(x.size),
                "test": test,
                "oracle_p_raw": p,
                "better_": bool(better),
            }
        )
    out = pd.DataFrame(rows, columns=[*columns, "better_"])
    out["oracle_p"] = stats.holm(out["oracle_p_raw"].to_numpy(float)) if rows else []
    out["oracle_separates"] = [
        bool(b and p < ORACLE_ALPHA) for b, p in zip(out["better_"], out["oracle_p"], strict=True)
    ]
    return out[columns]


def centre_prior_warning(results: pd.DataFrame) -> dict | None:
    """The ``centre_prior`` warning, or ``None``: the ``center`` floor's pointing game is
    within :data:`CENTRE_MARGIN` of the best explaining method's, or above it.

    A centred Gaussian is no explanation; when it points as well as the best method, the
    hit radius (``metric.tolerance``) covers so much of the image that pointing near the
    middle is a hit, and the pointing game does not tell the methods apart on these
    images. Floors and the oracle (``random``, ``center``, ``mask``) are not candidates
    for the best method; entries are told apart by their options (:func:`method_labels`)."""
    if "pointing_game" not in results.columns or CENTRE not in set(results["method"]):
        return None
    frame = results if "label_" in results.columns else _prepared(results)
    values = _usable(frame, "pointing_game")
    means = values.groupby(frame["label_"]).mean().dropna()
    explaining = set(frame.loc[~frame["method"].isin(NOT_EXPLAINING), "label_"])
    candidates = means[means.index.isin(explaining)]
    centre = means.get(CENTRE)
    if candidates.empty or centre is None:
        return None
    best = str(candidates.idxmax())
    if centre < candidates[best] - CENTRE_MARGIN:
        return None
    return {
        "code": "centre_prior",
        "metric": "pointing_game",
        "message": (
            f"the center floor's pointing game ({centre:.3f}) is within "
            f"{CENTRE_MARGIN * 100:.0f} points of the best method's ({best} "
            f"{candidates[best]:.3f}) or above it: the tolerance is too large for the image "
            "size, so any map that peaks near the middle scores a hit. Lower "
            "metric.tolerance (the hit radius, in pixels at metric.tolerance_image_size) "
            "for these images; until then the pointing game does not rank the methods."
        ),
    }


def identical_groups(
    results: pd.DataFrame, keys: Sequence[str] = ("sample_id",), label: str = "label_"
) -> list[list[str]]:
    """Groups of entries with the same values of every metric on every sample.

    Every per-sample difference within the metric's :func:`identity_tolerance` (binary
    columns equal, continuous ones within a share of the metric's range); NaN must match
    NaN. Such methods produced the same maps (e.g. FAM and Relevance-CAM under the
    ProtoNet distance with a GAP embedding) and are not rivals. Only groups of two or
    more, each in first-appearance order.
    """
    frame = results if label in results.columns else _prepared(results)
    columns = metric_columns(frame)
    if not columns:
        return []
    wide = frame.pivot_table(
        index=list(keys), columns=label, values=columns, aggfunc="first", dropna=False
    )
    labels = list(dict.fromkeys(frame[label]))
    if len(wide) < IDENTICAL_MIN_SAMPLES:
        return []
    tolerance = {column: identity_tolerance(frame, column) for column in columns}

    def same(a: str, b: str) -> bool:
        for column in columns:
            if (column, a) not in wide.columns or (column, b) not in wide.columns:
                return False
            x, y = wide[(column, a)].to_numpy(float), wide[(column, b)].to_numpy(float)
            if not np.array_equal(np.isnan(x), np.isnan(y)):
                return False
            if np.any(np.abs(x[~np.isnan(x)] - y[~np.isnan(y)]) > tolerance[column]):
                return False
        return True

    groups: list[list[str]] = []
    for name in labels:
        for group in groups:
            if same(group[0], name):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def summarise_sanity(sanity: pd.DataFrame, label: str = "method") -> pd.DataFrame:
    """Mean Spearman correlation (trained vs randomised maps) per method and cascade step.

    ``sanity``: :meth:`evaluation.sanity.SanityResult.to_frame` rows with a ``method``
    column. One row per method and step: ``metric == "sanity"``, ``layer`` (the layer
    randomised at that step, every layer above it randomised too), ``step``, mean, t
    interval over samples, ``n``. Lower is better (the maps should change).
    """
    rows = []
    for (method, step), group in sanity.groupby([label, "step"], sort=False):
        values = pd.to_numeric(group["spearman"], errors="coerce")
        row = _row(str(method), "sanity", values, binary=False, clusters=None)
        row.update(layer=str(group["layer"].iloc[0]), step=int(step))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["method", "step"], kind="stable").reset_index(drop=True)


def full_randomisation(sanity_summary: pd.DataFrame) -> pd.DataFrame:
    """Each method's sanity row after the last cascade step (every layer randomised)."""
    if sanity_summary.empty:
        return sanity_summary
    last = sanity_summary.groupby("method")["step"].transform("max")
    return sanity_summary[sanity_summary["step"] == last].reset_index(drop=True)


def summarise(
    results: pd.DataFrame,
    sanity: pd.DataFrame | None = None,
    cluster: str | None = "auto",
    split: str | None = None,
) -> pd.DataFrame:
    """One run's ``summary.csv`` (module docstring): one row per method entry and metric.

    ``results``: the run's ``results.csv`` frame. ``sanity``: its ``sanity.csv`` frame or
    ``None``. ``cluster``: column grouping dependent samples; ``"auto"`` takes ``episode``
    for few-shot (:data:`CLUSTER_BY_TASK`), ``None`` treats samples as independent.
    ``split``: a results column (e.g. ``"correct"``): one summary per value of it, that
    value in a column of the same name (the run-level sanity rows are not split).
    Columns :data:`SUMMARY_COLUMNS` plus the run's constant columns (experiment, dataset,
    model, task, table_id, model_id, seed) where present.
    """
    if split is not None:
        if split not in results.columns:
            raise FamBenchError(
                f"cannot split the summary by {split!r}: results have no such column "
                f"(columns: {sorted(results.columns)})."
            )
        parts = [
            summarise(group, None, cluster).assign(**{split: value})
            for value, group in results.groupby(split, sort=True)
        ]
        return pd.concat(parts, ignore_index=True)
    frame = _prepared(results)
    cluster = cluster_column(frame) if cluster == "auto" else cluster
    columns = metric_columns(frame)
    oracle = oracle_check(frame).set_index("metric")
    rows = []
    for method, group in frame.groupby("label_", sort=False):
        clusters = group[cluster].to_numpy() if cluster else None
        settings = group["settings_id"].iloc[0] if "settings_id" in group else ""
        for column in columns:
            spec = registry.spec_of(column)
            row = _row(method, column, group[column], spec.binary, clusters, spec.scale)
            if column in oracle.index:
                row.update(
                    oracle_p=oracle.loc[column, "oracle_p"],
                    oracle_separates=bool(oracle.loc[column, "oracle_separates"]),
                )
            rows.append({**row, "settings_id": settings})
            if column == spec.name and spec.class_mean and "label" in group:
                per_class = group.groupby("label")[column].mean()
                rows.append(
                    {
                        **_row(method, f"{column}_class_mean", per_class, False, None),
                        "interval": "t-classes",
                        "settings_id": settings,
                    }
                )
        if "degenerate" in group:
            flags = group["degenerate"].map(lambda v: str(v).lower() in ("true", "1", "1.0"))
            rows.append(
                {
                    **_row(method, "degenerate", flags.astype(float), True, None),
                    "settings_id": settings,
                }
            )
    if sanity is not None and not sanity.empty:
        cascade = summarise_sanity(sanity)
        last = full_randomisation(cascade)
        # One metric name per row (``sanity@<layer>``, and ``sanity`` after the whole
        # cascade) so that summary.pivot(index="method", columns="metric") stays unique.
        for row in [
            *cascade.assign(metric="sanity@" + cascade["layer"]).to_dict("records"),
            *last.to_dict("records"),
        ]:
            match = frame.loc[frame["method"] == row["method"], "settings_id"]
            rows.append({**row, "settings_id": match.iloc[0] if len(match) else ""})
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for column in CONSTANT_COLUMNS:
        if column in results.columns and results[column].nunique(dropna=False) == 1:
            out[column] = results[column].iloc[0]
    return out
