"""FAM against its definitions.

``fam`` (the paper's, as the first author's code computes it) is compared with an
independent implementation of its four steps; ``fam_ablation`` (the drop in similarity
when one channel is removed) with the slow, literal computation (zero channel k,
recompute the score) for every similarity and for GAP, flatten and non-GAP embeddings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.models import build_model
from experiments.models.conv4 import Conv4
from fam import FAM, SimilarityTarget, capture_layer, closed_form, eval_mode
from fam.similarity import SIMILARITIES

SIMS = sorted(SIMILARITIES)
N, SIZE = 3, 32


def ABLATION(model, layer, **options):  # noqa: N802 - reads as the method's name
    """``fam_ablation``: the drop in similarity, ``c / sum|c|`` weights, ReLU'd map."""
    return FAM(model, layer, contribution="ablation", weights="abs_sum", **options)


def _conv4(pooling: str = "gap") -> Conv4:
    torch.manual_seed(0)
    return Conv4(hidden=16, pools=(True, True, True, False), pooling=pooling).double().eval()


def _inputs(model: nn.Module, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(N, 3, size, size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        emb = model(images)
    # Signed references near the images' own embeddings: every similarity has channels
    # that raise and channels that lower the score.
    noise = torch.randn(emb.shape, generator=gen, dtype=emb.dtype)
    reference = emb + 2 * emb.abs().mean() * noise
    return images, reference


def _embed(model: nn.Module, layer: nn.Module, images: torch.Tensor):
    with torch.no_grad(), capture_layer(layer) as cap:
        emb = model(images)
    return emb, cap.activations


def _slow_embedding_ablation(emb, acts, reference, similarity) -> torch.Tensor:
    """``c_k = s(e) - s(e with channel k's dimensions zeroed)``, one channel at a time."""
    fn = SIMILARITIES[similarity] if isinstance(similarity, str) else similarity
    n, k = acts.shape[:2]
    base = fn(emb, reference)
    out = torch.empty(n, k, dtype=emb.dtype)
    for c in range(k):
        ablated = emb.view(n, k, -1).clone()
        ablated[:, c] = 0
        out[:, c] = base - fn(ablated.view(n, -1), reference)
    return out


def _slow_forward_ablation(model, layer, images, reference, similarity) -> torch.Tensor:
    """``c_k = s(f(x)) - s(f(x) with channel k of the layer's output zeroed)``."""
    fn = SIMILARITIES[similarity]
    emb, acts = _embed(model, layer, images)
    base = fn(emb, reference)
    out = torch.empty(acts.shape[:2], dtype=emb.dtype)
    for c in range(acts.shape[1]):

        def zero_channel(module, inputs, output, c=c):
            output = output.clone()
            output[:, c] = 0
            return output

        handle = layer.register_forward_hook(zero_channel)
        try:
            with torch.no_grad():
                out[:, c] = base - fn(model(images), reference)
        finally:
            handle.remove()
    return out


def _map_from(contributions: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    weights = contributions / contributions.abs().sum(1, keepdim=True)
    return torch.relu((weights[:, :, None, None] * acts).sum(1)).float()


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
@pytest.mark.parametrize("similarity", SIMS)
def test_closed_form_equals_the_definition(pooling, similarity):
    model = _conv4(pooling)
    images, reference = _inputs(model)
    explainer = ABLATION(model, "encoder.3")
    emb, acts = _embed(model, explainer.target_layer, images)
    with eval_mode(model), torch.no_grad():
        got = explainer.contributions(images, emb, acts, SimilarityTarget(reference, similarity))
    assert explainer.last_path == pooling
    expected = _slow_embedding_ablation(emb, acts, reference, similarity)
    assert (expected > 0).any() and (expected < 0).any()
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
    raw = explainer(images, reference, similarity, upsample=False)
    torch.testing.assert_close(raw, _map_from(expected, acts))


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
@pytest.mark.parametrize("similarity", SIMS)
def test_forward_ablation_fallback_equals_closed_form(pooling, similarity):
    model = _conv4(pooling)
    images, reference = _inputs(model)
    closed = ABLATION(model, "encoder.3", path="closed_form")
    fallback = ABLATION(model, "encoder.3", path="forward_ablation", ablation_batch=5)
    a = closed(images, reference, similarity, upsample=False)
    b = fallback(images, reference, similarity, upsample=False)
    assert fallback.last_path == "forward_ablation"
    assert a.amax() > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.max()))


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
@pytest.mark.parametrize("similarity", SIMS)
def test_product_contributions_sum_to_the_score(pooling, similarity):
    model = _conv4(pooling)
    images, reference = _inputs(model)
    emb, acts = _embed(model, model.encoder[3], images)
    n, k = acts.shape[:2]
    shares = closed_form(emb.view(n, k, -1), reference.view(n, k, -1), similarity, "product")
    score = SIMILARITIES[similarity](emb, reference)
    if similarity == "euclidean":
        # 2 e.r - |e|^2 = -|e - r|^2 + |r|^2: the split sums to s + |r|^2, a constant of
        # the reference that does not depend on the image.
        score = score + reference.pow(2).sum(1)
    if similarity == "euclidean_distance":
        # (2 e.r - |e|^2) / (2d) = (|r|^2 - d^2) / (2d), d = -s: the first order of the
        # squared split at distance d
        score = (reference.pow(2).sum(1) - score.pow(2)) / (-2 * score)
    torch.testing.assert_close(shares.sum(1), score, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["auto", "forward_ablation"])
def test_callable_similarity_gives_the_same_map_as_its_name(path):
    model = _conv4()
    images, reference = _inputs(model)
    explainer = ABLATION(model, "encoder.3", path=path)
    named = explainer(images, reference, "cosine")

    def my_cosine(e, r):
        return (e * r).sum(1) / (e.norm(dim=1) * r.norm(dim=1))

    custom = explainer(images, reference, my_cosine)
    torch.testing.assert_close(custom, named, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
def test_product_with_a_callable_is_its_gradient_split(pooling):
    model = _conv4(pooling)
    images, reference = _inputs(model)
    emb, acts = _embed(model, model.encoder[3], images)
    n, k = acts.shape[:2]
    product = FAM(model, "encoder.3", weights="abs_sum")
    # a callable dot product: the split is e_k r_k, the named closed form exactly
    named = product(images, reference, "dot", upsample=False)
    custom = product(images, reference, lambda e, r: (e * r).sum(1), upsample=False)
    torch.testing.assert_close(custom, named.float(), rtol=1e-5, atol=1e-6 * float(named.max()))

    # a score with a curved part, by hand: s = e.r + 0.5 |e|^2 has ds/de = r + e, so
    # c_k = sum_{g in k} e_g (r_g + e_g); its maps are ReLU(sum_k w_k A_k)
    def curved(e, r):
        return (e * r).sum(1) + 0.5 * e.pow(2).sum(1)

    e, r = emb.view(n, k, -1), reference.view(n, k, -1)
    c = (e * (r + e)).sum(-1)
    w = c / c.abs().sum(1, keepdim=True)
    expected = torch.relu((w[:, :, None, None] * acts).sum(1)).float()
    got = product(images, reference, curved, upsample=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))


@pytest.mark.parametrize("similarity", SIMS)
def test_head_after_the_layer_takes_the_fallback_and_matches_a_slow_loop(similarity):
    conv4 = _conv4()
    torch.manual_seed(5)
    model = nn.Sequential(conv4, nn.Linear(16, 12)).double().eval()
    images, reference = _inputs(model)
    layer = "0.encoder.3"
    explainer = ABLATION(model, layer, ablation_batch=6)
    raw = explainer(images, reference, similarity, upsample=False)
    assert explainer.last_path == "forward_ablation"
    module = dict(model.named_modules())[layer]
    expected = _slow_forward_ablation(model, module, images, reference, similarity)
    _, acts = _embed(model, module, images)
    slow = _map_from(expected, acts)
    assert slow.amax() > 0
    torch.testing.assert_close(raw, slow, rtol=1e-5, atol=1e-6 * float(slow.max()))


def test_layer_followed_by_an_inplace_relu_is_captured_before_the_relu():
    # Conv-4's BatchNorm output is overwritten by ReLU(inplace=True); the captured
    # activations must be the BatchNorm's own (negative values included), so the GAP check
    # fails and FAM takes the exact fallback instead of explaining the ReLU output.
    torch.manual_seed(0)
    model = Conv4(pools=(True, True, False, False)).eval()
    images, reference = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    fam = FAM(model, "encoder.3.1")
    auto = fam(images, reference, "cosine", upsample=False)
    assert fam.last_path == "forward_ablation"
    slow = FAM(model, "encoder.3.1", path="forward_ablation")(
        images, reference, "cosine", upsample=False
    )
    torch.testing.assert_close(auto, slow)


def test_bf16_autocast_keeps_the_closed_form_path():
    torch.manual_seed(0)
    model = Conv4(pools=(True, True, False, False)).eval()
    images, reference = torch.randn(3, 3, 32, 32), torch.randn(3, 64)
    fam = FAM(model, amp=True)
    fam(images, reference, "cosine")
    assert fam.last_path == "gap"


def test_a_constant_nonzero_map_is_flagged_degenerate():
    # A 1x1 target map (or any constant map) ranks no pixel above another.
    torch.manual_seed(0)
    model = Conv4(pools=(True, True, True, True)).eval()  # 16 px -> 1x1 last map
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(images)
    fam = FAM(model)
    maps = fam(images, reference, "dot")
    assert bool(fam.degenerate.all())
    assert bool((maps == 0).all())


# -- fam: the paper's four steps --------------------------------------------------------
def _paper_fam(model, layer, images, reference, similarity):
    """The first author's FAM step, written out independently: per-dimension product of
    the (for cosine, L2-normalised) embedding and reference, divided by the absolute
    similarity, min-max over channels; the map is the plain weighted channel sum,
    min-max normalised (returned at the layer's size and bilinearly resized)."""
    acts = {}
    handle = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("A", o.detach()))
    try:
        with torch.no_grad():
            emb = model(images)
    finally:
        handle.remove()
    a = acts["A"]
    e, r = emb, reference
    if similarity == "cosine":
        e, r = e / e.norm(dim=1, keepdim=True), r / r.norm(dim=1, keepdim=True)
    product = e * r
    share = product / product.sum(1, keepdim=True).abs()
    lo, hi = share.min(1, keepdim=True).values, share.max(1, keepdim=True).values
    w = (share - lo) / (hi - lo)
    fam = (w[:, :, None, None] * a).sum(1)

    def minmax(m):
        flat = m.flatten(1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        return ((flat - lo) / (hi - lo)).view_as(m)

    raw = minmax(fam)
    resized = torch.nn.functional.interpolate(
        raw[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    return raw, minmax(resized)


def _paper_case(name: str):
    torch.manual_seed(0)
    if name == "conv4":
        model = Conv4(hidden=16, pools=(True, True, True, False)).double().eval()
        layer = "encoder.3"
    else:
        model = build_model("resnet18").double().eval()
        layer = "layer4"
    images, reference = _inputs(model, 128 if name == "resnet18" else SIZE)
    return model, layer, images, reference


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("name", ["conv4", "resnet18"])
def test_fam_equals_the_papers_four_steps(name, similarity):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from experiments.config import CONF_DIR

    model, layer, images, reference = _paper_case(name)
    module = dict(model.named_modules())[layer]
    raw, maps = _paper_fam(model, module, images, reference, similarity)
    assert raw.shape[-1] > 1 and (raw < 0.5).any() and (raw > 0.5).any()
    from_config = instantiate(OmegaConf.load(CONF_DIR / "method" / "fam.yaml"), _partial_=True)
    for explainer in (FAM(model, layer), from_config(model, layer)):
        got_raw = explainer(images, reference, similarity, upsample=False)
        assert explainer.last_path == "gap"
        torch.testing.assert_close(got_raw, raw.float(), rtol=0, atol=1e-5)
        got = explainer(images, reference, similarity)
        torch.testing.assert_close(got, maps.float(), rtol=0, atol=1e-5)
        assert not bool(explainer.degenerate.any())


def test_fam_ablation_config_is_the_drop_with_abs_sum_weights():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from experiments.config import CONF_DIR

    model = _conv4("flatten")
    images, reference = _inputs(model)
    cfg = OmegaConf.load(CONF_DIR / "method" / "fam_ablation.yaml")
    explainer = instantiate(cfg, _partial_=True)(model, "encoder.3")
    emb, acts = _embed(model, explainer.target_layer, images)
    raw = explainer(images, reference, "cosine", upsample=False)
    expected = _slow_embedding_ablation(emb, acts, reference, "cosine")
    torch.testing.assert_close(raw, _map_from(expected, acts))


@pytest.mark.parametrize("similarity", SIMS)
def test_fam_after_a_head_weights_the_forward_ablation_drop_by_minmax(similarity):
    """No per-channel share exists when a head follows the layer: ``fam`` min-max scales the
    exact drop (the slow loop), and maps ``minmax(sum_k w_k A_k)``."""
    conv4 = _conv4()
    torch.manual_seed(5)
    model = nn.Sequential(conv4, nn.Linear(16, 12)).double().eval()
    images, reference = _inputs(model)
    layer = "0.encoder.3"
    explainer = FAM(model, layer, ablation_batch=6)
    raw = explainer(images, reference, similarity, upsample=False)
    assert explainer.last_path == "forward_ablation"
    module = dict(model.named_modules())[layer]
    drop = _slow_forward_ablation(model, module, images, reference, similarity)
    drop = drop / drop.sum(1, keepdim=True).abs()
    w = (drop - drop.amin(1, keepdim=True)) / (
        drop.amax(1, keepdim=True) - drop.amin(1, keepdim=True)
    )
    _, acts = _embed(model, module, images)
    fam = (w[:, :, None, None] * acts).sum(1).flatten(1)
    lo, hi = fam.amin(1, keepdim=True), fam.amax(1, keepdim=True)
    expected = ((fam - lo) / (hi - lo)).view_as(raw)
    torch.testing.assert_close(raw, expected.float(), rtol=0, atol=1e-5)


def test_fam_keeps_a_zero_map_zero_and_degenerate():
    """All-zero activations give a constant sum: never stretched, flagged degenerate."""
    model = _conv4()
    images, reference = _inputs(model)
    explainer = FAM(model, "encoder.3")
    zero = lambda module, inputs, output: torch.zeros_like(output)  # noqa: E731
    handle = explainer.target_layer.register_forward_hook(zero)
    try:
        maps = explainer(images, torch.ones_like(reference), "dot")
    finally:
        handle.remove()
    assert bool(explainer.degenerate.all()) and bool((maps == 0).all())
