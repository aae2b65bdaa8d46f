"""The shared explainer machinery every method builds on.

An :class:`Explainer` explains the scalar ``s(e(x), r)``: the similarity between the
embedding of each image and a reference embedding. Subclasses implement one thing,
:meth:`Explainer.raw_maps`; CAM-style methods implement only
:meth:`CAMExplainer.channel_weights` (see ``baselines/gradcam.py``).

Shared behaviour (tested once, here, for all methods):

- inputs are validated (layer, reference shape, similarity, device) with a
  :class:`~fam.errors.FamBenchError` that names the fix;
- the model is explained in eval mode and every module's train/eval flag is restored;
- hooks are removed after every call, also when it raises;
- gradients are taken with ``torch.autograd.grad`` w.r.t. a detached copy of the
  target layer's output, so parameters' ``.grad`` are never touched and gradient
  methods also work when called inside ``torch.no_grad()``;
- maps stay on the images' device; after a call ``self.degenerate`` ``(N,)`` bool flags
  maps that rank no pixel above another and ``self.degenerate_reason`` says why, one
  string per sample: ``""`` (a real map), ``"constant"`` (e.g. all zero; returned as
  zeros) or ``"non-finite"`` (nan or inf anywhere in the raw map or after scaling, e.g.
  from a model that outputs nan; returned as all-nan, never as zeros, so every metric
  gives nan for it and the caller excludes and counts it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.layers import capture_layer, eval_mode, model_device, resolve_target_layer
from fam.maps import degenerate, minmax_normalise, non_finite, upsample, weighted_sum
from fam.similarity import SimilarityLike, SimilarityTarget, as_float
from fam.tokens import FeatureLayout

#: ``degenerate_reason`` strings by code
DEGENERATE_REASONS = ("", "constant", "non-finite")


class Explainer:
    """Base class: ``explainer(images, reference, similarity) -> maps``.

    Args:
        model: any module mapping images ``(N, 3, H, W)`` to embeddings ``(N, D)``.
        target_layer: dotted module name or the module; ``None`` uses
            ``model.default_target_layer`` (a ViT: its last block). A layer that returns
            tokens ``(N, T, C)`` is read as its patch tokens on the model's patch grid
            (:mod:`fam.tokens`; ``model.reshape_transform`` for other layouts).
        amp: run the model's forward passes under bf16 autocast with channels_last
            inputs on CUDA (weights and maps are still computed in fp32).
    """

    #: whether :meth:`raw_maps` needs ``ds/dA`` (enables autograd inside the call).
    needs_gradients: bool = False

    def __init__(
        self, model: nn.Module, target_layer: str | nn.Module | None = None, *, amp: bool = False
    ) -> None:
        self.model = model
        self.target_layer = resolve_target_layer(model, target_layer)
        #: reads the layer's output as (N, K, h, w): a ViT's patch tokens on its grid
        self.layout = FeatureLayout(model)
        self.amp = amp
        self.degenerate: Tensor | None = None
        self._reason: Tensor | None = None

    # -- public call -------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        reference: Tensor,
        similarity: SimilarityLike = "cosine",
        upsample: bool = True,
    ) -> Tensor:
        """Explain ``s(e(images), reference)``.

        Args:
            images: ``(N, C, H, W)`` on the model's device.
            reference: ``(N, D)`` reference embeddings (``(D,)`` or ``(1, D)`` is
                broadcast to every image).
            similarity: ``"cosine" | "dot" | "euclidean"`` (``-||e - r||^2``) |
                ``"euclidean_distance"`` (``-||e - r||``) or ``(emb, ref) -> (N,)``.
            upsample: ``True`` returns ``(N, H, W)`` maps in ``[0, 1]`` (bilinear resize,
                per-image min-max); ``False`` the raw non-negative ``(N, h, w)`` maps at
                the target layer's resolution.
        """
        reference = self._check_inputs(images, reference)
        target = SimilarityTarget(reference, similarity)
        grad_mode = torch.enable_grad() if self.needs_gradients else torch.no_grad()
        with eval_mode(self.model), grad_mode:
            raw = self.raw_maps(images, target)
        raw = raw.detach().float()
        bad = non_finite(raw)
        maps = raw if not upsample else minmax_normalise(_upsample(raw, images.shape[-2:]))
        if upsample:
            bad = bad | non_finite(maps)  # e.g. values so large that resizing overflows
        constant = degenerate(raw) & ~bad
        self.degenerate = constant | bad
        # 0 real map, 1 constant, 2 non-finite: strings only when asked (no host sync here).
        self._reason = constant.to(torch.int8) + 2 * bad.to(torch.int8)
        return torch.where(bad[:, None, None], torch.nan, maps)

    @property
    def degenerate_reason(self) -> list[str] | None:
        """Per sample of the last call: ``""``, ``"constant"`` or ``"non-finite"``."""
        if self._reason is None:
            return None
        return [DEGENERATE_REASONS[int(code)] for code in self._reason.tolist()]

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        """Non-negative maps ``(N, h, w)`` at the target layer's resolution."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------
    def autocast(self, device: torch.device):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def prepare(self, images: Tensor) -> Tensor:
        if self.amp and images.is_cuda:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(
        self, images: Tensor, gradients: bool = False, replace=None, keep_activations: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """One hooked forward pass: ``(embedding (N, D), activations (N, K, h, w))``;
        ``replace`` acts on the ``(N, K, h, w)`` feature map.

        ``keep_activations=False`` returns ``None`` for the activations (no copy is made).
        """
        with (
            capture_layer(
                self.target_layer,
                gradients=gradients,
                replace=replace,
                model=self.model,
                keep_activations=keep_activations,
                layout=self.layout,
            ) as cap,
            self.autocast(images.device),
        ):
            emb = self.model(self.prepare(images))
        if not cap.ran:
            raise FamBenchError(
                "The target layer was not run by the model's forward pass; choose a layer "
                "that the forward pass uses."
            )
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise FamBenchError(
                f"The model must map images (N, C, H, W) to embeddings (N, D); it returned "
                f"{shape}. Wrap it so that forward returns the embedding."
            )
        if cap.activations is not None and cap.activations.dim() != 4:
            raise FamBenchError(
                f"The target layer's output has shape {tuple(cap.activations.shape)}; it must "
                "be a feature map (N, K, h, w) or tokens (N, T, C). Choose a convolutional "
                "layer or block, or name a callable that reshapes it: model.reshape=<dotted "
                "path> (Python: model.reshape_transform = fn)."
            )
        return as_float(emb), cap.activations

    def score(self, emb: Tensor, target: SimilarityTarget) -> Tensor:
        """``s(emb, reference)`` ``(N,)``, after :meth:`check_reference`."""
        self.check_reference(emb, target)
        return target(emb)

    def check_reference(self, emb: Tensor, target: SimilarityTarget) -> None:
        """Raise a clear error when the reference's width differs from the embedding's."""
        if emb.shape[1] != target.reference.shape[1]:
            raise FamBenchError(
                f"The reference has {target.reference.shape[1]} dimensions but the model's "
                f"embedding has {emb.shape[1]}; compute the reference with the same model "
                "(and the same embedding head)."
            )

    def _check_inputs(self, images: Tensor, reference: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise FamBenchError(f"images must be a tensor (N, C, H, W), got {shape}.")
        if not images.is_floating_point():
            raise FamBenchError(
                f"images must be floating point (normalised), got dtype {images.dtype}."
            )
        device = model_device(self.model)
        if device is not None and device != images.device:
            raise FamBenchError(
                f"images are on {images.device} but the model is on {device}; move one of "
                f"them, e.g. images.to('{device}')."
            )
        if not isinstance(reference, Tensor):
            raise FamBenchError("reference must be a tensor (N, D) of reference embeddings.")
        if reference.device != images.device:
            raise FamBenchError(
                f"reference is on {reference.device} but images are on {images.device}; "
                "put both on the model's device."
            )
        if reference.dim() == 1:
            reference = reference[None]
        n = images.shape[0]
        if reference.dim() != 2 or reference.shape[0] not in (1, n):
            raise FamBenchError(
                f"reference must have shape ({n}, D) (one reference per image) or (1, D); "
                f"got {tuple(reference.shape)}."
            )
        if reference.shape[0] == 1 and n != 1:
            reference = reference.expand(n, -1)
        return as_float(reference.detach())


def _upsample(raw: Tensor, size) -> Tensor:
    return upsample(raw, (int(size[0]), int(size[1])))


class CAMExplainer(Explainer):
    """A CAM method: ``M = ReLU(sum_k w_k A_k)``; subclasses define the weights.

    :meth:`channel_weights` receives the activations ``(N, K, h, w)`` (fp32), the
    gradients ``ds/dA`` (``None`` unless ``needs_gradients``), and the scores ``(N,)``.
    It returns ``(N, K)`` channel weights or ``(N, K, h, w)`` pixel weights.
    """

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        emb, acts = self.forward(images, gradients=self.needs_gradients)
        score = self.score(emb, target)
        grads = None
        if self.needs_gradients:
            (grads,) = torch.autograd.grad(score.sum(), acts)
            grads = grads.float()
        acts = as_float(acts.detach())
        weights = self.channel_weights(acts, grads, score.detach())
        return weighted_sum(weights, acts)

    def channel_weights(
        self, activations: Tensor, gradients: Tensor | None, score: Tensor
    ) -> Tensor:
        raise NotImplementedError
