"""Deletion and insertion (Petsiuk, Das & Saenko, RISE, BMVC 2018).

The protocol is RISE's ``CausalMetric`` (``evaluation.py``) exactly:

- pixels are ordered by map value, descending; all channels of a pixel move together.
  Ties (``ties=``) carry no information, so they are ordered by something that scores
  like the floor. ``"smooth"`` (the runner's default, ``metric.ties``) orders tied pixels
  by ``tie_field``, the smooth random field the ``random`` method draws for that sample
  (:func:`fam.maps.smooth_noise`: noise at the target layer's resolution, upsampled):
  a constant map then scores exactly as ``random`` does on that sample, and a partly
  tied map is ranked smoothly inside its ties. ``"pixel"`` (this function's default, as it
  needs no field) orders them by an i.i.d. seeded permutation per pixel: salt-and-pepper
  deletion destroys an image faster than any smooth map, so a constant map beat the
  ``random`` floor on deletion (0.289 against 0.478 on few-shot). ``"stable"`` keeps
  row-major order among ties (RISE flips an ascending ``np.argsort``, which puts tied
  pixels in reverse order); a raster order deletes the top rows first;
- samples whose map has a nan or inf (explainers return such maps as all-nan) get nan
  curves and AUCs, so the caller excludes and counts them; the other samples are
  unaffected;
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
points that do not depend on the map (the unperturbed image = deletion's first and
insertion's last point, the fully deleted image, the pure insertion substrate; the last
two are one job when both curves use the same named substrate) are scored once per
image: with ``image_index`` the maps of several methods share them (issue 14).
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

from evaluation._batched import (
    ScoreFn,
    check_image_index,
    check_images_maps,
    check_positive_int,
    stream_scores,
)
from fam.errors import FamBenchError
from fam.maps import hash_keys

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


TIES = ("smooth", "pixel", "stable")


def pixel_ranks(
    maps: Tensor,
    ties: str = "stable",
    seed: int | torch.Generator | Tensor | None = None,
    tie_field: Tensor | None = None,
) -> Tensor:
    """Rank of each pixel in the descending order of its map: ``(N, H*W)`` int32.

    ``ties="stable"``: tied pixels in row-major order. ``"smooth"``: tied pixels in the
    descending order of ``tie_field`` ``(N, H, W)`` (then row-major). ``"pixel"``: tied
    pixels in an i.i.d. random order. Both sort the pixels by the tie key first, stably
    sort that order by the map, and map the order back. ``seed`` (``"pixel"``, see
    :func:`deletion_insertion`): a generator or an int draws the permutations from a
    stream; a ``(N,)`` integer tensor gives each sample its own seed and a permutation
    that depends on that seed alone (a counter-based hash of ``(seed, pixel)``, on the
    device), so a sample's order does not depend on which samples share its call.
    """
    flat = maps.flatten(1)
    if ties in ("pixel", "smooth"):
        if ties == "smooth":
            if tie_field is None or tie_field.shape != maps.shape:
                got = None if tie_field is None else tuple(tie_field.shape)
                raise FamBenchError(
                    f"ties='smooth' orders tied pixels by the random method's smooth field: "
                    f"pass tie_field shaped like the maps {tuple(maps.shape)} (got {got}; "
                    "fam.maps.smooth_noise draws it), or use ties='pixel' or 'stable'."
                )
            shuffle = torch.argsort(
                tie_field.flatten(1).to(flat.device), dim=1, descending=True, stable=True
            )
        elif isinstance(seed, Tensor):
            shuffle = hash_keys(seed.to(flat.device), flat.shape[1]).argsort(dim=1)
        else:
            generator = _generator(0 if seed is None else seed, flat.device)
            noise = torch.rand(flat.shape, device=flat.device, generator=generator)
            shuffle = noise.argsort(dim=1)
        order = shuffle.gather(
            1, torch.argsort(flat.gather(1, shuffle), dim=1, descending=True, stable=True)
        )
    elif ties == "stable":
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
    else:
        raise FamBenchError(f"ties must be one of {list(TIES)}, got {ties!r}.")
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
    ties: str = "pixel",
    seed: int | torch.Generator | Tensor = 0,
    tie_field: Tensor | None = None,
    image_index: Tensor | None = None,
) -> DeletionInsertionResult:
    """Deletion and insertion curves and AUCs for each map (module docstring).

    Args:
        score_fn: ``(perturbed (B, C, H, W), index (B,) long) -> (B,)``, the score of each
            perturbed image for the sample ``index`` it belongs to; a batch mixes samples
            and steps. It runs under ``torch.no_grad``; it owns the model's mode unless
            ``model`` is given.
        images: ``(N, C, H, W)`` normalised images on the model's device.
        maps: ``(N, H, W)`` maps at image resolution (only their order matters); with
            ``image_index``, ``(R, H, W)``: several maps (e.g. one per method) per image.
        image_index: ``(R,)`` the image each map explains (default: map ``i`` explains
            image ``i``). The map-independent points (the unperturbed image, the fully
            deleted image, the insertion substrate) are scored once per image, not once
            per map, and ``score_fn``'s ``index`` is the image's.
        step: pixels changed per step.
        deletion_substrate, insertion_substrate: ``"zeros" | "blur" | "mean"``, a tensor or a
            callable (:func:`make_substrate`).
        batch_size: perturbed images per ``score_fn`` call (the peak held at once).
        blur_kernel_size, blur_sigma: the ``"blur"`` substrate's kernel.
        model: if given, put in eval mode for the run and every module's mode restored.
        amp: call ``score_fn`` under bf16 autocast (channels_last inputs on CUDA; convert
            the model with ``model.to(memory_format=torch.channels_last)`` for full speed).
        ties: ``"smooth"``, ``"pixel"`` (default here: it needs no field; the runner's
            default is ``"smooth"``) or ``"stable"`` order of tied pixels (module docstring).
        tie_field: for ``ties="smooth"``: ``(N, H, W)`` one field per image (the
            ``random`` method's map of it, :func:`fam.maps.smooth_noise`); tied pixels
            go in its descending order.
        seed: for ``ties="pixel"``: an int seeding a fresh generator on the images'
            device (the same call gives the same curves), a ``torch.Generator`` on that
            device whose stream the call continues, or a per-map integer tensor ``(R,)``
            of seeds (e.g. dataset indices): each map's tie order then depends only on
            its own seed, whatever else is in the call.

    Samples whose map is not finite everywhere get nan AUCs and curves (the others are
    unaffected).

    Memory: besides one batch of perturbed images, the call holds the images, both
    substrates and the pixel ranks (about three copies of ``images``); pass the images
    in chunks (e.g. a data-loader batch) to bound it.
    """
    maps = check_images_maps(images, maps, shared=True)
    image_index = check_image_index(images, maps, image_index)
    if ties not in TIES:
        raise FamBenchError(f"ties must be one of {list(TIES)}, got {ties!r}.")
    if ties == "pixel" and isinstance(seed, Tensor):
        if seed.shape != (maps.shape[0],) or seed.is_floating_point():
            raise FamBenchError(
                f"A seed tensor needs one integer per map ({maps.shape[0]},), got "
                f"{tuple(seed.shape)} {seed.dtype}."
            )
    elif ties == "pixel":
        seed = _generator(seed, images.device)
    if ties == "smooth":
        if tie_field is None or tie_field.shape != (images.shape[0], *images.shape[-2:]):
            got = None if tie_field is None else tuple(tie_field.shape)
            raise FamBenchError(
                "ties='smooth' orders tied pixels by the random method's smooth field: pass "
                f"tie_field with one (H, W) field per image {(images.shape[0], *images.shape[-2:])}"
                f" (got {got}; fam.maps.smooth_noise draws it), or use ties='pixel' or 'stable'."
            )
        tie_field = tie_field.to(images.device).index_select(0, image_index)
    # A map with nan or inf has no pixel order: its sample is scored on a zero map (any
    # order would do) and its results are set to nan below, without a host sync.
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    maps = torch.where(finite[:, None, None], maps, 0.0)
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
        # substrate | insertion substrate], indexed kind * N + image.
        pool = torch.cat([images, deleted, inserted]).flatten(2)
        ranks = pixel_ranks(maps, ties, seed, tie_field)

    shared_substrate = (
        isinstance(deletion_substrate, str) and deletion_substrate == insertion_substrate
    )
    jobs = _Jobs(image_index, n, n_steps, step, shared_substrate)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        take_source = (
            ranks.index_select(0, jobs.map_row[start:stop]) < jobs.threshold[start:stop, None]
        )
        perturbed = torch.where(
            take_source[:, None],
            pool.index_select(0, jobs.source[start:stop]),
            pool.index_select(0, jobs.start[start:stop]),
        )
        return perturbed.view(stop - start, -1, h, w), jobs.image[start:stop]

    scores = stream_scores(
        score_fn, jobs.total, build, batch_size=batch_size, device=device, model=model, amp=amp
    )
    deletion_curve, insertion_curve = jobs.curves(scores)
    deletion_curve = torch.where(finite[:, None], deletion_curve, torch.nan)
    insertion_curve = torch.where(finite[:, None], insertion_curve, torch.nan)
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


def _generator(seed: int | torch.Generator, device: torch.device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device != device:
            raise FamBenchError(
                f"The tie-breaking generator is on {seed.device} but the images are on "
                f"{device}; create it with torch.Generator(device={str(device)!r})."
            )
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FamBenchError(f"seed must be an int or a torch.Generator, got {seed!r}.")
    return torch.Generator(device=device).manual_seed(seed)


class _Jobs:
    """The job table, on the device: for job ``j`` its image (``score_fn``'s index), the
    map whose pixel ranks it reads, its start and source pool rows, and its pixel-rank
    threshold ``k*step`` (pixels with rank below it come from the source).

    The map-independent points come first, once per image: the unperturbed image
    (deletion's first point, insertion's last), the fully deleted image (deletion's last)
    and the pure insertion substrate (insertion's first; the deletion's last again when
    both curves use the same named substrate). Then, per map, deletion points
    ``1..n_steps-1`` and insertion points ``1..n_steps-1``. Map jobs are map-major, so
    consecutive batches mix neighbouring maps and steps.
    """

    def __init__(
        self, image_index: Tensor, n: int, n_steps: int, step: int, shared_substrate: bool
    ) -> None:
        device = image_index.device
        r = image_index.shape[0]
        # No maps, no curves: the map-independent points would be scored for nothing
        # (and index the pixel ranks of a map that does not exist).
        n = n if r else 0
        kind_image, kind_deleted, kind_inserted = 0, 1, 2
        constant_kinds = [kind_image, kind_deleted] + ([] if shared_substrate else [kind_inserted])
        self.n, self.r = n, r
        self.n_constant = len(constant_kinds)
        # map-dependent jobs of one map: (start kind, source kind, k)
        inner = range(1, n_steps)
        local = [(kind_image, kind_deleted, k) for k in inner]
        local += [(kind_inserted, kind_image, k) for k in inner]
        self.per_map = len(local)
        self.total = n * self.n_constant + r * self.per_map

        images = torch.arange(n, device=device)
        kinds = torch.tensor(constant_kinds, device=device)
        # constant jobs: image-major, threshold 0 (nothing from the source: the start row)
        c_image = images.repeat_interleave(self.n_constant)
        c_start = kinds.repeat(n) * n + c_image
        c_zero = torch.zeros_like(c_image)
        table = torch.tensor(local, device=device, dtype=torch.long).view(-1, 3)
        row = torch.arange(r, device=device).repeat_interleave(self.per_map)
        m_image = image_index.index_select(0, row)
        self.image = torch.cat([c_image, m_image])
        self.map_row = torch.cat([c_zero, row])
        self.start = torch.cat([c_start, table[:, 0].repeat(r) * n + m_image])
        self.source = torch.cat([c_start, table[:, 1].repeat(r) * n + m_image])
        self.threshold = torch.cat([c_zero, (table[:, 2] * step).repeat(r)]).to(torch.int32)
        self.image_index = image_index
        self.column = {kind: i for i, kind in enumerate(constant_kinds)}
        self.column.setdefault(kind_inserted, self.column[kind_deleted])

    def curves(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, n_steps + 1)`` deletion and insertion curves from the jobs' scores."""
        constant = scores[: self.n * self.n_constant].view(self.n, self.n_constant)
        constant = constant.index_select(0, self.image_index)
        inner = scores[self.n * self.n_constant :].view(self.r, self.per_map)
        half = self.per_map // 2
        image, deleted, inserted = (constant[:, self.column[k], None] for k in (0, 1, 2))
        deletion = torch.cat([image, inner[:, :half], deleted], 1)
        insertion = torch.cat([inserted, inner[:, half:], image], 1)
        return deletion, insertion
