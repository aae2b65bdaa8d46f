"""The random floor: uniform noise at the target layer's resolution.

Upsampled like every CAM map, so it has the same smoothness as a real explanation; any
method worth using must beat it on every metric. In a run each sample's noise is seeded
by that sample alone (``sample_seeds``, the seed the runner also gives its tie order), so
the map is the very field that orders tied pixels under ``metric.ties=smooth``
(:func:`fam.maps.smooth_noise`): a constant map scores exactly as this floor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.layers import eval_mode
from fam.maps import seeded_noise, smooth_noise
from fam.similarity import SimilarityLike, SimilarityTarget


class RandomMap(Explainer):
    """Uniform ``[0, 1]`` noise maps ``(N, h, w)``, generated on the images' device.

    Args:
        model, target_layer: see :class:`fam.explainer.Explainer` (the layer fixes the
            map resolution).
        seed: seeds a generator owned by the explainer (created on first use on the
            images' device); successive calls continue its stream, so a run is
            reproducible. ``None`` uses torch's global generator. A call given
            ``sample_seeds`` draws each sample's noise from its own seed instead
            (:func:`fam.maps.seeded_noise`), whatever ``seed`` is.
    """

    #: the runner passes each sample's seed (``sample_seeds=``), as for the tie order
    needs_sample_seeds = True

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, *, seed: int | None = 0
    ) -> None:
        super().__init__(model, target_layer)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._sample_seeds: Tensor | None = None

    def __call__(
        self,
        images: Tensor,
        reference: Tensor,
        similarity: SimilarityLike = "cosine",
        upsample: bool = True,
        sample_seeds: Tensor | None = None,
    ) -> Tensor:
        """Maps as :meth:`Explainer.__call__`; ``sample_seeds`` ``(N,)`` integers: one
        noise field per sample, a function of its seed alone."""
        if sample_seeds is not None and tuple(sample_seeds.shape) != (len(images),):
            raise FamBenchError(
                f"sample_seeds must hold one integer per image ({len(images)},), got "
                f"{tuple(sample_seeds.shape)}."
            )
        self._sample_seeds = sample_seeds
        try:
            return super().__call__(images, reference, similarity, upsample)
        finally:
            self._sample_seeds = None

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        n, _, h, w = acts.shape
        if self._sample_seeds is not None:
            return seeded_noise(self._sample_seeds.to(images.device), (h, w))
        return torch.rand(
            n, h, w, generator=self._generator_on(images.device), device=images.device
        )

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def smooth_tie_field(
    model: nn.Module, target_layer: str | nn.Module | None, images: Tensor, sample_seeds: Tensor
) -> Tensor:
    """``(N, H, W)``: the map :class:`RandomMap` draws for each image with its seed, the
    order of tied pixels under ``metric.ties=smooth``. One forward pass of one image finds
    the target layer's resolution."""
    explainer = RandomMap(model, target_layer)
    with torch.no_grad(), eval_mode(model):
        _, acts = explainer.forward(images[:1])
    return smooth_noise(sample_seeds.to(images.device), acts.shape[-2:], images.shape[-2:])
