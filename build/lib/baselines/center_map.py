"""The centre-bias floor: a Gaussian centred on the map, the same for every image.

Photographs put objects near the centre; a method that does not beat this map is
reporting the dataset's framing, not the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.similarity import SimilarityTarget


class CenterMap(Explainer):
    """Centre Gaussian maps ``(N, h, w)`` at the target layer's resolution.

    Args:
        model, target_layer: see :class:`fam.explainer.Explainer`.
        sigma: standard deviation as a fraction of the map's height (rows) and width
            (columns).
    """

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, *, sigma: float = 0.25
    ) -> None:
        super().__init__(model, target_layer)
        if not sigma > 0:
            raise FamBenchError(f"CenterMap sigma must be > 0 (fraction of the side), got {sigma}.")
        self.sigma = sigma

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        n, _, h, w = acts.shape
        # Pixel centres in units of the side length, 0 at the centre of the map.
        ys = (torch.arange(h, device=images.device) + 0.5) / h - 0.5
        xs = (torch.arange(w, device=images.device) + 0.5) / w - 0.5
        sq = ys[:, None].pow(2) + xs[None, :].pow(2)
        gauss = torch.exp(-sq / (2 * self.sigma**2))
        return gauss.expand(n, h, w).clone()
