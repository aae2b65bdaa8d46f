"""Feature Activation Map (FAM; Liao, Gao & Zhang, arXiv 2307.05017).

Channel weights come from the similarity score itself. Two contributions ``c_k``:

- ``contribution="product"`` (the paper's, default): channel ``k``'s share of the score,
  ``ê_k r̂_k`` for cosine (L2-normalised embedding and reference, so ``sum_k c_k = cos``)
  and ``e_k r_k`` for dot. ProtoNet's negative squared Euclidean distance has no source
  in the authors' code; the suite's reading is ``2 e_k r_k - e_k^2`` (the drop in score
  when channel ``k`` is removed; the split sums to ``s + |r|^2``, and ``|r|^2`` does not
  depend on the image).
- ``contribution="ablation"`` (the suite's variant, ``fam_ablation``): the drop in
  similarity when channel ``k`` is removed from the embedding,
  ``c_k = s(e, r) - s(e with channel k zeroed, r)``.

ProtoNet's unsquared distance ``euclidean_distance`` (``-||e - r||``, easyfsl's logit;
``task.distance=euclidean``) is also the suite's reading: the exact ablation is
``c_k = sqrt(d^2 + 2 p_k - q_k) - d`` (``d = ||e - r||``, ``p_k``, ``q_k`` channel k's
shares of ``e.r`` and ``|e|^2``) and the product split ``(2 p_k - q_k) / (2 d)`` is its
first order.

Two weightings:

- ``weights="minmax"`` (default; the first author's public code, see below):
  ``w = minmax(c / |sum_j c_j|)`` over the channels, in ``[0, 1]`` (all-equal ``c``
  gives ``w = 1``, as in that code), and the map is ``minmax(sum_k w_k A_k)`` at the
  layer's resolution, with no ReLU;
- ``weights="abs_sum"``: ``w = c / sum_j |c_j|`` and the map is ``ReLU(sum_k w_k A_k)``.

The evidence for ``product`` + ``minmax``: the first author's code for a later paper by
the same authors (github.com/ly9802/DynamicAccumulatedAttentionMap) computes the FAM
step in ``contri_weight_generate`` / ``contribution_weight`` / ``max_min_normal``
(``DINO_DAAM_Visualization_oneSample.py``) and ``linear_combine_allchannels`` /
``generate_saliency_map`` (``DynamicalAccumul.py``, commit 368ad1d): the per-dimension
product of the normalised embedding and the reference, divided by the absolute
similarity, min-max scaled, used as the coefficients of a plain channel sum that is
min-max normalised and resized bilinearly. The explainer then min-max normalises the
resized map again (every method's last step; an increasing affine map, so the pixel
order is the same).

Two exact paths compute ``c``:

- **closed form** — when the embedding is the global average (GAP) or the flattening of
  the target layer's output, channel ``k`` feeds a known group of embedding dimensions,
  so ``c`` follows from per-channel sums of ``e*r`` and ``e^2``. Cost: the one forward
  pass that computes ``e`` plus ``O(N D)`` arithmetic; no gradients. The pooling is
  detected on the batch by comparing the model's output to ``A.mean((2, 3))`` and
  ``A.flatten(1)`` (one host sync per call); ``path="closed_form"`` skips the check and
  assumes GAP/flatten from the shapes.
- **forward ablation** (the general fallback) — for any other model (a head after the
  layer, an intermediate layer) channel ``k`` is zeroed in the target layer's output
  and the model re-run, ``ablation_batch`` channels per batched forward. Cost: ``K``
  forward passes of the model per image (``K`` = number of channels). This is
  Ablation-CAM applied to the similarity score; at the last layer with a GAP embedding
  the closed form is its exact value. A channel's share of the embedding is not defined
  when the embedding is not a pooling of the layer, so ``product`` takes this drop there
  too (for ``dot`` at a GAP layer the two coincide); ``last_path`` says which path ran.

For a user-supplied similarity callable the closed-form path evaluates the callable on
the ``K`` ablated embeddings (no extra forward passes). ``product`` with a callable is its
first-order (gradient x input) split at the embedding, ``c_k = sum_{g in k} e_g ds/de_g``
(one backward pass through the callable only, not the network): for ``dot`` it is
``e_k r_k`` exactly, and for any score linear in ``e`` it sums to the score. The named
cosine and euclidean splits above are not this one (they hold ``|e|`` fixed; cosine's
gradient split sums to 0, Euler's theorem for a scale-invariant score), which is why a
callable never stands in for a name.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.maps import minmax_normalise, weighted_sum
from fam.similarity import COSINE_EPS, SimilarityTarget, as_float

Contribution = Literal["product", "ablation"]
Weights = Literal["minmax", "abs_sum"]
Path = Literal["auto", "closed_form", "forward_ablation"]


class FAM(Explainer):
    """Feature Activation Map for similarity scores.

    Args:
        model, target_layer, amp: see :class:`fam.explainer.Explainer`.
        contribution: ``"product"`` (default, the paper's) or ``"ablation"`` (module
            docstring).
        weights: ``"minmax"`` (default, the paper's: min-max scaled weights, min-max
            normalised map, no ReLU) or ``"abs_sum"`` (``c / sum|c|``, ReLU'd map).
        path: ``"auto"`` (closed form when the embedding is GAP/flatten of the target
            layer, else forward ablation), ``"closed_form"`` or ``"forward_ablation"``.
        ablation_batch: channels ablated per batched forward pass on the fallback path.
        detect_tol: relative tolerance of the GAP/flatten check.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        contribution: Contribution = "product",
        weights: Weights = "minmax",
        path: Path = "auto",
        ablation_batch: int = 16,
        detect_tol: float = 1e-4,
        amp: bool = False,
    ) -> None:
        super().__init__(model, target_layer, amp=amp)
        if contribution not in ("ablation", "product"):
            raise FamBenchError(
                f"Unknown FAM contribution {contribution!r}; use 'product' or 'ablation'."
            )
        if weights not in ("minmax", "abs_sum"):
            raise FamBenchError(f"Unknown FAM weights {weights!r}; use 'minmax' or 'abs_sum'.")
        if path not in ("auto", "closed_form", "forward_ablation"):
            raise FamBenchError(
                f"Unknown FAM path {path!r}; use 'auto', 'closed_form' or 'forward_ablation'."
            )
        if ablation_batch < 1:
            raise FamBenchError(f"ablation_batch must be >= 1, got {ablation_batch}.")
        self.contribution = contribution
        self.weights = weights
        self.path = path
        self.ablation_batch = ablation_batch
        self.detect_tol = detect_tol
        # the pooling found on the first batch (a structural property of model and layer):
        # later batches reuse it, so only the first call waits for the device
        self._pooling_found: tuple[tuple[int, ...], str | None] | None = None
        #: the path the last call took: "gap", "flatten" or "forward_ablation"
        self.last_path: str | None = None

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images)
        self.score(emb, target)  # validates the reference and the similarity's output
        acts = as_float(acts)
        weights = self.channel_weights(images, emb, acts, target)
        if self.weights == "abs_sum":
            return weighted_sum(weights, acts)
        # The authors' map: a plain weighted sum (no ReLU), min-max normalised. A constant
        # sum stays all zeros and is flagged degenerate by the explainer.
        return minmax_normalise((weights[:, :, None, None] * acts).sum(1))

    def channel_weights(
        self, images: Tensor, emb: Tensor, acts: Tensor, target: SimilarityTarget
    ) -> Tensor:
        """Channel weights ``(N, K)``: ``minmax(c / |sum c|)`` or ``c / sum|c|``."""
        contributions = self.contributions(images, emb, acts, target)
        if self.weights == "abs_sum":
            return contributions / contributions.abs().sum(1, keepdim=True).clamp_min(1e-30)
        return minmax_weights(contributions)

    def contributions(
        self, images: Tensor, emb: Tensor, acts: Tensor, target: SimilarityTarget
    ) -> Tensor:
        """Unnormalised channel contributions ``c`` ``(N, K)``."""
        pooling = self._pooling(emb, acts)
        self.last_path = pooling or "forward_ablation"
        if pooling is None:
            return self._forward_ablation(images, emb, acts, target)
        n, k = acts.shape[:2]
        e = emb.view(n, k, -1)
        r = target.reference.view(n, k, -1)
        if target.name is None:
            if self.contribution == "product":
                return _gradient_split(e, r, target)
            return _ablate_embedding(e, r, target)
        return closed_form(e, r, target.name, self.contribution)

    def _pooling(self, emb: Tensor, acts: Tensor) -> str | None:
        shapes = (emb.shape[1], *acts.shape[1:])
        if self._pooling_found is not None and self._pooling_found[0] == shapes:
            return self._pooling_found[1]
        found = self._detect_pooling(emb, acts)
        if bool(torch.isfinite(emb).any()):  # an all-nan batch decides nothing
            self._pooling_found = (shapes, found)
        return found

    def _detect_pooling(self, emb: Tensor, acts: Tensor) -> str | None:
        if self.path == "forward_ablation":
            return None
        n, k, h, w = acts.shape
        candidates = [
            ("gap", k, lambda: acts.mean((2, 3))),
            ("flatten", k * h * w, lambda: acts.flatten(1)),
        ]
        for name, dim, pooled in candidates:
            if emb.shape[1] != dim:
                continue
            if self.path == "closed_form":
                return name
            ref = pooled().float()
            # A sample with nan/inf says nothing about the pooling (its map is flagged
            # non-finite); the finite entries decide, so one bad sample cannot change the
            # path for the batch.
            finite = torch.isfinite(emb) & torch.isfinite(ref)
            scale = torch.where(finite, ref.abs(), 0.0).amax().clamp_min(1e-12)
            # Under bf16/fp16 autocast the model's own pooling rounds at that precision.
            tol = max(self.detect_tol, 4 * torch.finfo(torch.bfloat16).eps if self.amp else 0.0)
            if bool((((emb - ref).abs() <= tol * scale + 1e-7) | ~finite).all()):
                return name
        if self.path == "closed_form":
            raise FamBenchError(
                f"path='closed_form' needs an embedding of size K={k} (GAP) or K*h*w={k * h * w} "
                f"(flatten) for a target layer output {tuple(acts.shape)}; the model returns "
                f"{emb.shape[1]} dimensions. Use path='auto' or 'forward_ablation'."
            )
        return None

    def _forward_ablation(
        self, images: Tensor, emb: Tensor, acts: Tensor, target: SimilarityTarget
    ) -> Tensor:
        n, k = acts.shape[:2]
        base = target(emb)
        drops = []
        for start in range(0, k, self.ablation_batch):
            stop = min(k, start + self.ablation_batch)
            c = stop - start
            keep = torch.ones(c, k, device=acts.device, dtype=acts.dtype)
            rows = torch.arange(c, device=acts.device)
            keep[rows, torch.arange(start, stop, device=acts.device)] = 0
            # Batch layout: channel-major, (c * n) images: chunk j ablates channel start+j.
            keep = keep.repeat_interleave(n, dim=0)[:, :, None, None]
            repeated = images.repeat(c, 1, 1, 1)
            ablated_emb, _ = self.forward(
                repeated,
                replace=lambda out, keep=keep: out * keep.to(out.dtype),
                keep_activations=False,
            )
            ref = target.reference.repeat(c, 1)
            ablated = SimilarityTarget(ref, target.fn)(ablated_emb)
            drops.append(base[None] - ablated.view(c, n))
        return torch.cat(drops, 0).T.contiguous()


