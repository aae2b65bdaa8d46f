"""XGrad-CAM (Fu et al., BMVC 2020) on the similarity score.

``w_k = sum_ij (A_kij / (sum_ab A_kab + eps)) ds/dA_kij``: gradients weighted by the
channel's normalised activations.
"""

from __future__ import annotations

from torch import Tensor

from fam.explainer import CAMExplainer

#: denominator stabiliser of the reference implementation
EPS = 1e-7


class XGradCAM(CAMExplainer):
    """XGrad-CAM: activation-weighted gradient sums."""

    needs_gradients = True

    def channel_weights(
        self, activations: Tensor, gradients: Tensor | None, score: Tensor
    ) -> Tensor:
        """``(N, K)`` XGrad-CAM weights."""
        sum_a = activations.sum(dim=(2, 3), keepdim=True)
        return (gradients * activations / (sum_a + EPS)).sum(dim=(2, 3))
