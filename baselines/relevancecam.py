"""Relevance-CAM (Lee et al., CVPR 2021) on the similarity score, with zennit's LRP.

The score ``s(e, r)`` is split over the embedding's dimensions with FAM's ``product``
shares (``e_d r_d`` for dot, ``e_d r_d / (|e| |r|)`` for cosine, ``2 e_d r_d - e_d^2``
for euclidean; gradient x input ``e_d ds/de_d`` for a similarity callable). That seed is
propagated back to the target layer with a zennit composite (default ``"zplus"``, the
official code's rule; ``EpsilonPlusFlat`` or any zennit composite as an option) and
read as the modified gradient w.r.t. the layer's output; in zennit the quantity that
flows backwards through hooked modules *is* the relevance. Then ``w_k = sum_ij R_kij``
and ``M = ReLU(sum_k w_k A_k)``.

Works at any depth: the target layer's output is replaced by a leaf for the duration of
the call, so relevance is read there and nothing upstream is propagated. Rules only apply
to modules, so the suite's networks pool with a module (``EmbeddingPool``: zennit's
``Norm`` rule for ``AdaptiveAvgPool2d``) and ResNet-12 adds its residual with zennit's
``Sum`` module (``Norm``: relevance split between the branches in proportion to their
contributions); torchvision blocks get the same through zennit's ``ResNetCanonizer``,
and a torchvision trunk that pools with a function (the suite's ``ResNetEncoder``)
through :class:`TrunkPoolCanonizer`. Under a conserving composite (biases ignored, e.g.
``zero_bias=True`` or ``composite="zplus"``) the relevance at every block then sums to
the seed (``tests/test_relevance_conservation.py``).

Options from the official Relevance-CAM code (github.com/mongeoroo/Relevance-CAM):

- ``composite="zplus"``: its rule, z+ (alpha=1, beta=0) on every convolution and linear
  layer, the first one included, biases ignored; BatchNorm merged into the convolution
  before it, sums and average pools by ``Norm``;
- ``relevance_seed="contrastive"``: its CLRP seed (Gu, Yang & Tresp, ACCV 2018): the relevance of
  the explained output minus that of a "dual" output that stands for everything else. A
  similarity has no class list, so the dual is the score's mass spread over the
  embedding's own energy, ``q_d = (sum_j p_j) e_d^2 / sum_j e_j^2`` (the share a
  reference along ``e`` itself would get, i.e. what any reference would see); the seed
  ``p_d - q_d`` sums to zero and keeps what is specific to this reference.

The composite's hooks and canonizers (which merge BatchNorm into the preceding
convolution and restore it afterwards) live only inside ``composite.context(model)`` and
are removed on exit, also when the call raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import AttributeCanonizer, Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES, Composite, LayerMapComposite, layer_map_base
from zennit.rules import ZPlus
from zennit.torchvision import ResNetCanonizer
from zennit.types import Convolution, Linear

from fam.errors import FamBenchError
from fam.explainer import Explainer
from fam.fam import closed_form
from fam.layers import eval_mode
from fam.maps import weighted_sum
from fam.similarity import SimilarityLike, SimilarityTarget, as_float

CompositeLike = str | Composite
CanonizersLike = str | Sequence[Canonizer] | None
RelevanceSeed = Literal["share", "contrastive"]

#: composite class names accepted next to zennit's registry keys ("epsilon_plus_flat")
_BY_CLASS_NAME = {cls.__name__: cls for cls in COMPOSITES.values()}
#: the official Relevance-CAM rule (module docstring); not a zennit registry name
ZPLUS = "zplus"
SEEDS = ("share", "contrastive")


class RelevanceCAM(Explainer):
    """Relevance-CAM: channel weights are the LRP relevance summed over positions.

    Args:
        model, target_layer: see :class:`fam.explainer.Explainer`.
        composite: a zennit composite instance, the name of a built-in one (registry
            key such as ``"epsilon_plus_flat"`` or class name such as
            ``"EpsilonPlusFlat"``), or ``"zplus"`` (default): z+ everywhere, biases
            ignored, as the official Relevance-CAM code (module docstring).
        canonizers: for a composite given by name: ``"auto"`` (default:
            ``ResNetCanonizer`` for torchvision ResNet blocks, else
            ``SequentialMergeBatchNorm``; plus :class:`TrunkPoolCanonizer` for a
            torchvision trunk that pools with a function), ``None`` for none, or a list of
            zennit canonizers. A composite instance keeps its own canonizers.
        relevance_seed: the relevance put on the embedding: ``"share"`` (default; each
            dimension's share of the score) or ``"contrastive"`` (CLRP-style, module
            docstring).
        zero_bias: for a zennit composite given by name: ignore biases (zennit's
            ``zero_params=["bias"]``), so the rules conserve relevance exactly; ``False``
            (default) keeps zennit's defaults, where biases absorb some relevance.
            ``"zplus"`` always ignores biases.
    """

    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        composite: CompositeLike = ZPLUS,
        canonizers: CanonizersLike = "auto",
        relevance_seed: RelevanceSeed = "share",
        zero_bias: bool = False,
    ) -> None:
        super().__init__(model, target_layer)
        if isinstance(composite, str):
            if composite not in COMPOSITES and composite not in _BY_CLASS_NAME | {ZPLUS: None}:
                raise FamBenchError(
                    f"Unknown zennit composite {composite!r}. Use one of "
                    f"{sorted(_BY_CLASS_NAME)} (or their registry keys {sorted(COMPOSITES)}), "
                    f"{ZPLUS!r} (z+ everywhere, as the official Relevance-CAM), or pass a "
                    "zennit Composite instance."
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
        if relevance_seed not in SEEDS:
            raise FamBenchError(
                f"Unknown Relevance-CAM relevance_seed {relevance_seed!r}; use one of "
                f"{list(SEEDS)}."
            )
        if zero_bias and isinstance(composite, str) and composite != ZPLUS:
            cls = COMPOSITES.get(composite) or _BY_CLASS_NAME[composite]
            if "zero_params" not in inspect.signature(cls).parameters:
                raise FamBenchError(
                    f"zero_bias=True needs a composite with zero_params; {composite!r} has "
                    "none (it is not an LRP composite)."
                )
        self.composite = composite
        self.canonizers = canonizers
        self.relevance_seed = relevance_seed
        self.zero_bias = bool(zero_bias)

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

    def seed_relevance(
        self, images: Tensor, reference: Tensor, similarity: SimilarityLike = "cosine"
    ) -> Tensor:
        """The relevance put on the embedding, ``(N, D)`` (what :meth:`layer_relevance`
        conserves)."""
        reference = self._check_inputs(images, reference)
        target = SimilarityTarget(reference, similarity)
        with eval_mode(self.model), torch.enable_grad():
            emb, _ = self.forward(images, gradients=True)
            return self._seed(emb, target).detach()

    def _relevance(self, images: Tensor, target: SimilarityTarget) -> tuple[Tensor, Tensor]:
        # The capture hook is registered inside the context, after zennit's hooks, so it
        # sees the layer's (hooked) output last and cuts the graph there.
        with self._composite().context(self.model):
            emb, acts = self.forward(images, gradients=True)
            seed = self._seed(emb, target)
            (relevance,) = torch.autograd.grad(emb, acts, grad_outputs=seed)
        return relevance.float(), as_float(acts.detach())

    def _seed(self, emb: Tensor, target: SimilarityTarget) -> Tensor:
        """The relevance seeded on the embedding, ``(N, D)`` (``relevance_seed`` option)."""
        self.check_reference(emb, target)
        ref = target.reference
        e = emb.detach()
        if target.name is not None:
            share = closed_form(e[:, :, None], ref[:, :, None], target.name, "product")
        else:
            (grad,) = torch.autograd.grad(target(emb).sum(), emb, retain_graph=True)
            share = (e * grad).detach()
        if self.relevance_seed == "share":
            return share
        energy = e.pow(2)
        dual = (
            share.sum(1, keepdim=True)
            * energy
            / energy.sum(1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)
        )
        return share - dual

    def _composite(self) -> Composite:
        if isinstance(self.composite, Composite):
            return self.composite
        canonizers = self._canonizers()
        if self.composite == ZPLUS:
            rule = ZPlus(zero_params=["bias"])
            return LayerMapComposite(
                layer_map_base() + [(Convolution, rule), (Linear, rule)], canonizers=canonizers
            )
        cls = COMPOSITES.get(self.composite) or _BY_CLASS_NAME[self.composite]
        if self.zero_bias:
            return cls(canonizers=canonizers, zero_params=["bias"])
        return cls(canonizers=canonizers)

    def _canonizers(self) -> list[Canonizer]:
        if self.canonizers is None:
            return []
        if self.canonizers != "auto":
            return list(self.canonizers)
        # Fresh instances per call: a canonizer remembers the parameters it replaced.
        if any(isinstance(m, (BasicBlock, Bottleneck)) for m in self.model.modules()):
            return [ResNetCanonizer(), TrunkPoolCanonizer()]
        return [SequentialMergeBatchNorm()]


_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class TrunkPoolCanonizer(AttributeCanonizer):
    """Give a torchvision ResNet trunk that pools with a function an ``AdaptiveAvgPool2d``.

    Applies to a module with torchvision's trunk children (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1`` ... ``layer4``), no ``avgpool`` module and ``pooling ==
    "gap"`` (the suite's ``ResNetEncoder``): its ``forward`` is overloaded, for the
    duration of the composite's context, with the same computation ending in a pooling
    module, so zennit's ``Norm`` rule applies to the average instead of the gradient
    (``R / (h w)`` everywhere). The output is unchanged (tested).
    """

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict | None:
        children = dict(module.named_children())
        if getattr(module, "pooling", None) != "gap" or "avgpool" in children:
            return None
        if not all(key in children for key in _TRUNK):
            return None
        return {"forward": cls.forward.__get__(module), "canonizer_pool": nn.AdaptiveAvgPool2d(1)}

    @staticmethod
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.canonizer_pool(x), 1)

    def copy(self) -> TrunkPoolCanonizer:
        return TrunkPoolCanonizer()
