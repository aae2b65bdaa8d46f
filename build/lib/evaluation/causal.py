"""Deletion and insertion (Petsiuk, Das & Saenko, RISE, BMVC 2018).

The protocol is RISE's ``CausalMetric`` (``evaluation.py``) exactly:

- pixels are ordered by map value, descending, with a stable sort over ``H*W`` (ties keep
  row-major order); all channels of a pixel move together;
- ``n_steps = ceil(H*W / step)`` and each curve has ``n_steps + 1`` scores: score ``k`` is
  taken after the first ``min(k*step, H*W)`` pixels of the order were changed;
- deletion starts from the image and replaces pixels with the deletion substrate
  (default zeros in normalised input space); insertion starts from the insertion substrate
  (default the blurred image) and puts the original pixels back;
- ``AUC = (sum(y) - y[0]/2 - y[-1]/2) / (len(y) - 1)`` (trapezoid on equal spacing, also
  for the shorter last step when ``step`` does not divide ``H*W``, as in RISE).

The blur is RISE's ``gkern``: the kernel is a centred delta filtered by
``scipy.ndimage.gaussian_filter`` (``mode="reflect"``, so the 11-tap kernel with sigma 5
is flatter than a sampled-and-normalised Gaussian), applied per channel with zero padding.

Execution (the part that differs from RISE and torchcam): every perturbed image is one
job ``(sample, start image, source image, k)`` and is built on the device inside its batch
as ``where(rank < k*step, source, start)`` from a precomputed rank per pixel. Jobs of
several samples and steps share a batch of ``batch_size`` images, so the model always sees
full batches; no more than one batch of perturbed images exists at any time, whatever
``N`` is; scores go into one preallocated device tensor (no host sync in the loop). The
unperturbed image (deletion's first point = insertion's last) is scored once, and so is
the pure substrate when both curves use the same named substrate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from torch import Tensor, nn

from evaluation._batched import ScoreFn, check_images_maps, check_positive_int, stream_scores
from fam.errors import FamBenchError

Substrate = str | Tensor | Callable[[Tensor], Tensor]
SUBSTRATES = ("zeros", "blur", "mean")


@dataclass
class DeletionInsertionResult:
    """Per-image curves and AUCs, on the images' device.

    Attributes:
        deletion_auc, insertion_auc: ``(N,)``; lower deletion and higher insertion is better.
        deletion_curve, insertion_curve: ``(N, n_steps + 1)`` scores; point ``k`` after
            ``min(k*step, H*W)`` pixels were changed.
        fractions: ``(n_steps + 1,)`` fraction of pixels changed at each point.
        step: pixels per step; n_steps: ``ceil(H*W / step)``.
    """

    deletion_auc: Tensor
    insertion_auc: Tensor
    deletion_curve: Tensor
    insertion_curve: Tensor
    fractions: Tensor
    step: int
    n_steps: int


def auc(curve: Tensor) -> Tensor:
    """RISE's area under a curve of equally spaced points: ``(..., L) -> (...)``.

    ``(sum(y) - y[0]/2 - y[-1]/2) / (L - 1)``.
    """
    length = curve.shape[-1]
    if length < 2:
        raise FamBenchError(f"A curve needs at least 2 points for an AUC, got {length}.")
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (length - 1)


@lru_cache(maxsize=8)
def _rise_kernel_1d(size: int, sigma: float) -> tuple[float, ...]:
    # RISE builds gkern by filtering a centred delta with scipy's gaussian_filter; that
    # filter is separable, so the 2-D kernel is the outer product of this 1-D one.
    delta = np.zeros(size)
    delta[size // 2] = 1.0
    return tuple(gaussian_filter1d(delta, sigma).tolist())


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's blur substrate: ``(N, C, H, W) -> (N, C, H, W)``, per channel, zero padding."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise FamBenchError(f"blur_kernel_size must be a positive odd integer, got {kernel_size}.")
    if sigma <= 0:
        raise FamBenchError(f"blur_sigma must be positive, got {sigma}.")
    c = images.shape[1]
    k = torch.tensor(
        _rise_kernel_1d(kernel_size, float(sigma)), dtype=images.dtype, device=images.device
    )
    pad = kernel_size // 2
    # Separable depthwise conv: two 1-D passes with zero padding equal the 2-D zero-padded
    # conv with the outer-product kernel.
    out = F.conv2d(images, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, pad), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(pad, 0), groups=c)


def make_substrate(
    substrate: Substrate, images: Tensor, *, blur_kernel_size: int = 11, blur_sigma: float = 5.0
) -> Tensor:
    """The replacement image for each image: ``(N, C, H, W)`` (may be a broadcast view).

    ``"zeros"``: zeros in normalised input space (the dataset mean colour); ``"blur"``:
    :func:`gaussian_blur`; ``"mean"``: each image's own per-channel mean; a tensor
    broadcastable to ``(N, C, H, W)`` (e.g. ``(C, 1, 1)``); or a callable
    ``images -> (N, C, H, W)``.
    """
    if isinstance(substrate, str):
        if substrate == "zeros":
            return images.new_zeros(()).expand_as(images)
        if substrate == "blur":
            return gaussian_blur(images, blur_kernel_size, blur_sigma)
        if substrate == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        raise FamBenchError(
            f"Unknown substrate {substrate!r}; use one of {list(SUBSTRATES)}, a tensor "
            "broadcastable to the images, or a callable images -> (N, C, H, W)."
        )
    if isinstance(substrate, Tensor):
        try:
            return torch.broadcast_to(substrate.to(images), images.shape)
        except RuntimeError as err:
            raise FamBenchError(
                f"A substrate tensor of shape {tuple(substrate.shape)} does not broadcast to "
                f"the images {tuple(images.shape)}; use (C, 1, 1), (C, H, W) or (N, C, H, W)."
            ) from err
    if callable(substrate):
        out = substrate(images)
        if not isinstance(out, Tensor) or out.shape != images.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise FamBenchError(
                f"A substrate callable must return a tensor shaped like the images "
                f"{tuple(images.shape)}; it returned {got}."
            )
        return out.to(images)
    raise FamBenchError(
        f"substrate must be a name {list(SUBSTRATES)}, a tensor or a callable, got "
        f"{type(substrate).__name__}."
    )


def pixel_ranks(maps: Tensor) -> Tensor:
    """Rank of each pixel in the stable descending order of its map: ``(N, H*W)`` int32."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int32)
    return ranks.scatter_(1, order, positions.expand_as(order).contiguous())


