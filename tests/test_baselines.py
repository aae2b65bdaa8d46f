"""Baselines against independent references: pytorch-grad-cam, and LRP's conservation law.

Raw maps (``upsample=False``, at the target layer's resolution) are compared with
pytorch-grad-cam's own layer-resolution CAM: its hooks capture activations and
gradients during its own forward/backward pass, and its ``get_cam_image`` computes the
weighted sum, to which we apply the ReLU its ``compute_cam_per_layer`` applies before
scaling. Only its final min-max scaling and cv2 resizing are left out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM as RefEigenCAM
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as RefLayerCAM
from pytorch_grad_cam import ScoreCAM as RefScoreCAM
from pytorch_grad_cam import XGradCAM as RefXGradCAM
from pytorch_grad_cam.utils.svd_on_activations import (
    get_2d_projection,
    get_2d_projection_with_sign_correction,
)
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon, Pass
from zennit.types import Activation, Convolution

from baselines import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    RelevanceCAM,
    ScoreCAM,
    XGradCAM,
)
from experiments.models.conv4 import Conv4
from fam import FAM, closed_form
from fam.errors import FamBenchError
from fam.similarity import SIMILARITIES

SIMS = sorted(SIMILARITIES)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model.eval()


def _conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4().eval()


def _narrow_conv4() -> nn.Module:
    """Fewer channels (8) than positions (16): Eigen-CAM's other eigen-solve branch."""
    torch.manual_seed(0)
    return Conv4(hidden=8).eval()


@pytest.fixture(scope="module")
def cases() -> dict:
    """Model, target layer, images and references (embeddings of other images)."""
    out = {}
    for name, build, layer in [
        ("resnet18", _resnet18, "layer4"),
        ("conv4", _conv4, "encoder.3"),
        ("conv4_narrow", _narrow_conv4, "encoder.3"),
    ]:
        model = build()
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(2, 3, 64, 64, generator=gen)
        with torch.no_grad():
            reference = model(torch.randn(2, 3, 64, 64, generator=gen))
        out[name] = (model, layer, images, reference)
    return out


def _targets(reference: torch.Tensor, similarity: str) -> list:
    """pytorch-grad-cam targets: one callable per sample on that sample's output row."""
    fn = SIMILARITIES[similarity]
    return [lambda row, r=r: fn(row[None], r[None])[0] for r in reference]


def _reference_raw(cam_cls, model, layer, images, targets, projection=None) -> np.ndarray:
    """pytorch-grad-cam's layer-resolution map ``(N, h, w)`` after its ReLU."""
    cam = cam_cls(model=model, target_layers=[layer])
    cam.batch_size = 64  # Score-CAM's masked batch; no effect on the values
    try:
        if cam.uses_gradients:
            cam(images, targets)  # its forward + backward fill activations_and_grads
            grads = cam.activations_and_grads.gradients[0].numpy()
        else:
            cam.activations_and_grads(images)  # what its forward does before the CAM
            grads = None
        acts = cam.activations_and_grads.activations[0].numpy()
        if projection is not None:
            return np.maximum(projection(acts), 0)
        return np.maximum(cam.get_cam_image(images, layer, targets, acts, grads, False), 0)
    finally:
        cam.activations_and_grads.release()


def _assert_maps_close(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float32))
    assert ours.shape == ref_t.shape
    assert ref_t.amax() > 0, "reference map is all zero: the comparison would be vacuous"
    scale = float(ref_t.abs().amax())
    torch.testing.assert_close(ours, ref_t, rtol=1e-4, atol=1e-5 * scale)


GRADIENT_METHODS = [
    (GradCAM, RefGradCAM),
    (GradCAMPlusPlus, RefGradCAMPlusPlus),
    (XGradCAM, RefXGradCAM),
    (LayerCAM, RefLayerCAM),
]


@pytest.mark.parametrize("model_name", ["resnet18", "conv4"])
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("ours,theirs", GRADIENT_METHODS, ids=lambda c: c.__name__)
def test_gradient_cams_match_pytorch_grad_cam(cases, model_name, similarity, ours, theirs):
    model, layer, images, reference = cases[model_name]
    module = dict(model.named_modules())[layer]
    # The euclidean score of an unrelated reference pulls every channel down (ReLU kills
    # the map); a reference near the image's own embedding makes both signs appear.
    if similarity == "euclidean":
        with torch.no_grad():
            reference = model(images) + 0.5 * reference
    expected = _reference_raw(theirs, model, module, images, _targets(reference, similarity))
    got = ours(model, layer)(images, reference, similarity, upsample=False)
    _assert_maps_close(got, expected)


