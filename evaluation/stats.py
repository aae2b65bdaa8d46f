"""Intervals and paired tests for per-sample metric values (statsmodels and scipy do the work).

Which interval a column gets (:func:`interval`):

- binary metrics (``registry.is_binary``: pointing game, increase in confidence) get the
  **Wilson** score interval, which stays inside [0, 1] (a Student-t interval on 0/1 hits
  does not: 0.94 +- 0.068 on the default run);
- continuous metrics get the **Student-t** interval of the mean;
- samples that share a reference (few-shot queries of one episode share prototypes) are
  not independent. With ``clusters`` given, the interval respects them:
  ``t-episodes`` is the cluster-robust (CR1) t interval of the sample mean with
  ``G - 1`` degrees of freedom for ``G`` episodes (statsmodels OLS on a constant with
  ``cov_type="cluster"``; with equal episode sizes it is the t interval over episode
  means); ``wilson-episodes`` is the Wilson interval at the effective sample size
  ``n / deff``, where the design effect ``deff = max(1, var_cluster / var_iid)`` comes from
  the same cluster-robust variance (Korn and Graubard's effective-n Wilson interval).
  Chosen over a cluster bootstrap because runs have few episodes (5 by default): a
  bootstrap over 5 clusters underestimates the variance by ``(G - 1) / G`` and has no
  small-sample correction, while the t interval with ``G - 1`` degrees of freedom is
  exact for normal episode means and deterministic (no seed to report).

Paired tests (:func:`paired_test`): exact McNemar (statsmodels) for binary metrics,
Wilcoxon signed-rank (scipy defaults: two-sided, zero differences dropped) for
continuous ones; identical values are no evidence of a difference (p = 1). Holm's
correction (:func:`holm`) is statsmodels' ``multipletests(method="holm")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean and 95% interval of ``n`` finite values; ``kind`` names the interval."""

    mean: float
    low: float
    high: float
    n: int
    kind: str


def _finite(values, clusters=None) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    if clusters is None:
        return values[keep], None
    return values[keep], np.asarray(clusters, dtype=object)[keep]


def wilson(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``successes`` hits out of ``n`` (within [0, 1]).

    ``n`` may be an effective (non-integer) sample size; NaN bounds for ``n == 0``.
    """
    if n <= 0:
        return math.nan, math.nan
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    # Exact at the extremes (statsmodels leaves float noise such as 2e-19 for 0 hits).
    low = 0.0 if successes <= 0 else max(float(low), 0.0)
    high = 1.0 if successes >= n else min(float(high), 1.0)
    return low, high


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of the finite ``values`` (NaN bounds for n < 2)."""
    x, _ = _finite(values)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "t")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "t")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, "t")


def cluster_se(values: np.ndarray, clusters: np.ndarray) -> tuple[float, int]:
    """Cluster-robust (CR1) standard error of the mean and the number of clusters ``G``.

    statsmodels OLS of ``values`` on a constant with ``cov_type="cluster"`` (its default
    small-sample correction ``G/(G-1) * (n-1)/(n-1)``). NaN with fewer than two clusters.
    """
    import statsmodels.api as sm

    codes, _ = _codes(clusters)
    g = int(codes.max()) + 1 if codes.size else 0
    if g < 2:
        return math.nan, g
    fit = sm.OLS(values, np.ones((values.size, 1))).fit(
        cov_type="cluster", cov_kwds={"groups": codes}
    )
    return float(fit.bse[0]), g


def _codes(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return codes, uniques


def clustered_t_interval(values, clusters, confidence: float = CONFIDENCE) -> Interval:
    """Cluster-robust t interval of the mean, ``G - 1`` degrees of freedom (module docstring)."""
    x, c = _finite(values, clusters)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "t-episodes")
    mean = float(x.mean())
    se, g = cluster_se(x, c)
    if not math.isfinite(se):
        return Interval(mean, math.nan, math.nan, n, "t-episodes")
    half = float(stats.t.ppf(0.5 + confidence / 2, g - 1) * se)
    return Interval(mean, mean - half, mean + half, n, "t-episodes")


def wilson_interval(values, clusters=None, confidence: float = CONFIDENCE) -> Interval:
    """Wilson interval of the hit rate of 0/1 ``values``; at the effective n with ``clusters``."""
    x, c = _finite(values, clusters)
    n = int(x.size)
    kind = "wilson" if clusters is None else "wilson-episodes"
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, kind)
    p = float(x.mean())
    n_eff = float(n)
    if c is not None and 0.0 < p < 1.0 and n > 1:
        se, _ = cluster_se(x, c)
        iid_var = p * (1 - p) / n
        if math.isfinite(se):
            n_eff = n / max(1.0, se**2 / iid_var)
    low, high = wilson(p * n_eff, n_eff, confidence)
    return Interval(p, low, high, n, kind)


def interval(values, binary: bool, clusters=None, confidence: float = CONFIDENCE) -> Interval:
    """The interval a metric column gets (module docstring); ``binary`` values are 0/1."""
    if binary:
        return wilson_interval(values, clusters, confidence)
    if clusters is not None:
        return clustered_t_interval(values, clusters, confidence)
    return t_interval(values, confidence)


def mcnemar_exact(x, y) -> float:
    """Exact McNemar p-value of paired 0/1 outcomes ``x``, ``y`` (statsmodels; 1 if no discordant
    pair)."""
    x = np.asarray(x, dtype=float) > 0.5
    y = np.asarray(y, dtype=float) > 0.5
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    if b + c == 0:
        return 1.0
    table = [[int(np.sum(x & y)), b], [c, int(np.sum(~x & ~y))]]
    return float(mcnemar(table, exact=True).pvalue)


def wilcoxon(x, y) -> float:
    """Wilcoxon signed-rank p-value of paired ``x``, ``y`` (scipy; 1 if all differences are 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0:
        return math.nan
    if np.all(x == y):
        # scipy returns NaN with a warning here; identical scores are no evidence of a difference.
        return 1.0
    return float(stats.wilcoxon(x, y).pvalue)


def paired_test(x, y, binary: bool) -> tuple[float, str]:
    """p-value and test name of paired samples: exact McNemar if ``binary``, else Wilcoxon."""
    if np.asarray(x).size == 0:
        return math.nan, ""
    if binary:
        return mcnemar_exact(x, y), "mcnemar-exact"
    return wilcoxon(x, y), "wilcoxon"


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (statsmodels); NaN entries stay NaN and do not count."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method="holm")[1]
    return adjusted
