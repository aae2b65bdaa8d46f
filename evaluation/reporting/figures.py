"""Run figures (PNG): deletion/insertion curves, forest plot, sanity cascade.

(The map grid, ``maps.png``, is :mod:`evaluation.reporting.map_grid`.)

- :func:`plot_curves` (``curves.png``): small multiples, one panel per method with its
  mean deletion and insertion curves, the reference method drawn faintly in every panel,
  so twelve methods stay readable; methods with identical curves share one panel;
- :func:`plot_summary` (``summary.png``): a forest plot, mean and 95% interval per method
  for each metric, methods ordered by rank (best on top);
- :func:`plot_sanity` (``sanity.png``): the randomisation cascade, mean rank correlation
  against the number of randomised layers, one line per method.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through ``pyplot``, so nothing leaks into a global figure registry and plotting works in
worker processes without a display. Sizes are fixed (no ``bbox_inches="tight"``) so a grid's
pixel size depends only on its number of rows and methods
(:func:`evaluation.reporting.map_grid.map_grid_size`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from evaluation import registry
from evaluation.causal import auc
from evaluation.reporting.map_grid import DPI, to_numpy
from evaluation.summary import identical_groups, summarise_sanity
from fam.errors import FamBenchError

PANEL_INCHES = (3.0, 2.3)  # one small-multiple panel (curves, forest plot)
CURVE_COLOURS = {"deletion": "tab:blue", "insertion": "tab:orange"}
REFERENCE_COLOUR = "0.55"


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """Per-curve AUC on an evenly spaced [0, 1] axis: ``(sum y - y0/2 - y_last/2) / (T-1)``.

    ``curves``: ``(N, T)``; returns ``(N,)`` (the trapezoid rule of DESIGN.md section 4).
    """
    return auc(np.asarray(curves, dtype=np.float64))  # works on arrays as on tensors


def _mean_band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean curve and Student-t 95% CI half-width per step (zero for a single curve)."""
    n = curves.shape[0]
    mean = curves.mean(0)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, stats.t.ppf(0.975, n - 1) * curves.std(0, ddof=1) / math.sqrt(n)


def _curve_arrays(curves: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, np.ndarray]]:
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for method, per_kind in curves.items():
        arrays[method] = {}
        for kind, values in per_kind.items():
            y = to_numpy(values, f"curves[{method!r}][{kind!r}]").astype(np.float64)
            if y.ndim != 2 or y.shape[1] < 2 or y.shape[0] < 1:
                raise FamBenchError(
                    f"curves[{method!r}][{kind!r}] has shape {tuple(y.shape)}; expected (N, T) "
                    "with N >= 1 images and T >= 2 steps."
                )
            arrays[method][kind] = y
    return arrays


def identical_curve_groups(curves: Mapping[str, Mapping[str, np.ndarray]]) -> list[list[str]]:
    """Methods whose curves are equal (to float noise, 1e-6) on every image, in order."""
    groups: list[list[str]] = []
    for method, kinds in curves.items():
        for group in groups:
            first = curves[group[0]]
            if set(first) == set(kinds) and all(
                first[k].shape == kinds[k].shape and np.allclose(first[k], kinds[k], atol=1e-6)
                for k in kinds
            ):
                group.append(method)
                break
        else:
            groups.append([method])
    return groups


def identical_note(groups: Sequence[Sequence[str]]) -> str:
    """One sentence naming the methods that gave identical results ('' if none)."""
    shared = [" = ".join(g) for g in groups if len(g) > 1]
    if not shared:
        return ""
    return (
        "Identical results on every sample (the same maps; one entry, not rivals): "
        + "; ".join(shared)
        + "."
    )