@pytest.mark.parametrize("model_name", ["resnet18", "conv4"])
@pytest.mark.parametrize("similarity", SIMS)
def test_scorecam_matches_pytorch_grad_cam(cases, model_name, similarity):
    model, layer, images, reference = cases[model_name]
    if model_name == "resnet18":
        # K forward passes per image: one image at layer3 (256 channels) keeps it quick.
        layer, images, reference = "layer3", images[:1], reference[:1]
    module = dict(model.named_modules())[layer]
    expected = _reference_raw(RefScoreCAM, model, module, images, _targets(reference, similarity))
    # A batch size that does not divide N*K exercises the packing of (image, channel) jobs.
    got = ScoreCAM(model, layer, score="similarity", batch_size=37)(
        images, reference, similarity, upsample=False
    )
    _assert_maps_close(got, expected)


@pytest.mark.parametrize("model_name", ["resnet18", "conv4", "conv4_narrow"])
def test_eigencam_equals_pytorch_grad_cam_eigencam(cases, model_name):
    """The plain method is pytorch-grad-cam's EigenCAM, sign included, on every image."""
    model, layer, images, reference = cases[model_name]
    module = dict(model.named_modules())[layer]
    targets = _targets(reference, "cosine")
    got = EigenCAM(model, layer)(images, reference, "cosine", upsample=False)
    expected = _reference_raw(RefEigenCAM, model, module, images, targets)
    _assert_maps_close(got, expected)


def test_eigencam_equals_pytorch_grad_cam_on_many_images():
    """16 images per layer: the sign agrees everywhere (the audit found 4/16 and 14/16
    disagreements with the sign-corrected map)."""
    torch.manual_seed(0)
    model = Conv4(hidden=16).eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = torch.zeros(1, 16)
    for layer in ["encoder.1", "encoder.3"]:
        module = dict(model.named_modules())[layer]
        got = EigenCAM(model, layer)(images, reference, "dot", upsample=False)
        expected = _reference_raw(RefEigenCAM, model, module, images, [None] * 16)
        _assert_maps_close(got, expected)


@pytest.mark.parametrize("model_name", ["resnet18", "conv4", "conv4_narrow"])
def test_eigencam_sign_correction_is_seg_eigen_cams(cases, model_name):
    model, layer, images, reference = cases[model_name]
    module = dict(model.named_modules())[layer]
    targets = _targets(reference, "cosine")
    explainer = EigenCAM(model, layer, sign_correction=True)
    got = explainer(images, reference, "cosine", upsample=False)
    signed = _reference_raw(
        RefEigenCAM,
        model,
        module,
        images,
        targets,
        projection=get_2d_projection_with_sign_correction,
    )
    _assert_maps_close(got, signed)
    # It differs from the plain projection only by the sign: ReLU(P) or ReLU(-P).
    plain = get_2d_projection(
        _reference_raw(RefEigenCAM, model, module, images, targets, projection=lambda a: a)
    )
    for i in range(len(images)):
        candidates = [np.maximum(s * plain[i], 0) for s in (1, -1)]
        errors = [np.abs(got[i].numpy() - c).max() for c in candidates]
        assert min(errors) <= 1e-5 * np.abs(plain[i]).max()


def test_eigencam_ignores_the_reference(cases):
    model, layer, images, reference = cases["conv4"]
    explainer = EigenCAM(model, layer)
    a = explainer(images, reference, "cosine")
    b = explainer(images, -reference, "dot")
    torch.testing.assert_close(a, b)


# -- Relevance-CAM ---------------------------------------------------------------------


def _bias_free_net() -> nn.Module:
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        .double()
        .eval()
    )


def _epsilon_composite() -> LayerMapComposite:
    # Epsilon rule with a negligible epsilon on bias-free convolutions conserves relevance
    # exactly (z / (z + eps) == 1 up to 1e-12); activations pass relevance through.
    return LayerMapComposite([(Activation, Pass()), (Convolution, Epsilon(epsilon=1e-12))])


