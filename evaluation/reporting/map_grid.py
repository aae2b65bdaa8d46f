"""``maps.png``: images x methods with each map overlaid and the ground truth outlined.

Drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas (no ``pyplot``); the size
is fixed so a grid's pixel size depends only on its number of rows and methods
(:func:`map_grid_size`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from fam.errors import FamBenchError

DPI = 100
CELL_INCHES = 1.6  # one image / map panel
HEADER_INCHES = 0.3  # column titles
LEFT_INCHES = 0.3  # row labels
COLORBAR_INCHES = 0.7  # colour bar and its tick labels
PAD_INCHES = 0.05  # gap around each panel
MAP_CMAP = "jet"
MAP_ALPHA = 0.5


def to_numpy(x, name: str) -> np.ndarray:
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
    references=None,
) -> Path:
    """Write a PNG grid: one row per sample, columns = the image, then one map per method.

    ``references``: optional ``(N, 3, H, W)`` images (normalised like ``images``) drawn in a
    ``reference`` column after the image: the retrieved gallery image or nearest neighbour
    the map explains similarity to.

    ``images``: ``(N, 3, H, W)`` (or ``(N, 1, H, W)``) normalised with ``mean``/``std``;
    ``maps``: method name -> ``(N, H, W)`` in ``[0, 1]``, drawn over the image with the
    ``jet`` colour map (shared scale 0..1, colour bar on the right); ``masks``: ``(N, H, W)``
    ground truth, outlined on every panel, or ``None``; ``labels``: one row label per sample
    (e.g. class names). At most ``max_rows`` samples (the first ones) are drawn.
    """
    images = to_numpy(images, "images")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FamBenchError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}.")
    if not maps:
        raise FamBenchError("maps is empty; pass at least one method name -> (N, H, W) maps.")
    n, channels, h, w = images.shape
    n_rows = min(n, max_rows)
    if n_rows < 1:
        raise FamBenchError("no images to plot (N = 0) or max_rows < 1.")
    arrays = {name: to_numpy(m, f"maps[{name!r}]") for name, m in maps.items()}
    for name, m in arrays.items():
        if m.shape[0] < n_rows or m.shape[1:] != (h, w):
            raise FamBenchError(
                f"maps[{name!r}] has shape {tuple(m.shape)}; expected (N, {h}, {w}) matching "
                "the images (upsample maps to the image size first)."
            )
    mask_array = None
    if masks is not None:
        mask_array = to_numpy(masks, "masks") > 0.5
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

    reference_array = None
    if references is not None:
        reference_array = to_numpy(references, "references")
        if reference_array.shape[0] < n_rows or reference_array.shape[1:] != (channels, h, w):
            raise FamBenchError(
                f"references has shape {tuple(reference_array.shape)}; expected "
                f"(N, {channels}, {h}, {w}) like the images."
            )
    extra = 0 if reference_array is None else 1
    width_px, height_px = map_grid_size(n_rows, len(arrays) + extra)
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    cmap = colormaps[MAP_CMAP]
    columns = ["image", *(["reference"] if extra else []), *arrays]

    def to_rgb(x: np.ndarray) -> np.ndarray:
        rgb = np.clip(x * std_a + mean_a, 0.0, 1.0).transpose(1, 2, 0)
        return np.repeat(rgb, 3, axis=2) if channels == 1 else rgb

    for row in range(n_rows):
        rgb = to_rgb(images[row])
        for col, name in enumerate(columns):
            # Explicit rectangles (figure fractions) keep every panel the same size.
            left = (LEFT_INCHES + col * CELL_INCHES + PAD_INCHES) * DPI / width_px
            bottom = ((n_rows - 1 - row) * CELL_INCHES + PAD_INCHES) * DPI / height_px
            size = (CELL_INCHES - 2 * PAD_INCHES) * DPI
            ax = fig.add_axes((left, bottom, size / width_px, size / height_px))
            if name == "reference":
                ax.imshow(to_rgb(reference_array[row]), interpolation="nearest")
            else:
                ax.imshow(rgb, interpolation="nearest")
            if name in arrays:
                ax.imshow(
                    arrays[name][row],
                    cmap=cmap,
                    vmin=0.0,
                    vmax=1.0,
                    alpha=MAP_ALPHA,
                    interpolation="bilinear",
                )
            if mask_array is not None and name != "reference":
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
