"""Run figures: explanation-map grids and mean deletion/insertion curves (PNG).

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never
through ``pyplot``, so nothing leaks into a global figure registry and plotting works in
worker processes without a display. Sizes are fixed (no ``bbox_inches="tight"``) so a grid's
pixel size depends only on its number of rows and methods (:func:`map_grid_size`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import stats

from fam.errors import FamBenchError

DPI = 100
CELL_INCHES = 1.6  # one image / map panel
HEADER_INCHES = 0.3  # column titles
LEFT_INCHES = 0.3  # row labels
COLORBAR_INCHES = 0.7  # colour bar and its tick labels
PAD_INCHES = 0.05  # gap around each panel
MAP_CMAP = "jet"
MAP_ALPHA = 0.5
CURVES_SIZE_INCHES = (11.0, 4.2)


def _to_numpy(x, name: str) -> np.ndarray:
    """A float32 numpy copy of a tensor (any device) or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise FamBenchError(f"{name} must be a tensor or array of numbers ({err}).") from err


def map_grid_size(n_rows: int, n_methods: int) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a :func:`plot_map_grid` PNG."""
    width = LEFT_INCHES + (1 + n_methods) * CELL_INCHES + COLORBAR_INCHES
    height = HEADER_INCHES + n_rows * CELL_INCHES
    return round(width * DPI), round(height * DPI)


def _outline(ax, mask: np.ndarray) -> None:
    # A contour needs both inside and outside pixels; black under white reads on any colour.
    if mask.any() and not mask.all():
        for colour, width in (("black", 2.2), ("white", 1.0)):
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=width)


def plot_map_grid(
    images,
    maps: Mapping[str, object],
    masks,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    labels: Sequence[str] | None = None,
    max_rows: int = 8,
) -> Path:
    """Write a PNG grid: one row per sample, columns = the image, then one map per method.

    ``images``: ``(N, 3, H, W)`` (or ``(N, 1, H, W)``) normalised with ``mean``/``std``;
    ``maps``: method name -> ``(N, H, W)`` in ``[0, 1]``, drawn over the image with the
    ``jet`` colour map (shared scale 0..1, colour bar on the right); ``masks``: ``(N, H, W)``
    ground truth, outlined on every panel, or ``None``; ``labels``: one row label per sample
    (e.g. class names). At most ``max_rows`` samples (the first ones) are drawn.
    """
    images = _to_numpy(images, "images")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FamBenchError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}.")
    if not maps:
        raise FamBenchError("maps is empty; pass at least one method name -> (N, H, W) maps.")
    n, channels, h, w = images.shape
    n_rows = min(n, max_rows)
    if n_rows < 1:
        raise FamBenchError("no images to plot (N = 0) or max_rows < 1.")
    arrays = {name: _to_numpy(m, f"maps[{name!r}]") for name, m in maps.items()}
    for name, m in arrays.items():
        if m.shape[0] < n_rows or m.shape[1:] != (h, w):
            raise FamBenchError(
                f"maps[{name!r}] has shape {tuple(m.shape)}; expected (N, {h}, {w}) matching "
                "the images (upsample maps to the image size first)."
            )
    mask_array = None
    if masks is not None:
        mask_array = _to_numpy(masks, "masks") > 0.5
        if mask_array.shape[0] < n_rows or mask_array.shape[1:] != (h, w):
            raise FamBenchError(
                f"masks has shape {tuple(mask_array.shape)}; expected (N, {h}, {w})."
            )
    if labels is not None and len(labels) < n_rows:
        raise FamBenchError(f"labels has {len(labels)} entries for {n_rows} rows.")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if mean_a.shape[0] not in (1, channels) or std_a.shape[0] not in (1, channels):
        raise FamBenchError(f"mean/std need 1 or {channels} entries, got {mean!r} / {std!r}.")

    width_px, height_px = map_grid_size(n_rows, len(arrays))
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    cmap = colormaps[MAP_CMAP]
    columns = ["image", *arrays]
    for row in range(n_rows):
        rgb = np.clip(images[row] * std_a + mean_a, 0.0, 1.0).transpose(1, 2, 0)
        if channels == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        for col, name in enumerate(columns):
            # Explicit rectangles (figure fractions) keep every panel the same size.
            left = (LEFT_INCHES + col * CELL_INCHES + PAD_INCHES) * DPI / width_px
            bottom = ((n_rows - 1 - row) * CELL_INCHES + PAD_INCHES) * DPI / height_px
            size = (CELL_INCHES - 2 * PAD_INCHES) * DPI
            ax = fig.add_axes((left, bottom, size / width_px, size / height_px))
            ax.imshow(rgb, interpolation="nearest")
            if name != "image":
                ax.imshow(
                    arrays[name][row],
                    cmap=cmap,
                    vmin=0.0,
                    vmax=1.0,
                    alpha=MAP_ALPHA,
                    interpolation="bilinear",
                )
            if mask_array is not None:
                _outline(ax, mask_array[row])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9, pad=3)
            if col == 0 and labels is not None:
                label = str(labels[row])
                # Longer labels would run past the cell height.
                label = label if len(label) <= 24 else label[:23] + "…"
                ax.set_ylabel(label, fontsize=8, labelpad=2)
    bar_left = (LEFT_INCHES + len(columns) * CELL_INCHES + 0.1) * DPI / width_px
    cax = fig.add_axes(
        (
            bar_left,
            PAD_INCHES * DPI / height_px,
            0.12 * DPI / width_px,
            (n_rows * CELL_INCHES - 2 * PAD_INCHES) * DPI / height_px,
        )
    )
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=cax)
    bar.ax.tick_params(labelsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """Per-curve AUC on an evenly spaced [0, 1] axis: ``(sum y - y0/2 - y_last/2) / (T-1)``.

    ``curves``: ``(N, T)``; returns ``(N,)`` (the trapezoid rule of DESIGN.md section 4).
    """
    from evaluation.causal import auc  # works on arrays as on tensors

    return auc(np.asarray(curves, dtype=np.float64))


def _mean_band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean curve and Student-t 95% CI half-width per step (zero for a single curve)."""
    n = curves.shape[0]
    mean = curves.mean(0)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, stats.t.ppf(0.975, n - 1) * curves.std(0, ddof=1) / math.sqrt(n)


