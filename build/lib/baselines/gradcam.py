"""Grad-CAM (Selvaraju et al., ICCV 2017) on the similarity score.

``alpha_k = mean_ij ds/dA_kij``; the map is ``ReLU(sum_k alpha_k A_k)``.
"""

from __future__ import annotations

from torch import Tensor

from fam.explainer import CAMExplainer


class GradCAM(CAMExplainer):
    """Grad-CAM: channel weights are the spatially averaged gradients."""

    needs_gradients = True

    def channel_weights(
        self, activations: Tensor, gradients: Tensor | None, score: Tensor
    ) -> Tensor:
        """``(N, K)`` mean of ``ds/dA`` over positions."""
        return gradients.mean(dim=(2, 3))
