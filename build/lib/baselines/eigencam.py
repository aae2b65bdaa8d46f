"""Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the first principal component of ``A``.

Class-agnostic: the map ignores the reference and shows how much of an explanation is
target-independent saliency. Per image the ``(h*w, K)`` matrix of activations is
centred over positions and projected on its first right singular vector ``v``. The
projection ``X v = sigma_1 u_1`` is computed from the symmetric eigendecomposition of the
smaller of ``X X^T`` (``h*w`` square) and ``X^T X`` (``K`` square) in float64: the same
vector as pytorch-grad-cam's SVD, at a fraction of the cost of a batched SVD. Singular
vectors are fixed only up to sign (LAPACK backends and devices differ), so the sign is
chosen as in pytorch-grad-cam's ``get_2d_projection_with_sign_correction``: the
projection is flipped when ``|min| > |max|``. The map is the ReLU of the projection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fam.explainer import Explainer
from fam.similarity import SimilarityTarget, as_float


class EigenCAM(Explainer):
    """Eigen-CAM: ReLU of the activations' first principal component, ``(N, h, w)``."""

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        acts = as_float(acts)
        n, k, h, w = acts.shape
        x = acts.flatten(2).transpose(1, 2).double()  # (N, h*w, K)
        x = x - x.mean(dim=1, keepdim=True)
        if h * w <= k:
            # X X^T u = sigma^2 u, and X v = sigma u for the top pair.
            values, vectors = torch.linalg.eigh(x @ x.mT)
            projection = vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()
        else:
            # X^T X v = sigma^2 v: the top right singular vector directly.
            _, vectors = torch.linalg.eigh(x.mT @ x)
            projection = (x @ vectors[..., -1:])[..., 0]
        projection = projection.float()  # (N, h*w)
        flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
        projection = torch.where(flip[:, None], -projection, projection)
        return torch.relu(projection).view(n, h, w)