def _merge_groups(names: Sequence[str], groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """``names`` as groups: the given groups (members present), the rest one each."""
    out, seen = [], set()
    for group in groups or []:
        members = [m for m in group if m in names]
        if members:
            out.append(members)
            seen.update(members)
    out += [[m] for m in names if m not in seen]
    order = {m: i for i, m in enumerate(names)}
    return sorted(out, key=lambda g: order[g[0]])


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def plot_curves(
    curves: Mapping[str, Mapping[str, object]],
    path: str | Path,
    score_label: str = "score",
    reference: str | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Write ``curves.png`` (:func:`curves_figure`); returns the path."""
    return _save(curves_figure(curves, score_label, reference, groups), path)


def curves_figure(
    curves: Mapping[str, Mapping[str, object]],
    score_label: str = "score",
    reference: str | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> Figure:
    """Small multiples: one panel per method, mean deletion and insertion curves.

    ``curves``: method -> ``{"deletion": (N, T), "insertion": (N, T)}`` (either key may be
    missing); x is the fraction of pixels deleted / inserted, the y axis is labelled
    ``score_label`` (the score the metric actually read, e.g. "episode softmax
    probability"), bands are the 95% CI of the mean over the N images, and each panel's
    title gives the mean per-image AUCs. ``reference`` (default: the first method) is drawn
    faintly in every other panel. Methods with identical curves share one panel titled
    ``a = b`` (``groups`` to give them, default: detected from the curves).
    """
    if not curves:
        raise FamBenchError("curves is empty; pass method -> {deletion, insertion} arrays.")
    arrays = _curve_arrays(curves)
    names = list(arrays)
    panels = _merge_groups(names, groups) if groups is not None else identical_curve_groups(arrays)
    reference = reference if reference in arrays else names[0]
    rows, cols = _grid(len(panels))
    width, height = PANEL_INCHES
    fig = Figure(figsize=(cols * width, rows * height + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, group in zip(axes, panels, strict=False):
        method = group[0]
        if reference not in group:
            for y in arrays[reference].values():
                x = np.linspace(0.0, 1.0, y.shape[1])
                ax.plot(x, y.mean(0), color=REFERENCE_COLOUR, lw=1.0, ls="--", alpha=0.7)
        aucs = []
        for kind, y in arrays[method].items():
            x = np.linspace(0.0, 1.0, y.shape[1])
            mean, half = _mean_band(y)
            colour = CURVE_COLOURS.get(kind, "tab:green")
            ax.plot(x, mean, color=colour, lw=1.6, label=kind)
            ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, lw=0)
            aucs.append(f"{kind[:3]}. {float(curve_auc(y).mean()):.3f}")
        title = " = ".join(group)
        ax.set_title(title if len(title) <= 40 else title[:39] + "…", fontsize=9)
        # Mid-right: where the curves usually are not (deletion ends low, insertion high).
        ax.text(
            0.97,
            0.5,
            "\n".join(aucs),
            transform=ax.transAxes,
            ha="right",
            va="center",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1.5},
        )
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes[: len(panels)]):
        # Labels on the outer panels only: the first column and the lowest panel of each.
        if i % cols == 0:
            ax.set_ylabel(score_label, fontsize=8)
        if i + cols >= len(panels):
            ax.set_xlabel("fraction of pixels deleted / inserted", fontsize=8)
            ax.tick_params(labelbottom=True)
        ax.tick_params(labelsize=7)
    handles = [
        Line2D(
            [],
            [],
            color=CURVE_COLOURS.get(kind, "tab:green"),
            lw=1.6,
            label=f"{kind} ({spec.direction} AUC better)",
        )
        for spec in registry.METRICS.values()
        for kind in spec.curves
    ]
    handles.append(
        Line2D([], [], color=REFERENCE_COLOUR, lw=1.0, ls="--", label=f"{reference} (reference)")
    )
    fig.legend(handles=handles, loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return fig


def _forest_frame(summary) -> pd.DataFrame:
    frame = pd.DataFrame(summary)
    keep = frame["metric"].map(registry.is_metric_column)
    return frame[keep & frame["mean"].notna()]


def plot_summary(
    summary,
    path: str | Path,
    groups: Sequence[Sequence[str]] | None = None,
    reference: str | None = None,
) -> Path:
    """Write ``summary.png`` (:func:`summary_figure`); returns the path."""
    return _save(summary_figure(summary, groups, reference), path)


def summary_figure(
    summary,
    groups: Sequence[Sequence[str]] | None = None,
    reference: str | None = None,
) -> Figure:
    """A forest plot, one panel per metric, best method on top.

    ``summary``: a :func:`evaluation.summary.summarise` frame (or leaderboard rows of one
    table) with ``method, metric, mean, ci95_low, ci95_high``; only per-sample metric
    columns are drawn. Each panel orders the methods by their mean in the metric's
    direction; methods in one of ``groups`` (identical results) are one row ``a = b``;
    ``reference`` is drawn in black, the others in blue.
    """
    frame = _forest_frame(summary)
    if frame.empty:
        raise FamBenchError("summary has no per-sample metric rows with a mean to plot.")
    metrics = list(dict.fromkeys(frame["metric"]))
    names = list(dict.fromkeys(frame["method"]))
    merged = _merge_groups(names, groups)
    label_of = {g[0]: " = ".join(g) for g in merged}
    rows, cols = _grid(len(metrics), 3)
    height = max(PANEL_INCHES[1], 0.25 * len(merged) + 0.8)
    fig = Figure(figsize=(cols * 3.6, rows * height + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        mine = frame[(frame["metric"] == metric) & frame["method"].isin(label_of)]
        lower = registry.direction(metric) == "lower"
        mine = mine.sort_values("mean", ascending=lower, kind="stable")
        y = np.arange(len(mine))[::-1]
        mean = mine["mean"].to_numpy(float)
        low = mean - mine["ci95_low"].to_numpy(float)
        high = mine["ci95_high"].to_numpy(float) - mean
        colours = ["black" if m == reference else "tab:blue" for m in mine["method"]]
        for yi, m, lo, hi, c in zip(y, mean, low, high, colours, strict=True):
            xerr = None if not (np.isfinite(lo) and np.isfinite(hi)) else [[lo], [hi]]
            ax.errorbar(m, yi, xerr=xerr, fmt="o", color=c, ms=4, capsize=2, lw=1.2)
        ax.set_yticks(y)
        labels = [label_of[m] for m in mine["method"]]
        ax.set_yticklabels([t if len(t) <= 28 else t[:27] + "…" for t in labels], fontsize=7)
        ax.set_title(f"{metric} ({'lower' if lower else 'higher'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("mean and 95% interval per method, best on top", fontsize=9)
    return fig


def plot_sanity(sanity, path: str | Path) -> Path:
    """Write ``sanity.png`` (:func:`sanity_figure`); returns the path."""
    return _save(sanity_figure(sanity), path)


def sanity_figure(sanity) -> Figure:
    """Mean rank correlation against randomised depth, one line per method.

    ``sanity``: ``sanity.csv`` rows (``method, step, layer, spearman``), or the
    ``sanity@<layer>`` rows of a :func:`evaluation.summary.summarise` frame.
    Step ``k`` has the top ``k`` layers re-initialised; a method whose line stays near 1
    explains the input, not the model.
    """
    frame = pd.DataFrame(sanity)
    if "spearman" in frame.columns:
        frame = summarise_sanity(frame)
    elif "metric" in frame.columns:
        frame = frame[frame["metric"].astype(str).str.startswith("sanity@")]
    if frame.empty:
        raise FamBenchError("no sanity rows to plot (run with metrics=[...,sanity]).")
    steps = frame.drop_duplicates("step").sort_values("step")
    fig = Figure(figsize=(max(5.0, 0.8 * len(steps) + 3.0), 3.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    methods = list(dict.fromkeys(frame["method"]))
    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    for i, method in enumerate(methods):
        mine = frame[frame["method"] == method].sort_values("step")
        ax.plot(
            mine["step"],
            mine["mean"],
            marker="o",
            ms=3,
            lw=1.4,
            color=palette(i % palette.N),
            label=method,
        )
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xticks(steps["step"].to_numpy())
    ax.set_xticklabels(
        [f"{s}\n{layer}" for s, layer in zip(steps["step"], steps["layer"], strict=True)],
        fontsize=7,
    )
    ax.set_xlabel("randomised layers, from the output (step: layer re-initialised last)")
    ax.set_ylabel("Spearman ρ, trained vs randomised maps")
    ax.set_ylim(min(-0.2, float(frame["mean"].min()) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax.set_title(
        "Model randomisation cascade (lower is better: the maps depend on the model)", fontsize=9
    )
    return fig


def plot_run_figures(
    out_dir: str | Path,
    results: pd.DataFrame,
    summary: pd.DataFrame,
    sanity: pd.DataFrame | None = None,
    curves: Mapping[str, Mapping[str, object]] | None = None,
    score_label: str = "score",
    reference: str | None = None,
) -> list[Path]:
    """A run's summary figures in one call: ``curves.png`` (when ``curves``), ``summary.png``
    and ``sanity.png`` (when ``sanity`` has rows), into ``out_dir``; returns the paths.

    ``results``/``summary``/``sanity``: the run's ``results.csv``, ``summary.csv``
    (:func:`evaluation.summary.summarise`) and ``sanity.csv`` frames; methods with
    identical results (:func:`evaluation.summary.identical_groups`) share a panel / row.
    """
    out = Path(out_dir)
    groups = identical_groups(results)
    paths = []
    if curves:
        paths.append(plot_curves(curves, out / "curves.png", score_label, reference, groups))
    if not _forest_frame(summary).empty:
        paths.append(plot_summary(summary, out / "summary.png", groups, reference))
    if sanity is not None and len(sanity):
        paths.append(plot_sanity(sanity, out / "sanity.png"))
    return paths
