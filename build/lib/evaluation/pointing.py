"""Pointing game (Zhang et al., ECCV 2016) and energy pointing game (Score-CAM, 2020).

Pointing follows TorchRay's ``benchmark/pointing_game.py``: the point is the map's
maximum at image resolution (first index in row-major order on ties, ``torch.argmax``);
it is a hit when some ground-truth pixel lies at Euclidean distance strictly below
``tolerance`` pixels (``dy^2 + dx^2 < tolerance^2``). Samples whose mask is empty are not
scored: their value is ``nan`` and :func:`pointing_accuracy` excludes and counts them.

Ground truth is either masks ``(N, H, W)`` (bool or 0/1) or boxes ``(N, 4)`` as
``x0, y0, x1, y1`` in pixel coordinates with the half-open convention of slicing: box
pixels are the integer ``(y, x)`` with ``x0 <= x < x1`` and ``y0 <= y < y1`` (``mask[y0:y1,
x0:x1]`` for integer boxes), clipped to the image. Images need not be square; everything
is indexed ``[y, x]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 15.0) -> Tensor:
    """Hit (1.0), miss (0.0) or not scored (``nan``, empty mask) per sample: ``(N,)``.

    Args:
        maps: ``(N, H, W)`` maps at image resolution.
        masks: ``(N, H, W)`` ground-truth masks or ``(N, 4)`` boxes (module docstring).
        tolerance: pixels; a ground-truth pixel at distance ``< tolerance`` makes a hit.
            ``0`` never hits; use a value in ``(0, 1]`` to require the point itself to
            lie in the mask.
    """
    truth = _ground_truth(maps, masks)
    if tolerance < 0:
        raise FamBenchError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    n, h, w = maps.shape
    flat_max = maps.flatten(1).argmax(dim=1)
    py, px = flat_max // w, flat_max % w
    dy2 = (torch.arange(h, device=maps.device)[None] - py[:, None]).pow(2)
    dx2 = (torch.arange(w, device=maps.device)[None] - px[:, None]).pow(2)
    near = (dy2[:, :, None] + dx2[:, None, :]) < tolerance**2
    hit = (truth & near).flatten(1).any(dim=1).float()
    return torch.where(truth.flatten(1).any(dim=1), hit, math.nan)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the map's mass inside the ground truth per sample: ``(N,)`` in ``[0, 1]``.

    ``nan`` where the map is zero everywhere (no mass to share) or the mask is empty; both
    are excluded by the caller and counted. Maps must be non-negative.
    """
    truth = _ground_truth(maps, masks)
    maps = maps.float()
    if bool((maps < 0).any()):
        raise FamBenchError(
            "The energy pointing game needs non-negative maps (a share of mass); apply ReLU "
            "or min-max normalise the maps first."
        )
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * truth).flatten(1).sum(dim=1)
    defined = (total > 0) & truth.flatten(1).any(dim=1)
    return torch.where(defined, inside / total.clamp_min(torch.finfo(maps.dtype).tiny), math.nan)


def pointing_accuracy(
    hits: Tensor, labels: Tensor | Sequence[int] | None = None
) -> tuple[float, float, int]:
    """Aggregate per-sample values (hits, or energies): ``(overall, per_class_mean, n_excluded)``.

    ``overall`` is the mean over samples that were scored (not ``nan``);
    ``per_class_mean`` the mean over classes of each class's mean (TorchRay reports this),
    classes with no scored sample left out; ``n_excluded`` counts the ``nan`` samples.
    Without labels every sample is one class and ``per_class_mean == overall``.
    """
    hits = torch.as_tensor(hits).double().flatten().cpu()
    valid = ~torch.isnan(hits)
    n_excluded = int((~valid).sum())
    if not bool(valid.any()):
        return math.nan, math.nan, n_excluded
    overall = float(hits[valid].mean())
    if labels is None:
        return overall, overall, n_excluded
    labels = torch.as_tensor(labels).flatten().cpu().long()
    if labels.shape != hits.shape:
        raise FamBenchError(
            f"labels must have one entry per sample ({hits.numel()}), got {labels.numel()}."
        )
    classes, inverse = torch.unique(labels[valid], return_inverse=True)
    sums = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, hits[valid])
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    return overall, float((sums / counts).mean()), n_excluded


def scaled_tolerance(height: int, width: int, tolerance_at_224: float = 15.0) -> float:
    """The pointing tolerance scaled with image size: ``15 px`` at 224x224 (TorchRay)."""
    return tolerance_at_224 * math.sqrt(height * width) / 224.0