@pytest.mark.parametrize("layer", ["1", "3"])
@pytest.mark.parametrize("similarity", SIMS)
def test_relevancecam_conserves_relevance_at_any_depth(layer, similarity):
    model = _bias_free_net()
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 12, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        emb = model(images)
        reference = model(torch.randn(3, 3, 12, 12, generator=gen, dtype=torch.float64))
    explainer = RelevanceCAM(model, layer, composite=_epsilon_composite())
    relevance = explainer.layer_relevance(images, reference, similarity)
    # The seed is FAM's product split of the score: it sums to s (dot, cosine) and to
    # s + |r|^2 for the negative squared distance.
    score = SIMILARITIES[similarity](emb, reference)
    if similarity == "euclidean":
        score = score + reference.pow(2).sum(1)
    if similarity == "euclidean_distance":
        # (2 e.r - |e|^2) / (2d) = (|r|^2 - d^2) / (2d), d = -s: the first order of the
        # squared split at distance d
        score = (reference.pow(2).sum(1) - score.pow(2)) / (-2 * score)
    assert relevance.abs().sum() > 0
    torch.testing.assert_close(
        relevance.sum(dim=(1, 2, 3)).to(score.dtype), score, rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("model_name", ["resnet18", "conv4"])
def test_relevancecam_at_last_layer_equals_fam_product_with_dot(cases, model_name):
    """With a GAP embedding read at the last layer, ``w_k = e_k r_k``.

    Between the target layer and the embedding there is only the global average, an
    AdaptiveAvgPool2d in both models (Conv-4's ``EmbeddingPool``), which gets zennit's Norm
    rule: it redistributes each seed ``R_k = e_k r_k`` over the positions of channel k in
    proportion to A_kij, so ``sum_ij R_kij = e_k r_k``, FAM's ``product`` contribution for
    the dot similarity,
    so the two raw maps differ only by FAM's normalisation ``sum_k |c_k|``.
    """
    model, layer, images, reference = cases[model_name]
    with torch.no_grad():
        emb = model(images)
    explainer = RelevanceCAM(model, layer)
    weights = explainer.layer_relevance(images, reference, "dot").sum(dim=(2, 3))
    product = closed_form(emb[:, :, None], reference[:, :, None], "dot", "product")
    torch.testing.assert_close(weights, product, rtol=1e-4, atol=1e-5 * float(product.abs().max()))

    ours = explainer(images, reference, "dot", upsample=False)
    fam = FAM(model, layer, weights="abs_sum")(images, reference, "dot", upsample=False)
    scaled = fam * product.abs().sum(1)[:, None, None]
    assert ours.amax() > 0
    torch.testing.assert_close(ours, scaled, rtol=1e-4, atol=1e-5 * float(ours.abs().max()))


def test_relevancecam_callable_similarity_uses_gradient_times_input(cases):
    """For a callable equal to the dot product, gradient x input of e is ``e_d r_d``."""
    model, layer, images, reference = cases["conv4"]
    explainer = RelevanceCAM(model, layer)
    named = explainer.layer_relevance(images, reference, "dot")
    custom = explainer.layer_relevance(images, reference, lambda e, r: (e * r).sum(1))
    torch.testing.assert_close(custom, named)


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_relevancecam_leaves_resnet_unchanged(cases, layer):
    """Canonizers merge BatchNorm and rewrite residual blocks; all of it is undone,
    also when the call raises."""
    model, _, images, reference = cases["resnet18"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    explainer = RelevanceCAM(model, layer)
    maps = explainer(images, reference, "cosine")
    assert maps.shape == (2, 64, 64)
    with pytest.raises(FamBenchError, match="one score per image"):
        explainer(images, reference, lambda e, r: e * r)  # raises inside the context
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [n for n, _ in model.named_modules()] == names
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert "forward" not in vars(m)


def test_relevancecam_composite_by_name_and_unknown_name(cases):
    model, layer, images, reference = cases["conv4"]
    by_key = RelevanceCAM(model, layer, composite="epsilon_plus_flat")(images, reference)
    by_class = RelevanceCAM(model, layer)(images, reference)
    torch.testing.assert_close(by_key, by_class)
    with pytest.raises(FamBenchError, match="Unknown zennit composite"):
        RelevanceCAM(model, layer, composite="nope")
