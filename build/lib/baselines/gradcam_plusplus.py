"""Grad-CAM++ (Chattopadhyay et al., WACV 2018) on the similarity score.

The exponential-free closed form of the paper's Eq. 19, as in pytorch-grad-cam::

    a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3 + eps),  zero where g == 0
    w_k   = sum_ij a_kij ReLU(g_kij)

with ``g = ds/dA``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fam.explainer import CAMExplainer

#: denominator stabiliser of the reference implementation
EPS = 1e-6


class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM++: positive gradients weighted by the second/third-order coefficients."""

    needs_gradients = True

    def channel_weights(
        self, activations: Tensor, gradients: Tensor | None, score: Tensor
    ) -> Tensor:
        """``(N, K)`` Grad-CAM++ weights."""
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        sum_a = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (torch.relu(gradients) * alpha).sum(dim=(2, 3))
