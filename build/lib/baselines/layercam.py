"""LayerCAM (Jiang et al., IEEE TIP 2021) on the similarity score.

Each position keeps its own weight: ``M = ReLU(sum_k ReLU(ds/dA_kij) A_kij)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fam.explainer import CAMExplainer


class LayerCAM(CAMExplainer):
    """LayerCAM: positive gradients as per-position weights."""

    needs_gradients = True

    def channel_weights(
        self, activations: Tensor, gradients: Tensor | None, score: Tensor
    ) -> Tensor:
        """``(N, K, h, w)`` pixel weights ``ReLU(ds/dA)``."""
        return torch.relu(gradients)
