"""Score-CAM (Wang et al., CVPR Workshops 2020) on the similarity score.

Each channel map ``A_k`` is upsampled to the image size (bilinear, ``align_corners=True``
as in pytorch-grad-cam), min-max scaled to ``[0, 1]`` and used as a soft mask on the
input; the masked image's similarity to the reference is channel ``k``'s score. As in
pytorch-grad-cam the weights are the softmax of these scores over channels, and the map
is ``ReLU(sum_k w_k A_k)``.

Cost: ``K`` forward passes per image (``K`` = channels of the target layer), run as
batches of ``batch_size`` masked images packed across images and channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.maps import weighted_sum
from fam.similarity import SimilarityTarget, as_float

#: mask-scaling stabiliser of the reference implementation
EPS = 1e-8


class ScoreCAM(Explainer):
    """Score-CAM: channel weights from the scores of channel-masked inputs.

    Args:
        model, target_layer, amp: see :class:`fam.explainer.Explainer`.
        batch_size: masked images per forward pass (memory vs. speed).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        batch_size: int = 64,
        amp: bool = False,
    ) -> None:
        super().__init__(model, target_layer, amp=amp)
        if batch_size < 1:
            raise FamBenchError(f"ScoreCAM batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.check_reference(emb, target)
        acts = as_float(acts)
        return weighted_sum(self.channel_weights(images, acts, target), acts)

    def channel_weights(self, images: Tensor, acts: Tensor, target: SimilarityTarget) -> Tensor:
        """Softmax over channels of the masked-input scores, ``(N, K)``."""
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
            scores.append(SimilarityTarget(target.reference[image_idx], target.fn)(emb))
        return torch.softmax(torch.cat(scores).view(n, k), dim=1)
