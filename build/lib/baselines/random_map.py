"""The random floor: uniform noise at the target layer's resolution.

Upsampled like every CAM map, so it has the same smoothness as a real explanation; any
method worth using must beat it on every metric.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fam.explainer import Explainer
from fam.similarity import SimilarityTarget


class RandomMap(Explainer):
    """Uniform ``[0, 1)`` noise maps ``(N, h, w)``, generated on the images' device.

    Args:
        model, target_layer: see :class:`fam.explainer.Explainer` (the layer fixes the
            map resolution).
        seed: seeds a generator owned by the explainer (created on first use on the
            images' device); successive calls continue its stream, so a run is
            reproducible. ``None`` uses torch's global generator.
    """

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, *, seed: int | None = 0
    ) -> None:
        super().__init__(model, target_layer)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        n, _, h, w = acts.shape
        return torch.rand(
            n, h, w, generator=self._generator_on(images.device), device=images.device
        )

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator
