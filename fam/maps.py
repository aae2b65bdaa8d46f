"""Map post-processing shared by every method: ReLU'd channel sums, resizing, scaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``ReLU(sum_k w_k A_k)``: weights ``(N, K)`` or ``(N, K, h, w)``, A ``(N, K, h, w)``."""
    if weights.dim() == 2:
        weights = weights[:, :, None, None]
    return torch.relu((weights * activations).sum(dim=1))


def upsample(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize ``(N, h, w) -> (N, H, W)`` (align_corners=False)."""
    if tuple(raw.shape[-2:]) == tuple(size):
        return raw
    return F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_normalise(maps: Tensor) -> Tensor:
    """Per-image min-max scaling to ``[0, 1]``; a constant map becomes all zeros and a
    map with any nan or inf all nan.

    A constant (in particular an all-zero) map carries no ranking, so it is never
    stretched into something that looks like an explanation; the explainer flags it as
    degenerate instead.
    """
    flat = maps.flatten(1)
    # Scale by the largest magnitude first: (hi - lo) of two huge finite values would
    # overflow to inf; the min-max result is scale-invariant.
    magnitude = flat.abs().amax(dim=1, keepdim=True)
    flat = flat / torch.where(magnitude > 0, magnitude, 1.0)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    span = hi - lo
    # Rounding noise of a resized constant map is not a ranking: never stretch it.
    noise = 8 * torch.finfo(flat.dtype).eps * torch.maximum(hi.abs(), lo.abs())
    scaled = torch.where(
        span > noise, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0
    )
    # A map with nan or inf has no order: it stays nan, never becomes a zero map.
    scaled = torch.where(torch.isfinite(span), scaled, torch.nan)
    return scaled.view_as(maps)


def non_finite(maps: Tensor) -> Tensor:
    """``(N,)`` bool: the map has a nan or inf anywhere (its pixel order is undefined)."""
    return ~torch.isfinite(maps).flatten(1).all(dim=1)


def degenerate(raw: Tensor) -> Tensor:
    """``(N,)`` bool: the raw map is constant, in particular zero, everywhere.

    Such a map ranks no pixel above another (it normalises to all zeros), so it is
    flagged rather than scored as if it were an explanation.
    """
    flat = raw.flatten(1)
    return flat.amax(dim=1) <= flat.amin(dim=1)
