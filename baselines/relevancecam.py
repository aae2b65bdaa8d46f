"""Relevance-CAM (Lee et al., CVPR 2021) on the similarity score, with zennit's LRP.

The score ``s(e, r)`` is split over the embedding's dimensions with FAM's ``product``
shares (``e_d r_d`` for dot, ``e_d r_d / (|e| |r|)`` for cosine, ``2 e_d r_d - e_d^2``
for euclidean, that over ``2 |e - r|`` for euclidean_distance; gradient x input
``e_d ds/de_d`` for a similarity callable). That seed is
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
timm's ``BasicBlock`` and ``Bottleneck`` through :class:`TimmResNetCanonizer` (the same
forward with the residual ``+`` as a ``Sum``), and a torchvision trunk that pools with a
function (the suite's ``ResNetEncoder``) through :class:`TrunkPoolCanonizer`. Under a
conserving composite (biases ignored, e.g. ``zero_bias=True`` or ``composite="zplus"``)
the relevance at every block then sums to the seed
(``tests/test_relevance_conservation.py``).

Any other block that adds two branches with a plain ``+`` passes its relevance to both,
which inflates it (a timm ResNet before its blocks were canonized: relevance / seed 4.0
at ``layer3``, 16.0 at ``layer2``). So every call checks conservation: under a conserving
composite, ``self.conservation`` ``(N,)`` is the relevance summed at the target layer over
the seed's sum, and a sample whose sum is off by more than 5% (of ``|sum seed|``; of
``sum |seed|`` for the contrastive seed, which sums to zero) is flagged in
``self.not_conserved`` ``(N,)`` and warned about (:class:`RelevanceNotConservedWarning`,
naming the model and the layer; a run records it in ``warnings.json``). Under a
non-conserving composite (epsilon rules with biases) both are ``None``.

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
import sys
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import AttributeCanonizer, Canonizer, SequentialMergeBatchNorm
from zennit.composites import COMPOSITES, Composite, LayerMapComposite, layer_map_base
from zennit.layer import Sum
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
#: relative error of the relevance sum above which a sample is flagged
CONSERVATION_TOLERANCE = 0.05


class RelevanceNotConservedWarning(UserWarning):
    """Relevance at the target layer does not sum to the seed under a conserving rule."""


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
        #: the target layer's dotted name (in warnings)
        self.layer_name = next((n for n, m in model.named_modules() if m is self.target_layer), "?")
        #: after a call under a conserving composite: relevance sum / seed sum, ``(N,)``
        self.conservation: Tensor | None = None
        #: after a call under a conserving composite: samples more than 5% off, ``(N,)``
        self.not_conserved: Tensor | None = None

    @property
    def conserving(self) -> bool:
        """Whether the rules conserve relevance (biases ignored: ``zplus`` or
        ``zero_bias``), so that a sum off the seed's means a block the rules do not see."""
        return isinstance(self.composite, str) and (self.composite == ZPLUS or self.zero_bias)

    def raw_maps(self, images: Tensor, target: SimilarityTarget) -> Tensor:
        relevance, acts, seed = self._relevance(images, target)
        self._check_conservation(relevance, seed)
        return weighted_sum(relevance.sum(dim=(2, 3)), acts)

    def _check_conservation(self, relevance: Tensor, seed: Tensor) -> None:
        """Set ``conservation`` and ``not_conserved`` (module docstring); warn when any
        sample is flagged (one host sync per call)."""
        self.conservation = self.not_conserved = None
        if not self.conserving:
            return
        total, seeded = relevance.sum(dim=(1, 2, 3)), seed.float().sum(1)
        scale = seeded.abs() if self.relevance_seed == "share" else seed.float().abs().sum(1)
        tiny = torch.finfo(torch.float32).tiny
        self.conservation = total / torch.where(seeded.abs() > tiny, seeded, torch.nan)
        self.not_conserved = (total - seeded).abs() > CONSERVATION_TOLERANCE * scale
        if bool(self.not_conserved.any()):
            ratios = ", ".join(f"{r:.3g}" for r in self.conservation[self.not_conserved].tolist())
            warnings.warn(
                f"Relevance-CAM on {type(self.model).__name__} at layer "
                f"{self.layer_name!r}: relevance is not conserved for "
                f"{int(self.not_conserved.sum())} of {len(total)} samples (relevance / seed "
                f"{ratios}; more than {CONSERVATION_TOLERANCE:.0%} off). An operation the rules "
                "do not see (a residual '+' outside a Sum module, an uncanonized block, "
                "attention or a norm layer) passes relevance on wrongly, so these maps are "
                "not LRP's.",
                RelevanceNotConservedWarning,
                stacklevel=2,
            )

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
            relevance, _, _ = self._relevance(images, target)
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

    def _relevance(self, images: Tensor, target: SimilarityTarget) -> tuple[Tensor, Tensor, Tensor]:
        """``(relevance (N, K, h, w), activations (N, K, h, w), seed (N, D))``."""
        # The capture hook is registered inside the context, after zennit's hooks, so it
        # sees the layer's (hooked) output last and cuts the graph there.
        with self._composite().context(self.model):
            emb, acts = self.forward(images, gradients=True)
            seed = self._seed(emb, target)
            (relevance,) = torch.autograd.grad(emb, acts, grad_outputs=seed)
        return relevance.float(), as_float(acts.detach()), seed.detach()

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
        if any(_timm_block(m) for m in self.model.modules()):
            return [SequentialMergeBatchNorm(), TimmResNetCanonizer()]
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


def _timm_block(module: nn.Module) -> str | None:
    """``"basic"`` / ``"bottleneck"`` for timm's ResNet blocks (``None`` otherwise); timm
    is looked up among the imported modules only (a timm model has imported it)."""
    resnet = sys.modules.get("timm.models.resnet")
    if resnet is None:
        return None
    if isinstance(module, resnet.BasicBlock):
        return "basic"
    if isinstance(module, resnet.Bottleneck):
        return "bottleneck"
    return None


class TimmResNetCanonizer(AttributeCanonizer):
    """timm's ResNet ``BasicBlock`` and ``Bottleneck`` with their residual ``+`` as zennit's
    ``Sum`` module, as zennit's ``ResNetCanonizer`` does for torchvision's blocks.

    The overloaded ``forward`` is timm's own (drop-block, anti-aliasing, squeeze-excite and
    drop-path included) with ``x += shortcut`` replaced by ``Sum(stack([shortcut, x]))``,
    so the ``Norm`` rule splits the block's relevance between the branches instead of
    copying it into both. The output is unchanged (tested). BatchNorm is merged by the
    ``SequentialMergeBatchNorm`` that comes with it in ``"auto"``.
    """

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict | None:
        kind = _timm_block(module)
        if kind is None:
            return None
        forward = cls.basic if kind == "basic" else cls.bottleneck
        return {"forward": forward.__get__(module), "canonizer_sum": Sum()}

    @staticmethod
    def _residual(self: nn.Module, x: Tensor, shortcut: Tensor, act: nn.Module) -> Tensor:
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return act(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))

    @staticmethod
    def basic(self: nn.Module, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return TimmResNetCanonizer._residual(self, x, shortcut, self.act2)

    @staticmethod
    def bottleneck(self: nn.Module, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        return TimmResNetCanonizer._residual(self, x, shortcut, self.act3)

    def copy(self) -> TimmResNetCanonizer:
        return TimmResNetCanonizer()
