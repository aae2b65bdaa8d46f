"""Relevance-CAM at depth: relevance is conserved block by block on the suite's models.

LRP rules apply to modules only. Before pooling and residual additions were modules,
zennit passed the gradient through them: ResNet-12's ``+`` copied relevance into both
branches (relevance / seed 1.93 at layer3, 3.7 at layer2, 7.1 at layer1) and a
functional global mean spread relevance evenly over positions, including ones that
cannot pass it on (torchvision ResNet-50 as ``ResNetEncoder``: 0.30-0.82 below layer4).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from baselines import RelevanceCAM
from baselines.relevancecam import TrunkPoolCanonizer
from experiments.models import build_model
from fam import closed_form

BLOCKS = {
    "conv4": ["encoder.0", "encoder.1", "encoder.2", "encoder.3"],
    "resnet12": ["layer1", "layer2", "layer3", "layer4"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "torchvision_resnet18": ["layer1", "layer2", "layer3", "layer4"],
}
OPTIONS = {"resnet12": {"channels": [8, 16, 24, 32]}}
SIZE = {"conv4": 42, "resnet12": 42, "resnet18": 48, "resnet50": 32, "torchvision_resnet18": 48}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "torchvision_resnet18":
        model = torchvision.models.resnet18(weights=None)
        model.fc = nn.Identity()
    else:
        model = build_model(name, **OPTIONS.get(name, {}))
    # A few training-mode passes give BatchNorm non-trivial statistics to merge.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE[name], SIZE[name]))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def case(request):
    name = request.param
    model = _model(name)
    size = SIZE[name]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model(images)
    return name, model, images, emb


@pytest.mark.parametrize("composite", [{"zero_bias": True}, {"composite": "zplus"}])
def test_relevance_is_conserved_at_every_block(case, composite):
    """Seed ``e_d^2`` (dot with the image's own embedding: all non-negative, so the ratio
    is well defined); relevance sum / seed sum within 0.05 of 1 at every block."""
    name, model, images, emb = case
    seed = emb.pow(2).sum(1)
    for layer in BLOCKS[name]:
        explainer = RelevanceCAM(model, layer, **composite)
        relevance = explainer.layer_relevance(images, emb, "dot")
        ratio = relevance.sum(dim=(1, 2, 3)) / seed
        assert relevance.abs().sum() > 0
        assert ((ratio - 1).abs() < 0.05).all(), (name, layer, ratio.tolist())


def test_resnet12_splits_relevance_between_body_and_shortcut():
    """With the ``Sum`` module the two branches share the block's relevance: read at the
    body's and at the shortcut's output, the parts add up to the block output's sum
    (with a plain ``+`` each branch got all of it: twice the total)."""
    model = _model("resnet12")
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = model(images)

    def total(layer: str) -> torch.Tensor:
        explainer = RelevanceCAM(model, layer, zero_bias=True)
        return explainer.layer_relevance(images, emb, "dot").sum((1, 2, 3))

    body, shortcut = total("layer3.body"), total("layer3.shortcut")
    assert (body.abs() > 0).all() and (shortcut.abs() > 0).all()
    torch.testing.assert_close(body + shortcut, total("layer3"), rtol=1e-3, atol=0)


def _perturb_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm far from identity: random scale (some negative), shift and statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.randn(c, generator=gen) * 0.8 + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
    return model.eval()


DEFAULT_CASES = {
    "conv4_pool_all": ("conv4", {"pools": [True, True, True, True]}, 84),
    "conv4_pool_two": ("conv4", {"pools": [True, True, False, False]}, 32),
    "conv4_pool_none": ("conv4", {"pools": [False, False, False, False]}, 16),
    "resnet12": ("resnet12", OPTIONS["resnet12"], 42),
    "resnet18": ("resnet18", {}, 48),
}


@pytest.mark.parametrize("case_name", sorted(DEFAULT_CASES))
def test_default_composite_conserves_relevance_at_every_block(case_name):
    """The default (the official z+ rule, biases ignored) keeps relevance sum / seed within
    0.02 of 1 at every block, with BatchNorm merged from statistics far from identity."""
    name, options, size = DEFAULT_CASES[case_name]
    torch.manual_seed(0)
    model = _perturb_batchnorm(build_model(name, **options), seed=4)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = model(images)
    seed = emb.pow(2).sum(1)
    assert (seed > 0).all()
    for layer in BLOCKS[name]:
        relevance = RelevanceCAM(model, layer).layer_relevance(images, emb, "dot")
        ratio = relevance.sum(dim=(1, 2, 3)) / seed
        assert ((ratio - 1).abs() < 0.02).all(), (case_name, layer, ratio.tolist())


def test_epsilon_plus_flat_conserves_at_the_last_block_and_loses_to_biases_below():
    """EpsilonPlusFlat (an option) keeps zennit's defaults: z+ keeps positive biases, which
    absorb relevance below the last block; zero_bias=True removes exactly that loss."""
    model = _model("conv4")
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = model(images)
    seed = emb.pow(2).sum(1)

    def ratio(layer: str) -> torch.Tensor:
        explainer = RelevanceCAM(model, layer, composite="EpsilonPlusFlat")
        return explainer.layer_relevance(images, emb, "dot").sum((1, 2, 3)) / seed

    torch.testing.assert_close(ratio("encoder.3"), torch.ones(2), rtol=1e-4, atol=0)
    assert (ratio("encoder.0") < 0.99).all()


def test_trunk_pool_canonizer_keeps_the_output_and_is_removed():
    model = _model("resnet18")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(images)
    instances = TrunkPoolCanonizer().apply(model)
    assert len(instances) == 1
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    with torch.no_grad():
        canonized = model(images)
    for instance in instances:
        instance.remove()
    torch.testing.assert_close(canonized, before)
    assert "forward" not in vars(model)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    # Not applied where the pooling is a module already (torchvision's own ResNet).
    assert TrunkPoolCanonizer().apply(_model("torchvision_resnet18")) == []


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _expected_keys(name: str) -> set[str]:
    """The state_dict keys cached checkpoints were saved with (before the modules)."""
    if name == "conv4":
        return {
            f"encoder.{i}.{key}"
            for i in range(4)
            for key in ["0.weight", "0.bias", *(f"1.{b}" for b in BN)]
        }
    per_block = [f"body.{c}.weight" for c in (0, 3, 6)] + ["shortcut.0.weight"]
    per_block += [f"body.{b}.{p}" for b in (1, 4, 7) for p in BN]
    per_block += [f"shortcut.1.{p}" for p in BN]
    return {f"layer{i}.{key}" for i in range(1, 5) for key in per_block}


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_pooling_and_sum_modules_leave_state_dict_keys_unchanged(name):
    assert set(_model(name).state_dict()) == _expected_keys(name)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_contrastive_seed_is_the_share_minus_the_reference_free_dual(similarity):
    """CLRP-style: ``p_d - (sum_j p_j) e_d^2 / |e|^2``; it sums to zero, and at the last
    layer of a GAP model the channel weights are exactly that seed."""
    model = _model("conv4")
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(5))
    reference = torch.rand(2, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        emb = model(images)
    share = closed_form(emb[:, :, None], reference[:, :, None], similarity, "product")
    dual = share.sum(1, keepdim=True) * emb.pow(2) / emb.pow(2).sum(1, keepdim=True)
    explainer = RelevanceCAM(model, "encoder.3", relevance_seed="contrastive", zero_bias=True)
    seed = explainer.seed_relevance(images, reference, similarity)
    torch.testing.assert_close(seed, share - dual)
    torch.testing.assert_close(seed.sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    weights = explainer.layer_relevance(images, reference, similarity).sum((2, 3))
    scale = float((share - dual).abs().max())
    torch.testing.assert_close(weights, share - dual, rtol=1e-3, atol=1e-5 * scale)


def test_bad_relevance_options_raise_clear_errors():
    from fam.errors import FamBenchError

    model = _model("conv4")
    with pytest.raises(FamBenchError, match="relevance_seed"):
        RelevanceCAM(model, "encoder.3", relevance_seed="dual")
    with pytest.raises(FamBenchError, match="zero_params"):
        RelevanceCAM(model, "encoder.3", composite="guided_backprop", zero_bias=True)
    with pytest.raises(FamBenchError, match="zplus"):
        RelevanceCAM(model, "encoder.3", composite="zplus_everywhere")


def _timm_and_torchvision(arch: str) -> tuple[nn.Module, nn.Module]:
    """timm's and torchvision's ResNet with the same (BatchNorm-trained) weights."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None)
    reference.fc = nn.Identity()
    reference.train()
    with torch.no_grad():
        for _ in range(2):
            reference(torch.randn(8, 3, 48, 48))
    other = timm.create_model(arch, pretrained=False, num_classes=0)
    other.load_state_dict(reference.state_dict())
    return other.eval(), reference.eval()