def minmax_weights(contributions: Tensor) -> Tensor:
    """The authors' weights ``minmax(c / |sum_j c_j|)`` over channels, ``(N, K)``.

    Dividing by the absolute score does not change the min-max result; it is kept so the
    steps read as the source does. Channels that all contribute equally get weight 1 (as
    in the source's ``max_min_normal``); a non-finite contribution makes the row nan.
    """
    total = contributions.sum(1, keepdim=True).abs()
    shares = contributions / torch.where(total > 0, total, 1.0)
    lo = shares.amin(1, keepdim=True)
    hi = shares.amax(1, keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (shares - lo) / span.clamp_min(1e-30), 1.0)
    return torch.where(torch.isfinite(span), scaled, torch.nan)


def closed_form(e: Tensor, r: Tensor, similarity: str, contribution: str) -> Tensor:
    """Exact channel contributions for embeddings grouped by channel.

    ``e, r``: ``(N, K, G)``: embedding and reference with the ``G`` dimensions that
    channel ``k`` feeds (``G = 1`` for GAP, ``h*w`` for flatten). Returns ``(N, K)``.
    """
    p = (e * r).sum(-1)  # per-channel share of e.r
    if similarity == "dot":
        return p
    q = e.pow(2).sum(-1)  # per-channel share of |e|^2
    if similarity == "euclidean":
        # -|e - r|^2 changes by sum_g (e_g - r_g)^2 - r_g^2 = q - 2p when the group is zeroed
        return 2 * p - q
    if similarity == "euclidean_distance":
        # -|e - r|: zeroing the group moves |e - r|^2 to d^2 + 2p - q; the product split is
        # that change's first order, (2p - q) / (2d)
        d_sq = (e - r).pow(2).sum((1, 2))[:, None]
        d = d_sq.sqrt()
        if contribution == "product":
            return (2 * p - q) / (2 * d).clamp_min(COSINE_EPS)
        return (d_sq + 2 * p - q).clamp_min(0).sqrt() - d
    if similarity != "cosine":
        raise FamBenchError(f"No closed form for similarity {similarity!r}.")
    e_sq = q.sum(1, keepdim=True)
    e_norm = e_sq.sqrt()
    r_norm = r.pow(2).sum((1, 2)).sqrt()[:, None]
    if contribution == "product":
        return p / (e_norm * r_norm).clamp_min(COSINE_EPS)
    er = p.sum(1, keepdim=True)
    cos = er / (e_norm * r_norm).clamp_min(COSINE_EPS)
    rest_norm = (e_sq - q).clamp_min(0).sqrt()
    ablated = (er - p) / (rest_norm * r_norm).clamp_min(COSINE_EPS)
    return cos - ablated


