"""The uninformative map: the same value at every pixel.

It ranks nothing, so every pixel ties; it is flagged degenerate and scores whatever the
metrics give ties. Under ``metric.ties=smooth`` that is exactly the ``random`` floor of
the sample (tied pixels follow the random method's field), which is what a map that
carries no information deserves; under ``ties=pixel`` (i.i.d. salt-and-pepper order) it
beat the floor on deletion. It is the check that ties are neutral.
"""

from __future__ import annotations

from torch import Tensor

from fam.explainer import Explainer
from fam.similarity import SimilarityTarget


class ConstantMap(Explainer):
    """All-ones maps ``(N, h, w)`` at the target layer's resolution (all zeros, flagged
    ``constant``, after the usual min-max scaling)."""

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        n, _, h, w = acts.shape
        return acts.new_ones(n, h, w, dtype=acts.dtype).float()