def deletion_insertion(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Tensor,
    *,
    step: int = 224,
    deletion_substrate: Substrate = "zeros",
    insertion_substrate: Substrate = "blur",
    batch_size: int = 256,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    model: nn.Module | None = None,
    amp: bool = False,
) -> DeletionInsertionResult:
    """Deletion and insertion curves and AUCs for each image (module docstring).

    Args:
        score_fn: ``(perturbed (B, C, H, W), index (B,) long) -> (B,)``, the score of each
            perturbed image for the sample ``index`` it belongs to; a batch mixes samples
            and steps. It runs under ``torch.no_grad``; it owns the model's mode unless
            ``model`` is given.
        images: ``(N, C, H, W)`` normalised images on the model's device.
        maps: ``(N, H, W)`` maps at image resolution (only their order matters).
        step: pixels changed per step.
        deletion_substrate, insertion_substrate: ``"zeros" | "blur" | "mean"``, a tensor or a
            callable (:func:`make_substrate`).
        batch_size: perturbed images per ``score_fn`` call (the peak held at once).
        blur_kernel_size, blur_sigma: the ``"blur"`` substrate's kernel.
        model: if given, put in eval mode for the run and every module's mode restored.
        amp: call ``score_fn`` under bf16 autocast (channels_last inputs on CUDA; convert
            the model with ``model.to(memory_format=torch.channels_last)`` for full speed).

    Memory: besides one batch of perturbed images, the call holds the images, both
    substrates and the pixel ranks (about three copies of ``images``); pass the images
    in chunks (e.g. a data-loader batch) to bound it.
    """
    maps = check_images_maps(images, maps)
    if not bool(torch.isfinite(maps).all()):
        raise FamBenchError(
            "maps contain nan or inf, so their pixel order is undefined; fix the explainer "
            "or drop those samples before deletion/insertion."
        )
    check_positive_int("step", step)
    check_positive_int("batch_size", batch_size)
    n, _, h, w = images.shape
    hw = h * w
    n_steps = math.ceil(hw / step)
    device = images.device

    with torch.no_grad():
        deleted = make_substrate(
            deletion_substrate, images, blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma
        )
        inserted = make_substrate(
            insertion_substrate, images, blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma
        )
        # Pool of whole images a job picks its start and source from: [image | deletion
        # substrate | insertion substrate], indexed kind * N + sample.
        pool = torch.cat([images, deleted, inserted]).flatten(2)
        ranks = pixel_ranks(maps)

    shared_substrate = (
        isinstance(deletion_substrate, str) and deletion_substrate == insertion_substrate
    )
    jobs = _Jobs(n, n_steps, step, shared_substrate, device)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        sample = jobs.sample[start:stop]
        take_source = ranks.index_select(0, sample) < jobs.threshold[start:stop, None]
        perturbed = torch.where(
            take_source[:, None],
            pool.index_select(0, jobs.source[start:stop]),
            pool.index_select(0, jobs.start[start:stop]),
        )
        return perturbed.view(stop - start, -1, h, w), sample

    scores = stream_scores(
        score_fn, jobs.total, build, batch_size=batch_size, device=device, model=model, amp=amp
    ).view(n, jobs.per_sample)
    deletion_curve = scores[:, jobs.deletion_columns]
    insertion_curve = scores[:, jobs.insertion_columns]
    fractions = (
        (torch.arange(n_steps + 1, device=device, dtype=torch.float64) * step)
        .clamp_max(hw)
        .div(hw)
        .float()
    )
    return DeletionInsertionResult(
        deletion_auc=auc(deletion_curve),
        insertion_auc=auc(insertion_curve),
        deletion_curve=deletion_curve,
        insertion_curve=insertion_curve,
        fractions=fractions,
        step=step,
        n_steps=n_steps,
    )