def _blocks(model: nn.Module) -> list[str]:
    return [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("composite", [{"composite": "zplus"}, {}])
def test_timm_resnet_relevance_equals_torchvision_at_every_block(arch, composite):
    timm_model, reference = _timm_and_torchvision(arch)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = reference(images)
        torch.testing.assert_close(timm_model(images), emb, rtol=1e-5, atol=1e-5)
    blocks = _blocks(reference) if arch == "resnet18" else ["layer1.0", "layer2.3", "layer4.2"]
    for layer in blocks:
        got = RelevanceCAM(timm_model, layer, **composite).layer_relevance(images, emb, "dot")
        want = RelevanceCAM(reference, layer, **composite).layer_relevance(images, emb, "dot")
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_timm_canonizer_keeps_the_block_output_and_is_removed():
    timm_model, _ = _timm_and_torchvision("resnet18")
    images = torch.randn(2, 3, 48, 48)
    explainer = RelevanceCAM(timm_model, "layer3", composite="zplus")
    with torch.no_grad():
        before = timm_model(images)
        with explainer._composite().context(timm_model):
            inside = timm_model(images)
        after = timm_model(images)
    torch.testing.assert_close(inside, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before)
    assert all("canonizer_sum" not in n for n, _ in timm_model.named_modules())


class PlainResidual(nn.Module):
    """A residual block that adds its branches with ``+``: no canonizer knows it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv(x))


class PlainResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block1 = PlainResidual(8)
        self.block2 = PlainResidual(8)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block2(self.block1(self.stem(x)))).flatten(1)


def test_uncanonized_residual_blocks_are_flagged_and_warned():
    torch.manual_seed(0)
    model = PlainResNet().eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        emb = model(images)
    from baselines.relevancecam import RelevanceNotConservedWarning

    # after block2 only the pooling follows: conserved, no warning
    last = RelevanceCAM(model, "block2", composite="zplus")
    last(images, emb, "dot")
    assert not bool(last.not_conserved.any())
    torch.testing.assert_close(last.conservation, torch.ones(3), rtol=1e-4, atol=0)
    # below a plain '+' the relevance is copied into both branches: flagged, warned
    explainer = RelevanceCAM(model, "block1", composite="zplus")
    with pytest.warns(RelevanceNotConservedWarning, match="PlainResNet at layer 'block1'"):
        explainer(images, emb, "dot")
    assert bool(explainer.not_conserved.all())
    assert bool((explainer.conservation > 1.05).all())
    # a non-conserving composite (epsilon with biases) is not checked
    loose = RelevanceCAM(model, "block1", composite="EpsilonPlusFlat")
    loose(images, emb, "dot")
    assert loose.not_conserved is None and loose.conservation is None
