"""The ground-truth oracle: the object's mask, lightly blurred, as a map.

Not an explanation of the model but a check of the metrics: on a setup with exact masks a
faithfulness metric under which the true object does not beat a ``random`` map measures
something else (the substrate, the score's saturation), and the summary flags it.

The map is a soft step across the object's outline: the logistic of the pixel's signed
distance to the outline (positive inside), ``sigmoid(d / (blur * image side))`` (0.03 = 1 px
at 32 px, 7 px at 224 px). Every object pixel ranks above every background pixel; inside,
the core ranks above the rim, so deletion removes the object's core first and the map's
maximum lies inside the object; outside, pixels near the object rank above far ones. The
last point matters for the causal curves: a Gaussian-blurred mask is exactly zero a few
sigma off the object, so the background's order was left to the metric's tie-breaking
(random under ``metric.ties=random``), and after the object the insertion curve filled
the background as salt-and-pepper noise, an out-of-distribution image that scored below a
random map's (issue 10: insertion AUC 0.217 for the blurred mask against 0.232 for
``random`` on ``synthetic_retrieval``). The distances are Euclidean distance transforms
(scipy, on the host: masks come from the data loader, and the oracle is no hot path).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.layers import eval_mode
from fam.maps import minmax_normalise
from fam.similarity import SimilarityLike, SimilarityTarget


def signed_distance(masks: Tensor) -> Tensor:
    """Euclidean distance of each pixel centre to the mask's outline, positive inside.

    ``(N, H, W)`` bool -> float32 on the masks' device. The outline lies half-way between
    an object pixel and its nearest background pixel, so a pixel next to it is at +-0.5;
    an empty mask gives ``-inf`` everywhere, a full one ``+inf``.
    """
    out = np.empty(masks.shape, dtype=np.float32)
    for i, mask in enumerate(masks.detach().cpu().numpy().astype(bool)):
        if not mask.any() or mask.all():
            out[i] = np.inf if mask.all() else -np.inf
            continue
        inside = ndimage.distance_transform_edt(mask)  # to the nearest background pixel
        outside = ndimage.distance_transform_edt(~mask)  # to the nearest object pixel
        out[i] = np.where(mask, inside - 0.5, 0.5 - outside)
    return torch.from_numpy(out).to(masks.device)


def soft_masks(masks: Tensor, scale: float) -> Tensor:
    """``sigmoid(signed_distance / scale)``: 1 deep inside, 0.5 on the outline, decaying
    with the distance outside (never exactly 0 within float32 range for images up to
    ~80 scales across). ``scale <= 0``: the binary mask."""
    if scale <= 0:
        return masks.float()
    return torch.sigmoid(signed_distance(masks) / scale)


class MaskOracle(Explainer):
    """Maps ``(N, H, W)`` = the softened ground-truth masks (module docstring), min-max
    normalised.

    The runner passes the unit's masks (``needs_masks``). Without masks (a dataset with no
    ground truth) the maps are zero and flagged degenerate (``"no ground truth"``); an
    empty mask gives a zero map, flagged the same way.

    Args:
        model, target_layer: used only to check the inputs (one forward pass) and for the
            layer resolution of ``upsample=False`` maps.
        blur: the logistic's scale as a fraction of the image side (0 = the binary mask,
            whose ties the metrics break by their own rule).
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
        """The soft masks ``(N, H, W)``; ``upsample=False``: area-averaged to the target
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
        masks = masks.to(images.device).bool()
        empty = ~masks.flatten(1).any(1)
        maps = soft_masks(masks, self.blur * max(h, w))
        maps = torch.where(empty[:, None, None], torch.zeros_like(maps), maps)
        self.degenerate = empty
        self._reasons = ["no ground truth" if e else "" for e in empty.tolist()]
        maps = minmax_normalise(maps)
        return maps if upsample else self._at_layer(maps)

    def _at_layer(self, maps: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(maps[:, None], self._layer_size)[:, 0]