def plot_curves(curves: Mapping[str, Mapping[str, object]], path: str | Path) -> Path:
    """Write a PNG with the mean deletion (left) and insertion (right) curve of each method.

    ``curves``: method -> ``{"deletion": (N, T), "insertion": (N, T)}`` score curves (either
    key may be missing); x is the fraction of pixels deleted / inserted, the band the 95% CI
    of the mean over the N images, and the legend gives the mean per-image AUC.
    """
    if not curves:
        raise FamBenchError("curves is empty; pass method -> {deletion, insertion} arrays.")
    fig = Figure(figsize=CURVES_SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    palette = colormaps["tab10" if len(curves) <= 10 else "tab20"]
    panels = (
        ("deletion", "Deletion (lower AUC is better)", "fraction of pixels deleted"),
        ("insertion", "Insertion (higher AUC is better)", "fraction of pixels inserted"),
    )
    for ax, (kind, title, xlabel) in zip(axes, panels, strict=True):
        for i, (method, per_kind) in enumerate(curves.items()):
            if kind not in per_kind:
                continue
            y = _to_numpy(per_kind[kind], f"curves[{method!r}][{kind!r}]")
            if y.ndim != 2 or y.shape[1] < 2 or y.shape[0] < 1:
                raise FamBenchError(
                    f"curves[{method!r}][{kind!r}] has shape {tuple(y.shape)}; expected (N, T) "
                    "with N >= 1 images and T >= 2 steps."
                )
            x = np.linspace(0.0, 1.0, y.shape[1])
            mean, half = _mean_band(y.astype(np.float64))
            colour = palette(i % palette.N)
            auc = float(curve_auc(y).mean())
            ax.plot(x, mean, color=colour, lw=1.6, label=f"{method} (AUC {auc:.3f})")
            ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, lw=0)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score")
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.suptitle("mean curve per method; shaded: 95% CI of the mean over images", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
