"""Relevance-CAM (Lee et al., CVPR 2021) on the similarity score, with zennit's LRP.

The score ``s(e, r)`` is split over the embedding's dimensions with FAM's ``product``
shares (``e_d r_d`` for dot, ``e_d r_d / (|e| |r|)`` for cosine, ``2 e_d r_d - e_d^2``
for euclidean; gradient x input ``e_d ds/de_d`` for a similarity callable). That seed is
propagated back to the target layer with a zennit composite (default ``EpsilonPlusFlat``)
and read as the modified gradient w.r.t. the layer's output; in zennit the quantity that
flows backwards through hooked modules *is* the relevance. Then ``w_k = sum_ij R_kij``
and ``M = ReLU(sum_k w_k A_k)``.

Works at any depth: the target layer's output is replaced by a leaf for the duration of
the call, so relevance is read there and nothing upstream is propagated. The composite's
hooks and canonizers (which merge BatchNorm into the preceding convolution and restore
it afterwards) live only inside ``composite.context(model)`` and are removed on exit,
also when the call raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES, Composite
from zennit.torchvision import ResNetCanonizer

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.fam import closed_form
from fam.layers import eval_mode
from fam.maps import weighted_sum
from fam.similarity import SimilarityLike, SimilarityTarget, as_float

CompositeLike = str | Composite
CanonizersLike = str | Sequence[Canonizer] | None

#: composite class names accepted next to zennit's registry keys ("epsilon_plus_flat")
_BY_CLASS_NAME = {cls.__name__: cls for cls in COMPOSITES.values()}


class RelevanceCAM(Explainer):
    """Relevance-CAM: channel weights are the LRP relevance summed over positions.

    Args:
        model, target_layer: see :class:`fam.explainer.Explainer`.
        composite: a zennit composite instance, or the name of a built-in one (registry
            key such as ``"epsilon_plus_flat"`` or class name such as
            ``"EpsilonPlusFlat"``; default).
        canonizers: for a composite given by name: ``"auto"`` (default:
            ``ResNetCanonizer`` for torchvision ResNets, else
            ``SequentialMergeBatchNorm``), ``None`` for none, or a list of zennit
            canonizers. A composite instance keeps its own canonizers.
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        composite: CompositeLike = "EpsilonPlusFlat",
        canonizers: CanonizersLike = "auto",
    ) -> None:
        super().__init__(model, target_layer)
        if isinstance(composite, str):
            if composite not in COMPOSITES and composite not in _BY_CLASS_NAME:
                raise FamBenchError(
                    f"Unknown zennit composite {composite!r}. Use one of "
                    f"{sorted(_BY_CLASS_NAME)} (or their registry keys {sorted(COMPOSITES)}), "
                    "or pass a zennit Composite instance."
                )
        elif not isinstance(composite, Composite):
            raise FamBenchError(
                f"composite must be a zennit Composite or its name, got {type(composite).__name__}."
            )
        if isinstance(canonizers, str) and canonizers != "auto":
            raise FamBenchError(
                f"canonizers must be 'auto', None or a list of zennit canonizers, got "
                f"{canonizers!r}."
            )
        self.composite = composite
        self.canonizers = canonizers

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        relevance, acts = self._relevance(images, target)
        return weighted_sum(relevance.sum(dim=(2, 3)), acts)

    def layer_relevance(
        self, images: Tensor, reference: Tensor, similarity: SimilarityLike = "cosine"
    ) -> Tensor:
        """LRP relevance at the target layer's output, ``(N, K, h, w)``.

        Same inputs as calling the explainer; the relevance sums to the seed (the score
        share of each embedding dimension) where the composite's rules conserve it.
        """
        reference = self._check_inputs(images, reference)
        target = SimilarityTarget(reference, similarity)
        with eval_mode(self.model), torch.enable_grad():
            relevance, _ = self._relevance(images, target)
        return relevance.detach()

    def _relevance(self, images: Tensor, target: SimilarityTarget) -> tuple[Tensor, Tensor]:
        # The capture hook is registered inside the context, after zennit's hooks, so it
        # sees the layer's (hooked) output last and cuts the graph there.
        with self._composite().context(self.model):
            emb, acts = self.forward(images, gradients=True)
            seed = self._seed(emb, target)
            (relevance,) = torch.autograd.grad(emb, acts, grad_outputs=seed)
        return relevance.float(), as_float(acts.detach())

    def _seed(self, emb: Tensor, target: SimilarityTarget) -> Tensor:
        """Each embedding dimension's share of the score, ``(N, D)``."""
        self.check_reference(emb, target)
        ref = target.reference
        if target.name is not None:
            return closed_form(emb.detach()[:, :, None], ref[:, :, None], target.name, "product")
        (grad,) = torch.autograd.grad(target(emb).sum(), emb, retain_graph=True)
        return (emb * grad).detach()

    def _composite(self) -> Composite:
        if isinstance(self.composite, Composite):
            return self.composite
        cls = COMPOSITES.get(self.composite) or _BY_CLASS_NAME[self.composite]
        return cls(canonizers=self._canonizers())

    def _canonizers(self) -> list[Canonizer]:
        if self.canonizers is None:
            return []
        if self.canonizers != "auto":
            return list(self.canonizers)
        # Fresh instances per call: a canonizer remembers the parameters it replaced.
        if any(isinstance(m, (BasicBlock, Bottleneck)) for m in self.model.modules()):
            return [ResNetCanonizer()]
        return [SequentialMergeBatchNorm()]
