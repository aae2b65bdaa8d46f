"""Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018).

For each image, ``Y`` is the score of the image and ``O`` the score of its explanation
map image ``E = image * map`` (map in ``[0, 1]``, the same value on every channel of a
pixel). Where the product is taken (``space=``):

- ``"image"``: the paper's definition (Chattopadhyay et al. 2018, Sec. 4: the map
  multiplies the original image): de-normalise ``x = z * std + mean``, multiply,
  re-normalise ``(x * map - mean) / std``, so a zero map value gives black;
- ``"normalised"``: ``z * map`` in normalised input space (torchcam does this, and this
  suite did before), so a zero map value gives the dataset mean colour.

Per sample:

- ``drop = max(0, Y - O) / Y * 100`` (``nan`` when ``Y == 0``: the relative drop is
  undefined; the caller excludes and counts it);
- ``increase = 100.0 if O > Y else 0.0``.

Their means over samples are the paper's Average Drop (%) and Increase in Confidence
(%). The score must be non-negative (a probability, or a similarity shifted to be
non-negative); a negative score raises :class:`~fam.errors.FamBenchError`. A sample whose
map has a nan or inf gets nan for every value (the others are unaffected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evaluation._batched import (
    ScoreFn,
    check_image_index,
    check_images_maps,
    check_positive_int,
    stream_scores,
)
from fam.errors import FamBenchError


@dataclass
class ConfidenceChange:
    """Per-sample values ``(N,)`` on the images' device (module docstring)."""

    drop: Tensor
    increase: Tensor
    score: Tensor
    explanation_score: Tensor


def confidence_change(
    score_fn: ScoreFn,
    images: Tensor,
    maps: Tensor,
    *,
    batch_size: int = 256,
    model: nn.Module | None = None,
    amp: bool = False,
    space: str = "normalised",
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    image_index: Tensor | None = None,
) -> ConfidenceChange:
    """Per-map drop and increase in confidence.

    Args:
        score_fn: ``(images (B, C, H, W), index (B,) long) -> (B,)`` non-negative scores
            (see :func:`evaluation.deletion_insertion`).
        images: ``(N, C, H, W)`` normalised; maps: ``(N, H, W)`` in ``[0, 1]``.
        batch_size, model, amp: as in :func:`evaluation.deletion_insertion`.
        space: ``"image"`` (the paper's definition; needs ``mean`` and ``std``) or
            ``"normalised"`` (module docstring). The default stays ``"normalised"``
            because only the caller knows the data's normalisation; pass ``"image"``
            with it to follow the paper.
        mean, std: the per-channel normalisation of ``images`` (``C`` values each,
            ``images = (x - mean) / std``), for ``space="image"``.
        image_index: ``(R,)`` the image each of ``R`` maps explains (default: map ``i``
            explains image ``i``); the unperturbed image is scored once per image, and
            ``score_fn``'s ``index`` is the image's.
    """
    maps = check_images_maps(images, maps, shared=True)
    image_index = check_image_index(images, maps, image_index)
    check_positive_int("batch_size", batch_size)
    shift, scale = _normalisation(space, mean, std, images)
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    maps = torch.where(finite[:, None, None], maps, 1.0)
    if bool(((maps < 0) | (maps > 1)).any()):
        raise FamBenchError(
            "confidence_change needs maps in [0, 1] (they scale the image); min-max "
            "normalise them first (explainers return such maps)."
        )
    n, _, h, w = images.shape
    r = maps.shape[0]
    sample = torch.cat([torch.arange(n, device=images.device), image_index])
    # Jobs 0..N-1 score the images (factor 1), N..N+R-1 the maps' explanation images.
    ones = torch.ones(n, h, w, device=maps.device, dtype=maps.dtype)
    factor = torch.cat([ones, maps]).view(n + r, 1, h, w)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        index = sample[start:stop]
        chosen = images.index_select(0, index)
        if scale is None:
            return chosen * factor[start:stop], index
        # x * map in image space, back in normalised space: (z s + m) f - m) / s.
        return ((chosen * scale + shift) * factor[start:stop] - shift) / scale, index

    scores = stream_scores(
        score_fn, n + r, build, batch_size=batch_size, device=images.device, model=model, amp=amp
    )
    y, o = scores[:n].index_select(0, image_index), scores[n:]
    if bool((scores < 0).any()):
        raise FamBenchError(
            "Average Drop / Increase in Confidence need a non-negative score, but score_fn "
            "returned negative values. Use a probability (e.g. the episode softmax) or shift "
            "the similarity (cosine + 1)."
        )
    drop = torch.where(
        y > 0, (y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny) * 100, math.nan
    )
    increase = (o > y).float() * 100
    return ConfidenceChange(
        drop=torch.where(finite, drop, math.nan),
        increase=torch.where(finite, increase, math.nan),
        score=y,
        explanation_score=torch.where(finite, o, math.nan),
    )


SPACES = ("image", "normalised")


def _normalisation(space: str, mean, std, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(mean, std)`` as ``(C, 1, 1)`` tensors for ``space="image"``, else ``(None, None)``."""
    if space not in SPACES:
        raise FamBenchError(f"space must be one of {list(SPACES)}, got {space!r}.")
    if space == "normalised":
        return None, None
    c = images.shape[1]
    if mean is None or std is None:
        raise FamBenchError(
            "confidence_change(space='image') multiplies the original image, so it needs "
            "the normalisation of the images: pass mean= and std= (one value per channel)."
        )
    out = []
    for name, value in (("mean", mean), ("std", std)):
        t = torch.as_tensor(value, dtype=images.dtype).to(images.device).flatten()
        if t.numel() != c:
            raise FamBenchError(f"{name} needs one value per channel ({c}), got {t.numel()}.")
        out.append(t.view(c, 1, 1))
    if bool((out[1] <= 0).any()):
        raise FamBenchError("std must be positive for every channel.")
    return out[0], out[1]