def _gradient_split(e: Tensor, r: Tensor, target: SimilarityTarget) -> Tensor:
    """First-order split of a similarity callable: ``sum_{g in k} e_g ds/de_g``, ``(N, K)``.

    Differentiates the callable alone (the embedding is a leaf), under ``enable_grad`` so
    it works inside the explainer's ``no_grad``; computed in float32.
    """
    n, k, g = e.shape
    with torch.enable_grad():
        leaf = e.detach().float().reshape(n, k * g).requires_grad_(True)
        score = target.fn(leaf, r.detach().float().reshape(n, k * g))
        (grad,) = torch.autograd.grad(score.sum(), leaf)
    return (leaf.detach() * grad).view(n, k, g).sum(-1)


def _ablate_embedding(e: Tensor, r: Tensor, target: SimilarityTarget, chunk: int = 64) -> Tensor:
    """Generic path for a similarity callable: evaluate it on each ablated embedding."""
    n, k, g = e.shape
    flat_e, flat_r = e.reshape(n, k * g), r.reshape(n, k * g)
    base = target.fn(flat_e, flat_r)
    out = []
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        c = stop - start
        keep = torch.ones(c, k, 1, device=e.device, dtype=e.dtype)
        keep[torch.arange(c), torch.arange(start, stop)] = 0
        ablated = (e[:, None] * keep[None]).reshape(n * c, k * g)
        s = target.fn(ablated, flat_r.repeat_interleave(c, dim=0)).view(n, c)
        out.append(base[:, None] - s)
    return torch.cat(out, 1)
