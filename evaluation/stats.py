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
  means). Binary metrics get the same interval clipped to [0, 1]
  (``t-episodes-clipped``); when every sample is a hit (or none is) that interval has no
  width, so they get the Wilson interval with the ``G`` episodes as the sample size
  (``wilson-G``: as if each episode were one observation, the most an episode can count
  for). Chosen over the Wilson interval at an effective ``n`` (the design effect is
  undefined at p = 0 or 1, where it silently applied no correction) and over a cluster
  bootstrap (runs have few episodes, 5 by default: a bootstrap over 5 clusters
  underestimates the variance by ``(G - 1) / G``), because the t interval with ``G - 1``
  degrees of freedom is exact for normal episode means and deterministic.

Paired tests (:func:`paired_test`), so that a table's stars respect its design:

- independent samples (retrieval, contrastive queries): exact McNemar (statsmodels) for
  binary metrics, Wilcoxon signed-rank (scipy defaults: two-sided, zero differences
  dropped) for continuous ones;
- clustered samples (few-shot queries of one episode share prototypes): a paired t test
  on the ``G`` episode means of the differences, ``G - 1`` degrees of freedom
  (``t-episodes``), for binary and continuous metrics alike. Not an exact sign-flip
  permutation over episodes: with the default 5 episodes its smallest possible p-value
  is 2/32 = 0.0625, so it could never reject at 0.05; the t test is exact for normal
  episode means, and a simulation (``tests/test_stats.py``) holds its false-positive
  rate at 5% where per-query tests treat correlated queries as independent.

Per-sample differences within ``tolerance`` (:func:`evaluation.summary.identity_tolerance`:
float noise) count as zero; identical values are no evidence of a difference (p = 1).
Holm's correction (:func:`holm`) is statsmodels' ``multipletests(method="holm")``.
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


def wilson_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Wilson interval of the hit rate of independent 0/1 ``values``."""
    x, _ = _finite(values)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "wilson")
    p = float(x.mean())
    low, high = wilson(p * n, n, confidence)
    return Interval(p, low, high, n, "wilson")


def clustered_binary_interval(values, clusters, confidence: float = CONFIDENCE) -> Interval:
    """Hit rate of 0/1 ``values`` in episodes: the clustered t interval clipped to [0, 1],
    or at p = 0 or 1 the Wilson interval with the ``G`` episodes as the sample size
    (module docstring)."""
    x, c = _finite(values, clusters)
    found = clustered_t_interval(x, c, confidence)
    if found.n == 0 or not math.isfinite(found.low):
        return Interval(found.mean, found.low, found.high, found.n, "t-episodes-clipped")
    if found.mean <= 0.0 or found.mean >= 1.0:
        g = int(_codes(c)[0].max()) + 1
        low, high = wilson(found.mean * g, g, confidence)
        return Interval(found.mean, low, high, found.n, "wilson-G")
    low, high = max(found.low, 0.0), min(found.high, 1.0)
    return Interval(found.mean, low, high, found.n, "t-episodes-clipped")


def interval(values, binary: bool, clusters=None, confidence: float = CONFIDENCE) -> Interval:
    """The interval a metric column gets (module docstring); ``binary`` values are 0/1."""
    if binary:
        if clusters is not None:
            return clustered_binary_interval(values, clusters, confidence)
        return wilson_interval(values, confidence)
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


def episode_t_test(x, y, clusters) -> float:
    """Two-sided paired t test on the episode means of ``x - y``, ``G - 1`` df (scipy's
    one-sample t); 1 when every episode mean difference is 0, NaN with fewer than 2."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    codes, _ = _codes(np.asarray(clusters, dtype=object))
    if d.size == 0:
        return math.nan
    g = int(codes.max()) + 1
    means = np.bincount(codes, weights=d, minlength=g) / np.bincount(codes, minlength=g)
    if np.all(means == 0):
        return 1.0
    if g < 2:
        return math.nan
    if np.all(means == means[0]):
        return 0.0  # every episode moved by the same amount: no spread, no doubt
    return float(stats.ttest_1samp(means, 0.0).pvalue)


def paired_test(x, y, binary: bool, clusters=None, tolerance: float = 0.0) -> tuple[float, str]:
    """p-value and test name of paired samples (module docstring): with ``clusters`` the
    paired t over episode means (``t-episodes``), else exact McNemar if ``binary``, else
    Wilcoxon. Differences of at most ``tolerance`` count as zero (float noise)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0:
        return math.nan, ""
    if tolerance > 0:
        y = np.where(np.abs(x - y) <= tolerance, x, y)
    if clusters is not None:
        return episode_t_test(x, y, clusters), "t-episodes"
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
