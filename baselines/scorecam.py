"""Score-CAM (Wang et al., CVPR Workshops 2020) on the task's probability or the similarity.

Each channel map ``A_k`` is upsampled to the image size (bilinear, ``align_corners=True``
as in pytorch-grad-cam), min-max scaled to ``[0, 1]`` and used as a soft mask on the
input; the masked image's score is channel ``k``'s weight source, and the map is
``ReLU(sum_k w_k A_k)``.

- ``score="probability"`` (default; the paper's post-softmax score): ``w_k`` is the task's
  probability of the masked image (few-shot: the episode softmax of the explained class;
  contrastive / retrieval: the softmax over the reference and its distractors), as in the
  authors' code (``haofanwang/Score-CAM``, weights = post-softmax class score). The runner
  passes that probability as ``task_score(emb (B, D), index (B,)) -> (B,)``.
- ``score="similarity"``: pytorch-grad-cam's variant, ``w = softmax_k`` of the raw
  similarities to the reference. On non-negative pooled embeddings the cosines of the
  masked images are nearly equal, so this softmax is almost flat (max/min weight ratio
  about 1.03 on a ResNet-18) and the map barely depends on the reference.

Cost: ``K`` forward passes per image (``K`` = channels of the target layer), run as
batches of ``batch_size`` masked images packed across images and channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.maps import weighted_sum
from fam.similarity import SimilarityLike, SimilarityTarget, as_float

TaskScore = Callable[[Tensor, Tensor], Tensor]

#: mask-scaling stabiliser of the reference implementation
EPS = 1e-8


class ScoreCAM(Explainer):
    """Score-CAM: channel weights from the scores of channel-masked inputs.

    Args:
        model, target_layer, amp: see :class:`fam.explainer.Explainer`.
        score: ``"probability"`` (the task's post-softmax score, passed to the call as
            ``task_score``) or ``"similarity"`` (pytorch-grad-cam's softmax over channels).
        batch_size: masked images per forward pass (memory vs. speed).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        score: str = "probability",
        batch_size: int = 64,
        amp: bool = False,
    ) -> None:
        super().__init__(model, target_layer, amp=amp)
        if batch_size < 1:
            raise FamBenchError(f"ScoreCAM batch_size must be >= 1, got {batch_size}.")
        if score not in ("probability", "similarity"):
            raise FamBenchError(
                f"ScoreCAM score must be 'probability' or 'similarity', got {score!r}."
            )
        self.batch_size = batch_size
        self.score_kind = score
        self._task_score: TaskScore | None = None

    @property
    def needs_task_score(self) -> bool:
        """Whether the call needs ``task_score`` (the runner passes the unit's)."""
        return self.score_kind == "probability"

    def __call__(
        self,
        images: Tensor,
        reference: Tensor,
        similarity: SimilarityLike = "cosine",
        upsample: bool = True,
        task_score: TaskScore | None = None,
    ) -> Tensor:
        """As :meth:`fam.explainer.Explainer.__call__`; ``task_score(emb (B, D), index
        (B,)) -> (B,)`` is the probability of image ``index`` of this call (needed with
        ``score="probability"``)."""
        if self.needs_task_score and task_score is None:
            raise FamBenchError(
                "ScoreCAM(score='probability') explains the task's probability: pass "
                "task_score=fn(emb (B, D), index (B,)) -> (B,) (the runner passes the task's "
                "own), or use score='similarity' for the raw similarity."
            )
        self._task_score = task_score
        try:
            return super().__call__(images, reference, similarity, upsample)
        finally:
            self._task_score = None

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.check_reference(emb, target)
        acts = as_float(acts)
        return weighted_sum(self.channel_weights(images, acts, target), acts)

    def channel_weights(self, images: Tensor, acts: Tensor, target: SimilarityTarget) -> Tensor:
        """``(N, K)``: the masked inputs' probabilities, or the softmax over channels of
        their similarities (``score="similarity"``)."""
        n, k = acts.shape[:2]
        size = tuple(images.shape[-2:])
        # Jobs (image i, channel c) in image-major order, packed into fixed-size batches;
        # indices stay on the device so the loop never waits for the host.
        jobs = torch.arange(n * k, device=acts.device)
        scores = []
        for start in range(0, n * k, self.batch_size):
            job = jobs[start : start + self.batch_size]
            image_idx, channel_idx = job // k, job % k
            maps = acts[image_idx, channel_idx][:, None]
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
            lo = maps.amin(dim=(2, 3), keepdim=True)
            hi = maps.amax(dim=(2, 3), keepdim=True)
            masks = (maps - lo) / (hi - lo + EPS)
            masked = images[image_idx] * masks.to(images.dtype)
            with self.autocast(images.device):
                emb = as_float(self.model(self.prepare(masked)))
            if self._task_score is not None and self.needs_task_score:
                scores.append(self._task_score(emb, image_idx))
            else:
                scores.append(SimilarityTarget(target.reference[image_idx], target.fn)(emb))
        scores = torch.cat(scores).view(n, k)
        return scores if self.needs_task_score else torch.softmax(scores, dim=1)
