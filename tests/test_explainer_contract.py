"""The contract every explainer keeps, checked for every method of the suite.

Same call, same output format, no side effects on the model (hooks, train/eval flags,
parameters' ``.grad``, BatchNorm statistics), batch-independence, and clear errors.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import baselines.eigencam
from baselines import (
    CenterMap,
    ConstantMap,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    MaskOracle,
    RandomMap,
    RelevanceCAM,
    ScoreCAM,
    XGradCAM,
)
from experiments.models.conv4 import Conv4
from fam import FAM
from fam.errors import FamBenchError

METHODS = {
    "fam": lambda m, layer: FAM(m, layer),
    "fam_ablation": lambda m, layer: FAM(m, layer, contribution="ablation", weights="abs_sum"),
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    # the raw-score variant: the probability needs a task (tests/test_retrieval_contrastive.py)
    "scorecam": lambda m, layer: ScoreCAM(m, layer, batch_size=24, score="similarity"),
    "relevancecam": RelevanceCAM,
    "eigencam": EigenCAM,
    "eigencam_signed": lambda m, layer: EigenCAM(m, layer, sign_correction=True),
    "random": lambda m, layer: RandomMap(m, layer, seed=0),
    "center": CenterMap,
    "constant": ConstantMap,
    "mask": MaskOracle,
}
#: maps that are a function of the model's activations (zero activations -> zero map)
ACTIVATION_MAPS = sorted(set(METHODS) - {"random", "center", "constant", "mask"})
LAYER = "encoder.3"
SIZE = 24


def _model() -> Conv4:
    torch.manual_seed(0)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    # Non-trivial BatchNorm statistics, so that eval vs. train mode changes the output.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    reference = torch.randn(n, 8, generator=gen).abs()
    return images, reference


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_maps_have_the_contract_format(method):
    model = _model()
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)
    maps = explainer(images, reference, "cosine")
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.device == images.device
    assert maps.min() >= 0 and maps.max() <= 1
    assert explainer.degenerate.shape == (3,)
    # Each map is scaled to span [0, 1] unless it is degenerate (then it stays all zero).
    peaks = maps.flatten(1).amax(1)
    assert torch.equal(peaks, torch.where(explainer.degenerate, 0.0, 1.0))
    raw = explainer(images, reference, "cosine", upsample=False)
    assert raw.shape == (3, 6, 6) and raw.min() >= 0


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"random"}))
@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_batch_equals_each_image_alone(method, similarity):
    model = _model()
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)
    batch = explainer(images, reference, similarity, upsample=False)
    single = torch.cat(
        [
            explainer(images[i : i + 1], reference[i : i + 1], similarity, upsample=False)
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-6 * float(batch.max()) + 1e-9)


def test_random_map_is_seeded_and_continues_its_stream():
    model = _model()
    images, reference = _inputs()
    a, b = RandomMap(model, LAYER, seed=5), RandomMap(model, LAYER, seed=5)
    first = a(images, reference)
    torch.testing.assert_close(first, b(images, reference))
    assert not torch.equal(first, a(images, reference))
    assert not torch.equal(first, RandomMap(model, LAYER, seed=6)(images, reference))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_side_effects_on_the_model(method):
    model = _model().train()
    model.encoder[1].eval()  # a mixed state must come back exactly as it was
    modes = [m.training for m in model.modules()]
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)
    explainer(images, reference, "cosine")
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(params, grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm statistics untouched too
    assert _no_hooks(model)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_hooks_are_removed_when_the_call_raises(method):
    model = _model()
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)

    def bad_similarity(emb, ref):
        return emb * ref  # (N, D) instead of (N,)

    with pytest.raises(FamBenchError, match="one score per image"):
        explainer(images, reference, bad_similarity)
    assert _no_hooks(model)
    assert all(not m.training for m in model.modules())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_maps_inside_no_grad(method):
    model = _model()
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)
    outside = explainer(images, reference, "dot")
    if method == "random":
        explainer = METHODS[method](model, LAYER)  # restart the seeded stream
    with torch.no_grad():
        inside = explainer(images, reference, "dot")
    torch.testing.assert_close(inside, outside)


@pytest.mark.parametrize("method", ACTIVATION_MAPS)
def test_zero_activations_give_zero_maps_flagged_degenerate(method):
    model = _model()
    with torch.no_grad():
        block = model.encoder[3]
        block[0].weight.zero_()
        block[0].bias.zero_()
        block[1].bias.fill_(-1.0)  # ReLU(BN(0)) == 0 everywhere at the target layer
    images, reference = _inputs()
    explainer = METHODS[method](model, LAYER)
    maps = explainer(images, reference, "cosine")
    assert torch.equal(maps, torch.zeros_like(maps))
    assert explainer.degenerate.all()
    assert explainer.degenerate_reason == ["constant"] * 3


@pytest.mark.parametrize("method", ACTIVATION_MAPS)
def test_nan_activations_give_nan_maps_flagged_non_finite(method):
    """One nan input pixel makes the second image's activations nan (as a diverged model
    would); its map is nan, the other maps are the same as without it."""
    model = _model()
    images, reference = _inputs()
    clean = METHODS[method](model, LAYER)(images, reference, "cosine")
    images[1, :, 5, 5] = float("nan")
    explainer = METHODS[method](model, LAYER)
    maps = explainer(images, reference, "cosine")
    # Never zeros: the sample's map is all nan, so every metric gives nan for it.
    assert torch.isnan(maps[1]).all()
    torch.testing.assert_close(maps[[0, 2]], clean[[0, 2]])
    assert explainer.degenerate.tolist() == [False, True, False]
    assert explainer.degenerate_reason == ["", "non-finite", ""]
    raw = explainer(images, reference, "cosine", upsample=False)
    assert torch.isnan(raw[1]).all() and torch.isfinite(raw[[0, 2]]).all()


def test_huge_finite_maps_are_scaled_not_overflowed():
    """A raw map spanning [-3e38, 3e38] (hi - lo overflows float32) still scales to [0, 1]."""
    from fam.maps import minmax_normalise

    raw = torch.tensor([[[-3e38, 0.0], [1e38, 3e38]]])
    maps = minmax_normalise(raw)
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.5], [2 / 3, 1.0]]]))
    assert torch.isnan(minmax_normalise(torch.tensor([[[1.0, float("inf")]]]))).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bad_inputs_raise_clear_errors(method):
    model = _model()
    images, reference = _inputs()
    build = METHODS[method]
    with pytest.raises(FamBenchError, match="is not a module of Conv4"):
        build(model, "encoder.9")
    explainer = build(model, LAYER)
    with pytest.raises(FamBenchError, match="reference has 9 dimensions"):
        explainer(images, torch.randn(3, 9), "cosine")
    with pytest.raises(FamBenchError, match=r"reference must have shape \(3, D\)"):
        explainer(images, torch.randn(2, 8), "cosine")
    with pytest.raises(FamBenchError, match="Unknown similarity 'cos'"):
        explainer(images, reference, "cos")
    with pytest.raises(FamBenchError, match="images are on meta but the model is on cpu"):
        explainer(images.to("meta"), reference.to("meta"), "cosine")
    assert _no_hooks(model)


def test_every_method_config_builds_its_explainer():
    """``conf/method/<name>.yaml``: one file per method, its ``_target_`` plus options."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    files = sorted(Path(__file__).parents[1].glob("conf/method/*.yaml"))
    assert {f.stem for f in files} == set(METHODS)
    model = _model()
    images, reference = _inputs()
    inputs = {  # what an explainer may declare it needs (the worker passes the same)
        "needs_masks": {"masks": torch.ones(3, SIZE, SIZE, dtype=torch.bool)},
        "needs_task_score": {
            "task_score": lambda emb, index: torch.cosine_similarity(emb, reference[index])
        },
        "needs_sample_seeds": {"sample_seeds": torch.tensor([3, 1, 2])},
    }
    for f in files:
        cfg = OmegaConf.load(f)
        explainer = instantiate(cfg, _partial_=True)(model, LAYER)
        extra = {
            k: v
            for need, kw in inputs.items()
            if getattr(explainer, need, False)
            for k, v in kw.items()
        }
        assert explainer(images, reference, "cosine", **extra).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("method", ["fam", "gradcam", "layercam", "scorecam", "eigencam"])
def test_amp_maps_agree_with_fp32(method):
    """bf16 autocast changes the arithmetic, not the explanation.

    Eigen-CAM is checked with the sign correction: the plain method keeps the SVD's own
    sign, which a bf16 rounding may flip (the map then becomes ReLU(-P)).
    """
    model = _model()
    images, reference = _inputs()
    build = {
        "fam": FAM,
        "gradcam": GradCAM,
        "layercam": LayerCAM,
        "scorecam": functools.partial(ScoreCAM, score="similarity"),
        "eigencam": lambda m, layer, **kw: EigenCAM(m, layer, sign_correction=True, **kw),
    }[method]
    fp32 = build(model, LAYER)(images, reference, "dot")
    bf16 = build(model, LAYER, amp=True)(images, reference, "dot")
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_maps_stay_on_cuda_and_match_cpu(method):
    model = _model()
    images, reference = _inputs()
    cpu = METHODS[method](model, LAYER)(images, reference, "cosine")
    model.cuda()
    # TF32 convolutions would differ from the CPU by ~1e-3 before any method runs.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        maps = METHODS[method](model, LAYER)(images.cuda(), reference.cuda(), "cosine")
    assert maps.device.type == "cuda"
    if method == "eigencam":
        # The SVD's own sign is not a property of the data (baselines/eigencam.py): the
        # device's rounding of the activations can flip it for an image (seen on an H200).
        # Each image must be the CPU map or the CPU map of the other sign (eigencam_signed,
        # parametrised too, must match exactly).
        unsigned = baselines.eigencam._lapack_projection
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(baselines.eigencam, "_lapack_projection", lambda a: -unsigned(a))
            flipped = METHODS[method](model.cpu(), LAYER)(images, reference, "cosine")
        for got, one, other in zip(maps.cpu(), cpu, flipped, strict=True):
            close = [torch.allclose(got, m, rtol=1e-3, atol=1e-3) for m in (one, other)]
            assert any(close), (got - one).abs().max()
    elif method != "random":  # a CUDA generator draws other numbers than a CPU one
        torch.testing.assert_close(maps.cpu(), cpu, rtol=1e-3, atol=1e-3)
