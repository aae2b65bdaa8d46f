"""Per-run summary statistics: one row per method and metric (``summary.csv``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from evaluation.registry import is_metric_column


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and Student-t 95% half-width of ``values`` (nan half-width for n < 2)."""
    from scipy import stats

    n = len(values)
    mean = float(values.mean()) if n else math.nan
    half = math.nan
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, half


def summarise(results: pd.DataFrame, sanity: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method and metric: mean, t-based 95% CI, n, n_excluded."""

    def row(method: str, metric: str, values: np.ndarray) -> dict:
        values = values.astype(float)
        valid = values[~np.isnan(values)]
        mean, half = t_interval(valid)
        return {
            "method": method,
            "metric": metric,
            "mean": mean,
            "ci95_low": mean - half,
            "ci95_high": mean + half,
            "n": len(valid),
            "n_excluded": len(values) - len(valid),
        }

    metric_columns = [c for c in results.columns if is_metric_column(c)]
    out = []
    for method, group in results.groupby("method", sort=False):
        for metric in metric_columns:
            out.append(row(method, metric, group[metric].to_numpy()))
            if metric == "pointing_game":
                per_class = group.groupby("label")[metric].mean().to_numpy()
                out.append(row(method, "pointing_game_class_mean", per_class))
        out.append(row(method, "degenerate", group["degenerate"].to_numpy(float)))
    frame = pd.DataFrame(out)
    for col in ("settings_id", "experiment", "dataset", "model", "task"):
        if col in results:
            frame[col] = results[col].iloc[0]
    return frame