class _Jobs:
    """The job table, on the device: for job ``j`` its sample, start and source pool rows,
    and pixel-rank threshold ``k*step`` (pixels with rank below it come from the source).

    Per sample the jobs are: the unperturbed image, deletion points ``1..n_steps``, then
    insertion points ``0..n_steps-1`` (point 0 skipped when it equals deletion's last).
    Jobs are sample-major, so consecutive batches mix neighbouring samples and steps.
    """

    def __init__(
        self, n: int, n_steps: int, step: int, shared_substrate: bool, device: torch.device
    ) -> None:
        image, deleted, inserted = 0, 1, 2
        ks = list(range(n_steps + 1))
        insertion_ks = ks[1:-1] if shared_substrate else ks[:-1]
        # (start kind, source kind, k) for each job of one sample.
        local = (
            [(image, image, 0)]
            + [(image, deleted, k) for k in ks[1:]]
            + [(inserted, image, k) for k in insertion_ks]
        )
        self.per_sample = len(local)
        self.total = n * self.per_sample
        self.deletion_columns = torch.tensor(ks, device=device)
        # Insertion point 0 is deletion's last point when the substrates are shared.
        insertion_columns = [n_steps] if shared_substrate else []
        insertion_columns += list(range(n_steps + 1, n_steps + 1 + len(insertion_ks)))
        self.insertion_columns = torch.tensor(insertion_columns + [0], device=device)

        table = torch.tensor(local, device=device, dtype=torch.long)
        sample = torch.arange(n, device=device).repeat_interleave(self.per_sample)
        self.sample = sample
        self.start = table[:, 0].repeat(n) * n + sample
        self.source = table[:, 1].repeat(n) * n + sample
        self.threshold = (table[:, 2] * step).to(torch.int32).repeat(n)
