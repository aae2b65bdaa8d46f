"""Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018).

For each image, ``Y`` is the score of the image and ``O`` the score of its explanation
map image ``image * map`` (map in ``[0, 1]``, the same value on every channel of a
pixel; the product is taken in normalised input space, as torchcam does, so a zero map
value gives the dataset mean colour). Per sample:

- ``drop = max(0, Y - O) / Y * 100`` (``nan`` when ``Y == 0``: the relative drop is
  undefined; the caller excludes and counts it);
- ``increase = 100.0 if O > Y else 0.0``.

Their means over samples are the paper's Average Drop (%) and Increase in Confidence
(%). The score must be non-negative (a probability, or a similarity shifted to be
non-negative); a negative score raises :class:`~fam.errors.FamBenchError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evaluation._batched import ScoreFn, check_images_maps, check_positive_int, stream_scores
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
) -> ConfidenceChange:
    """Per-sample drop and increase in confidence.

    Args:
        score_fn: ``(images (B, C, H, W), index (B,) long) -> (B,)`` non-negative scores
            (see :func:`evaluation.deletion_insertion`).
        images: ``(N, C, H, W)``; maps: ``(N, H, W)`` in ``[0, 1]``.
        batch_size, model, amp: as in :func:`evaluation.deletion_insertion`.
    """
    maps = check_images_maps(images, maps)
    check_positive_int("batch_size", batch_size)
    if bool(((maps < 0) | (maps > 1)).any()):
        raise FamBenchError(
            "confidence_change needs maps in [0, 1] (they scale the image); min-max "
            "normalise them first (explainers return such maps)."
        )
    n, _, h, w = images.shape
    sample = torch.arange(n, device=images.device).repeat(2)
    # Jobs 0..N-1 score the images, N..2N-1 their explanation map images.
    factor = torch.cat([torch.ones_like(maps), maps]).view(2 * n, 1, h, w)

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        index = sample[start:stop]
        return images.index_select(0, index) * factor[start:stop], index

    scores = stream_scores(
        score_fn, 2 * n, build, batch_size=batch_size, device=images.device, model=model, amp=amp
    )
    y, o = scores[:n], scores[n:]
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
    return ConfidenceChange(drop=drop, increase=increase, score=y, explanation_score=o)
