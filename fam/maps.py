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


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_keys(seeds: Tensor, n_cells: int) -> Tensor:
    """``(N, n_cells)`` int64 pseudo-random keys in ``[0, 2**32)``, a function of
    ``(seed_i, cell)`` only (counter-based, on the seeds' device): a sample's draw does not
    depend on which samples share its call."""
    seeds = _mix32(seeds.long()[:, None] & _MASK32)
    cells = torch.arange(n_cells, device=seeds.device, dtype=torch.long)[None]
    return _mix32(_mix32((seeds + cells * 0x9E3779B9) & _MASK32) ^ seeds)


def seeded_noise(seeds: Tensor, grid: tuple[int, int]) -> Tensor:
    """Uniform ``[0, 1]`` noise ``(N, h, w)`` float32 (32-bit keys / 2**32, rounded), one
    field per integer seed ``(N,)``."""
    h, w = int(grid[0]), int(grid[1])
    return (hash_keys(seeds, h * w).float() / 2.0**32).view(-1, h, w)


def smooth_noise(seeds: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The smooth random field ``(N, H, W)`` in ``[0, 1]``: :func:`seeded_noise` at the
    target layer's ``grid``, upsampled and min-max scaled like every method's map.

    It is the ``random`` method's map of a sample with that seed, and the order
    deletion/insertion give tied pixels under ``metric.ties=smooth``: a constant map then
    scores exactly as ``random`` does on that sample.
    """
    return minmax_normalise(upsample(seeded_noise(seeds, grid), (int(size[0]), int(size[1]))))
