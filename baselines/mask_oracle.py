"""The ground-truth oracle: the object's mask, lightly blurred, as a map.

Not an explanation of the model but a check of the metrics: on a setup with exact masks a
faithfulness metric under which the true object does not beat a ``random`` map measures
something else (the substrate, the score's saturation), and the summary flags it. The
blur (Gaussian, ``sigma = blur * image side``, 0.03 = 1 px at 32 px, 7 px at 224 px) ranks
an object's interior above its rim, so deletion removes the object's core first and the
map's maximum lies inside the object; pixels off the object stay (near) zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.layers import eval_mode
from fam.maps import minmax_normalise
from fam.similarity import SimilarityLike, SimilarityTarget


def gaussian_blur_maps(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` maps (replicate padding, radius 3 sigma)."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


class MaskOracle(Explainer):
    """Maps ``(N, H, W)`` = the blurred ground-truth masks, min-max normalised.

    The runner passes the unit's masks (``needs_masks``). Without masks (a dataset with no
    ground truth) the maps are zero and flagged degenerate (``"no ground truth"``); an
    empty mask gives a zero map, flagged the same way.

    Args:
        model, target_layer: used only to check the inputs (one forward pass) and for the
            layer resolution of ``upsample=False`` maps.
        blur: Gaussian sigma as a fraction of the image side (0 = the binary mask).
    """

    needs_masks = True

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, *, blur: float = 0.03
    ) -> None:
        super().__init__(model, target_layer)
        if blur < 0:
            raise FamBenchError(f"mask blur must be >= 0, got {blur}.")
        self.blur = blur
        self._reasons: list[str] | None = None

    @property
    def degenerate_reason(self) -> list[str] | None:
        """Per sample of the last call: ``""`` or ``"no ground truth"`` (an empty mask)."""
        return self._reasons

    def __call__(
        self,
        images: Tensor,
        reference: Tensor,
        similarity: SimilarityLike = "cosine",
        upsample: bool = True,
        masks: Tensor | None = None,
    ) -> Tensor:
        """The blurred masks ``(N, H, W)``; ``upsample=False``: area-averaged to the target
        layer's resolution ``(N, h, w)`` like every method's raw maps."""
        reference = self._check_inputs(images, reference)
        # one forward pass checks the reference and the similarity like every method's
        with torch.no_grad(), eval_mode(self.model):
            emb, acts = self.forward(images)
            self.score(emb, SimilarityTarget(reference, similarity))
        self._layer_size = tuple(acts.shape[-2:])
        n, _, h, w = images.shape
        if masks is None:
            maps = images.new_zeros(n, h, w, dtype=torch.float32)
            self.degenerate = torch.ones(n, dtype=torch.bool, device=images.device)
            self._reasons = ["no ground truth"] * n
            return maps if upsample else self._at_layer(maps)
        if tuple(masks.shape) != (n, h, w):
            raise FamBenchError(
                f"masks must have shape ({n}, {h}, {w}) like the images, got {tuple(masks.shape)}."
            )
        maps = gaussian_blur_maps(masks.to(images.device).float(), self.blur * max(h, w))
        maps = maps * (masks.flatten(1).any(1)[:, None, None]).float()
        empty = maps.flatten(1).amax(1) <= 0
        self.degenerate = empty
        self._reasons = ["no ground truth" if e else "" for e in empty.tolist()]
        maps = minmax_normalise(maps)
        return maps if upsample else self._at_layer(maps)

    def _at_layer(self, maps: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(maps[:, None], self._layer_size)[:, 0]
