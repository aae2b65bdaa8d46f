"""Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the first principal component of ``A``.

Class-agnostic: the map ignores the reference and shows how much of an explanation is
target-independent saliency. Per image the ``(h*w, K)`` matrix of activations is
centred over positions and projected on its first right singular vector ``v``; the map
is the ReLU of the projection ``X v``.

A singular vector is fixed only up to its sign, and the paper does not fix it:

- ``sign_correction=False`` (default, method ``eigencam``): the sign the SVD returns, as
  in the paper's method and pytorch-grad-cam's ``EigenCAM`` (``get_2d_projection``),
  which this equals (tested against the installed package). That sign is a property of
  the LAPACK routine, not of the data (torch's SVD and eigen-solvers pick the other sign
  for about half of the images), so this variant runs numpy's SVD on the host in float32,
  exactly as pytorch-grad-cam does: the one method that leaves the device.
- ``sign_correction=True`` (method ``eigencam_signed``): the projection is flipped when
  ``|min| > |max|``, Eq. 13 of Seg-Eigen-CAM (Chung & Ying, Applied Sciences 15(13) 7562,
  2025; pytorch-grad-cam's ``get_2d_projection_with_sign_correction``), so the larger
  lobe is the salient one whatever the solver. Computed on the device from the symmetric
  eigendecomposition of the smaller of ``X X^T`` and ``X^T X`` in float64.

Activations with a nan or inf give an all-nan map (flagged ``non-finite``), where
pytorch-grad-cam replaces them by zeros.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fam.explainer import Explainer
from fam.similarity import SimilarityTarget, as_float


class EigenCAM(Explainer):
    """Eigen-CAM: ReLU of the activations' first principal component, ``(N, h, w)``.

    Args:
        model, target_layer, amp: see :class:`fam.explainer.Explainer`.
        sign_correction: ``False`` (default): the SVD's own sign, equal to
            pytorch-grad-cam's ``EigenCAM``; ``True``: Seg-Eigen-CAM's sign correction
            (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        sign_correction: bool = False,
        amp: bool = False,
    ) -> None:
        super().__init__(model, target_layer, amp=amp)
        self.sign_correction = bool(sign_correction)

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        acts = as_float(acts)
        n, _, h, w = acts.shape
        if self.sign_correction:
            projection = _signed_projection(acts)
        else:
            projection = _lapack_projection(acts)
        return torch.relu(projection).view(n, h, w)


def _centred(acts: Tensor) -> Tensor:
    """``(N, K, h, w) -> (N, h*w, K)`` centred over positions."""
    x = acts.flatten(2).transpose(1, 2)
    return x - x.mean(dim=1, keepdim=True)


def _lapack_projection(acts: Tensor) -> Tensor:
    """``X v`` with ``v`` from numpy's SVD, per image: ``(N, h*w)`` on ``acts``' device."""
    x = _centred(acts).detach().cpu().numpy().astype(np.float32)
    out = np.full(x.shape[:2], np.nan, dtype=np.float32)
    for i, xi in enumerate(x):
        if np.isfinite(xi).all():
            _, _, vt = np.linalg.svd(xi, full_matrices=False)
            out[i] = xi @ vt[0]
    return torch.from_numpy(out).to(acts.device)


def _signed_projection(acts: Tensor) -> Tensor:
    """``X v`` flipped so that ``|max| >= |min|``: ``(N, h*w)`` on ``acts``' device."""
    _, k, h, w = acts.shape
    x = _centred(acts).double()
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.where(finite[:, None, None], x, 0.0)
    if h * w <= k:
        # X X^T u = sigma^2 u, and X v = sigma u for the top pair.
        values, vectors = torch.linalg.eigh(x @ x.mT)
        projection = vectors[..., -1] * values[:, -1:].clamp_min(0).sqrt()
    else:
        # X^T X v = sigma^2 v: the top right singular vector directly.
        _, vectors = torch.linalg.eigh(x.mT @ x)
        projection = (x @ vectors[..., -1:])[..., 0]
    projection = projection.float()
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    projection = torch.where(flip[:, None], -projection, projection)
    return torch.where(finite[:, None], projection, torch.nan)
