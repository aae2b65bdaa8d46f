"""Streaming perturbed images through a score function, shared by the causal metrics.

A metric describes its work as ``n_jobs`` perturbed images and a ``build(start, stop)``
function that makes the images of jobs ``start:stop`` on the device. This module runs the
jobs in batches of at most ``batch_size`` images, writes the scores into one preallocated
device tensor (slice assignment: no host sync inside the loop), and owns the run-time
context: ``torch.no_grad``, the model's eval mode (when the model is given) and the
optional bf16 autocast. Whether to autocast is never decided here: ``amp`` is the
caller's value (in a run, ``metric.amp`` resolved once by the pipeline,
:func:`experiments.identity.resolve_amp`, and read from the metric settings); this
module only applies it, with the inputs in channels_last on CUDA, where bf16
convolutions are fastest in that layout.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, nullcontext

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.layers import eval_mode

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(perturbed (B, 3, H, W), index (B,) long) -> (B,)``: the task score of each
perturbed image for the sample ``index`` it was made from (reference held fixed)."""


def check_image_index(images: Tensor, maps: Tensor, image_index: Tensor | None) -> Tensor:
    """Validate the image of each map: ``(R,)`` long into ``images`` (default: map ``i``
    explains image ``i``, so ``R == N``). Returns it on the images' device."""
    n, r = images.shape[0], maps.shape[0]
    if image_index is None:
        if r != n:
            raise FamBenchError(
                f"{r} maps for {n} images: pass image_index (the image of each map) when "
                "several maps explain the same image."
            )
        return torch.arange(n, device=images.device)
    index = torch.as_tensor(image_index, device=images.device)
    if index.shape != (r,) or index.is_floating_point():
        raise FamBenchError(
            f"image_index needs one integer per map ({r},), got {tuple(index.shape)} {index.dtype}."
        )
    if r and not bool(((index >= 0) & (index < n)).all()):
        raise FamBenchError(f"image_index must lie in [0, {n}) (one of the {n} images).")
    return index.long()


def check_images_maps(images: Tensor, maps: Tensor, shared: bool = False) -> Tensor:
    """Validate ``images (N, C, H, W)`` and ``maps (N, H, W)`` (``shared``: ``(R, H, W)``,
    any number of maps of those images); return maps as float."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FamBenchError(f"images must be a float tensor (N, C, H, W), got {got}.")
    if not isinstance(maps, Tensor):
        raise FamBenchError(f"maps must be a tensor (N, H, W), got {type(maps).__name__}.")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    n, _, h, w = images.shape
    if shared and maps.dim() == 3:
        n = maps.shape[0]
    if tuple(maps.shape) != (n, h, w):
        raise FamBenchError(
            f"maps have shape {tuple(maps.shape)} but the images {tuple(images.shape)} need "
            f"({n}, {h}, {w}): one map per image at image resolution. Upsample the maps "
            "(explainers do so with upsample=True)."
        )
    if maps.device != images.device:
        raise FamBenchError(
            f"maps are on {maps.device} but images are on {images.device}; put both on the "
            "model's device."
        )
    return maps.float()


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FamBenchError(f"{name} must be a positive integer, got {value!r}.")
    return value


def stream_scores(
    score_fn: ScoreFn,
    n_jobs: int,
    build: Callable[[int, int], tuple[Tensor, Tensor]],
    *,
    batch_size: int,
    device: torch.device,
    model: nn.Module | None = None,
    amp: bool = False,
) -> Tensor:
    """Score ``n_jobs`` perturbed images, ``batch_size`` at a time: ``(n_jobs,)`` float32.

    ``build(start, stop)`` returns ``(images (stop - start, C, H, W), index (stop - start,))``.
    Only one batch of perturbed images exists at a time, so peak memory does not grow
    with the number of jobs. ``amp``: score under bf16 autocast (as decided by the
    caller; channels_last inputs on CUDA).
    """
    scores = torch.empty(n_jobs, device=device, dtype=torch.float32)
    channels_last = amp and device.type == "cuda"
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if model is not None:
            stack.enter_context(eval_mode(model))
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()
        )
        for start in range(0, n_jobs, batch_size):
            stop = min(start + batch_size, n_jobs)
            batch, index = build(start, stop)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = score_fn(batch, index)
            if not isinstance(out, Tensor) or tuple(out.shape) != (stop - start,):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise FamBenchError(
                    f"score_fn must return one score per perturbed image, shape "
                    f"({stop - start},); it returned {got}. Select the explained score per "
                    "sample (e.g. the similarity to index's reference)."
                )
            scores[start:stop] = out.detach()
    return scores
