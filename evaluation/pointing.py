"""Pointing game (Zhang et al., ECCV 2016) and energy pointing game (Score-CAM, 2020).

Pointing follows TorchRay's ``benchmark/pointing_game.py``: the point is the map's
maximum at image resolution (first index in row-major order on ties, ``torch.argmax``);
it is a hit when some ground-truth pixel lies at Euclidean distance strictly below
``tolerance`` pixels (``dy^2 + dx^2 < tolerance^2``). TorchRay's 15 px hold at the
annotation's resolution (the original image); :func:`annotation_tolerance` converts them
per image to the input's pixels, and ``tolerance`` accepts one value per sample. Samples
whose mask is empty, or whose map has a nan or inf, are not scored: their value is
``nan``; the caller (``evaluation.summary``) excludes and counts them.

Ground truth is either masks ``(N, H, W)`` (bool or 0/1) or boxes ``(N, 4)`` as
``x0, y0, x1, y1`` in pixel coordinates with the half-open convention of slicing: box
pixels are the integer ``(y, x)`` with ``x0 <= x < x1`` and ``y0 <= y < y1`` (``mask[y0:y1,
x0:x1]`` for integer boxes), clipped to the image. Images need not be square; everything
is indexed ``[y, x]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fam.errors import FamBenchError


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Rasterise boxes ``(N, 4)`` ``x0, y0, x1, y1`` (half-open) to masks ``(N, H, W)`` bool."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise FamBenchError(f"boxes must be a tensor (N, 4) of x0, y0, x1, y1; got {got}.")
    h, w = size
    b = boxes.double()
    ys = torch.arange(h, device=boxes.device, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, device=boxes.device, dtype=torch.float64)[None, None, :]
    inside_y = (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])
    inside_x = (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None])
    return inside_y & inside_x


def _ground_truth(maps: Tensor, truth: Tensor) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise FamBenchError(f"maps must be a tensor (N, H, W) at image resolution, got {got}.")
    if not isinstance(truth, Tensor):
        raise FamBenchError(
            f"masks must be a tensor (N, H, W) or boxes (N, 4), got {type(truth).__name__}."
        )
    if truth.device != maps.device:
        raise FamBenchError(
            f"masks are on {truth.device} but maps are on {maps.device}; put both on one device."
        )
    n, h, w = maps.shape
    if truth.dim() == 2 and tuple(truth.shape) == (n, 4):
        return boxes_to_masks(truth, (h, w))
    if tuple(truth.shape) != (n, h, w):
        raise FamBenchError(
            f"Ground truth of shape {tuple(truth.shape)} does not fit maps {tuple(maps.shape)}: "
            f"pass masks ({n}, {h}, {w}) at image resolution or boxes ({n}, 4) x0, y0, x1, y1."
        )
    return truth.bool()


def _finite(maps: Tensor) -> Tensor:
    return torch.isfinite(maps).flatten(1).all(dim=1)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float | Tensor = 15.0) -> Tensor:
    """Hit (1.0), miss (0.0) or not scored (``nan``) per sample: ``(N,)``.

    Args:
        maps: ``(N, H, W)`` maps at image resolution.
        masks: ``(N, H, W)`` ground-truth masks or ``(N, 4)`` boxes (module docstring).
        tolerance: pixels at the maps' resolution, one number or one per sample
            ``(N,)`` (e.g. :func:`annotation_tolerance`); a ground-truth pixel at distance
            ``< tolerance`` makes a hit. ``0`` never hits; use a value in ``(0, 1]`` to
            require the point itself to lie in the mask.

    Not scored: an empty mask, or a map with a nan or inf (its maximum is undefined).
    """
    truth = _ground_truth(maps, masks)
    n, h, w = maps.shape
    tol = _tolerance(tolerance, n, maps.device)
    flat_max = maps.flatten(1).argmax(dim=1)
    py, px = flat_max // w, flat_max % w
    dy2 = (torch.arange(h, device=maps.device)[None] - py[:, None]).pow(2)
    dx2 = (torch.arange(w, device=maps.device)[None] - px[:, None]).pow(2)
    near = (dy2[:, :, None] + dx2[:, None, :]).double() < tol.pow(2)[:, None, None]
    hit = (truth & near).flatten(1).any(dim=1).float()
    scored = truth.flatten(1).any(dim=1) & _finite(maps)
    return torch.where(scored, hit, math.nan)


def _tolerance(tolerance: float | Tensor, n: int, device: torch.device) -> Tensor:
    """``(N,)`` float64 tolerances on ``device`` from a number or a per-sample tensor."""
    if isinstance(tolerance, Tensor):
        if tolerance.dim() == 0:
            tolerance = tolerance.expand(n)
        if tuple(tolerance.shape) != (n,):
            raise FamBenchError(
                f"tolerance must be a number or one value per sample ({n},), got shape "
                f"{tuple(tolerance.shape)}."
            )
        tol = tolerance.to(device=device, dtype=torch.float64)
        # One check on a small (N,) tensor; a negative tolerance is a caller's bug.
        if bool((tol < 0).any()) or not bool(torch.isfinite(tol).all()):
            raise FamBenchError("tolerance must be finite and >= 0 pixels for every sample.")
        return tol
    if not tolerance >= 0:
        raise FamBenchError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    return torch.full((n,), float(tolerance), device=device, dtype=torch.float64)


def annotation_tolerance(
    tolerance: float, annotation_sizes: Tensor, input_size: tuple[int, int]
) -> Tensor:
    """A tolerance given at each image's annotation resolution, in input pixels: ``(N,)``.

    ``annotation_sizes`` ``(N, 2)`` holds each original image's ``(height, width)``, the
    resolution its masks or boxes were drawn at (TorchRay's 15 px apply there);
    ``input_size`` the ``(H, W)`` the image was resized to. The distance scales by
    ``sqrt(H W / (h w))``, the geometric mean of the two axes' factors (exact when the
    resize keeps the aspect ratio; an anisotropic resize turns the disc into an ellipse,
    approximated by the disc of the same area).
    """
    sizes = torch.as_tensor(annotation_sizes, dtype=torch.float64)
    if sizes.dim() != 2 or sizes.shape[1] != 2 or not bool((sizes > 0).all()):
        raise FamBenchError(
            f"annotation_sizes must be (N, 2) positive (height, width), got {tuple(sizes.shape)}."
        )
    height, width = input_size
    return float(tolerance) * torch.sqrt(height * width / (sizes[:, 0] * sizes[:, 1]))


def tight_boxes(masks: Tensor) -> Tensor:
    """Each mask's tight bounding box ``(N, 4)`` ``x0, y0, x1, y1`` (half-open), float64.

    An empty mask gives the empty box ``(0, 0, 0, 0)``.
    """
    masks = masks.bool()
    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)

    def span(occupied: Tensor, size: int) -> tuple[Tensor, Tensor]:
        first = occupied.float().argmax(dim=1)
        last = size - occupied.flip(1).float().argmax(dim=1)
        empty = ~occupied.any(dim=1)
        return torch.where(empty, 0, first), torch.where(empty, 0, last)

    y0, y1 = span(rows, h)
    x0, x1 = span(cols, w)
    return torch.stack([x0, y0, x1, y1], dim=1).double()


def energy_pointing_game(
    maps: Tensor, masks: Tensor, region: str = "box", boxes: Tensor | None = None
) -> Tensor:
    """Share of the map's mass inside the object per sample: ``(N,)`` in ``[0, 1]``.

    Args:
        maps: ``(N, H, W)`` non-negative maps at image resolution.
        masks: ``(N, H, W)`` masks or ``(N, 4)`` boxes (module docstring).
        region: ``"box"`` (default; the Score-CAM paper's definition, Wang et al. 2020:
            energy inside the object's bounding box) or ``"mask"`` (inside the mask
            itself, this suite's earlier definition). With ``"box"`` the box is
            ``boxes`` when given, else ``masks`` when they are boxes, else each mask's
            tight bounding box (:func:`tight_boxes`), so for a non-rectangular object
            the box also counts the background pixels around it.
        boxes: ``(N, 4)`` ``x0, y0, x1, y1`` boxes for ``region="box"`` (e.g. a dataset's
            annotated boxes, which need not be the masks' tight boxes).

    ``nan`` where the map is zero everywhere (no mass to share), has a nan or inf, or
    the object is empty; all are excluded by the caller and counted.
    """
    if region not in ("box", "mask"):
        raise FamBenchError(f"region must be 'box' or 'mask', got {region!r}.")
    if region == "box":
        if boxes is None:
            given = _ground_truth(maps, masks)
            is_box = isinstance(masks, Tensor) and masks.dim() == 2
            boxes = masks if is_box else tight_boxes(given)
        truth = _ground_truth(maps, boxes)
    else:
        if boxes is not None:
            raise FamBenchError("boxes are only used with region='box'.")
        truth = _ground_truth(maps, masks)
    finite = _finite(maps)
    maps = torch.where(finite[:, None, None], maps.float(), 0.0)
    if bool((maps < 0).any()):
        raise FamBenchError(
            "The energy pointing game needs non-negative maps (a share of mass); apply ReLU "
            "or min-max normalise the maps first."
        )
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * truth).flatten(1).sum(dim=1)
    defined = (total > 0) & truth.flatten(1).any(dim=1) & finite
    return torch.where(defined, inside / total.clamp_min(torch.finfo(maps.dtype).tiny), math.nan)
