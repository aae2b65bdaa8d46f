"""Deletion / insertion: agreement with a per-step loop written from RISE's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from evaluation import auc, deletion_insertion
from fam.errors import FamBenchError


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    # Non-trivial BN statistics so that train and eval mode give different scores.
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def class_probability(model: nn.Module, classes: torch.Tensor):
    def score_fn(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        probs = model(images).float().softmax(dim=1)
        return probs.gather(1, classes[index][:, None])[:, 0]

    return score_fn


def rise_blur(images: torch.Tensor) -> torch.Tensor:
    """RISE's gkern(11, 5) as a full 2-D kernel and conv2d with zero padding."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    kernel = torch.tensor(gaussian_filter(delta, 5), dtype=images.dtype)
    weight = torch.zeros(3, 3, 11, 11, dtype=images.dtype)
    for c in range(3):
        weight[c, c] = kernel
    return F.conv2d(images, weight, padding=5)


def reference_curves(score_fn, image, saliency, index, step, deleted, inserted):
    """RISE's CausalMetric.single_run: one forward per step per image."""
    c, h, w = image.shape
    order = torch.argsort(saliency.flatten(), descending=True, stable=True)
    n_steps = math.ceil(h * w / step)
    curves = []
    for start, finish in ((image.clone(), deleted), (inserted.clone(), image)):
        scores = []
        for i in range(n_steps + 1):
            with torch.no_grad():
                scores.append(score_fn(start[None], torch.tensor([index]))[0])
            if i < n_steps:
                coords = order[step * i : step * (i + 1)]
                start.view(c, -1)[:, coords] = finish.reshape(c, -1)[:, coords]
        curves.append(torch.stack(scores))
    return curves


def rise_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


@pytest.mark.parametrize(
    ("h", "w", "step", "batch_size", "substrates"),
    [
        (16, 16, 10, 7, ("zeros", "blur")),  # batch smaller than one curve (53 jobs/sample)
        (12, 20, 7, 256, ("zeros", "blur")),  # non-square, 240 px not divisible by 7
        (12, 20, 33, 16, ("blur", "blur")),  # shared pure-substrate point
        (16, 16, 256, 3, ("mean", "zeros")),  # one step covers the whole image
    ],
)
def test_curves_equal_a_per_step_loop_from_the_definition(h, w, step, batch_size, substrates):
    torch.manual_seed(1)
    n = 5
    model = small_model()
    images = torch.randn(n, 3, h, w)
    # Quantised maps so that ties exist and the stable order matters.
    maps = (torch.rand(n, h, w) * 6).floor() / 6
    classes = torch.randint(0, 5, (n,))
    score_fn = class_probability(model, classes)
    result = deletion_insertion(
        score_fn,
        images,
        maps,
        step=step,
        deletion_substrate=substrates[0],
        insertion_substrate=substrates[1],
        batch_size=batch_size,
        ties="stable",
    )
    n_steps = math.ceil(h * w / step)
    assert result.n_steps == n_steps
    assert result.deletion_curve.shape == (n, n_steps + 1)
    assert result.insertion_curve.shape == (n, n_steps + 1)
    subs = {
        "zeros": torch.zeros_like(images),
        "blur": rise_blur(images),
        "mean": images.mean(dim=(2, 3), keepdim=True).expand_as(images),
    }
    for i in range(n):
        deletion, insertion = reference_curves(
            score_fn, images[i], maps[i], i, step, subs[substrates[0]][i], subs[substrates[1]][i]
        )
        torch.testing.assert_close(result.deletion_curve[i], deletion, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.insertion_curve[i], insertion, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.deletion_auc[i], rise_auc(deletion), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            result.insertion_auc[i], rise_auc(insertion), atol=1e-5, rtol=1e-4
        )
    expected_fractions = torch.tensor([min(k * step, h * w) / (h * w) for k in range(n_steps + 1)])
    torch.testing.assert_close(result.fractions, expected_fractions)


def test_tensor_and_callable_substrates_match_the_named_ones():
    torch.manual_seed(2)
    images, maps = torch.randn(3, 3, 8, 8), torch.rand(3, 8, 8)
    score_fn = class_probability(small_model(), torch.tensor([0, 1, 2]))
    named = deletion_insertion(
        score_fn, images, maps, step=5, deletion_substrate="zeros", insertion_substrate="mean"
    )
    custom = deletion_insertion(
        score_fn,
        images,
        maps,
        step=5,
        deletion_substrate=torch.zeros(3, 1, 1),
        insertion_substrate=lambda x: x.mean((2, 3), keepdim=True).expand_as(x).clone(),
    )
    torch.testing.assert_close(named.deletion_curve, custom.deletion_curve)
    torch.testing.assert_close(named.insertion_curve, custom.insertion_curve)


def test_auc_of_hand_made_curves():
    # Trapezoids of width 1/3: (0.75 + 0.25 + 0) / 3 and (0.5 + 1 + 1) / 3.
    curves = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]])
    torch.testing.assert_close(auc(curves), torch.tensor([1.0 / 3, 2.5 / 3, 0.2]))
    with pytest.raises(FamBenchError):
        auc(torch.ones(3, 1))


def test_a_map_that_ranks_the_object_first_deletes_and_inserts_faster():
    torch.manual_seed(3)
    n, h, w = 4, 16, 16
    images = torch.rand(n, 3, h, w) * 0.2
    inside = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (y, x) in enumerate([(2, 3), (8, 8), (5, 10), (9, 1)]):
        inside[i, y : y + 6, x : x + 6] = True
    images = images + inside[:, None] * 1.0

    def object_intensity(batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        m = inside[index][:, None]
        return (batch * m).sum(dim=(1, 2, 3)) / (3 * m.sum(dim=(1, 2, 3)))

    good = inside.float() + 0.1 * torch.rand(n, h, w)
    good_result = deletion_insertion(object_intensity, images, good, step=8)
    bad_result = deletion_insertion(object_intensity, images, -good, step=8)
    assert (good_result.deletion_auc < bad_result.deletion_auc - 0.3).all()
    assert (good_result.insertion_auc > bad_result.insertion_auc + 0.3).all()


def test_peak_images_per_call_never_exceed_batch_size():
    torch.manual_seed(4)
    for n, batch_size in ((1, 4), (13, 32), (40, 32)):
        images, maps = torch.randn(n, 3, 6, 6), torch.rand(n, 6, 6)
        sizes = []

        def score_fn(batch, index, sizes=sizes):
            sizes.append(batch.shape[0])
            assert index.shape == (batch.shape[0],) and index.dtype == torch.long
            return batch.mean(dim=(1, 2, 3))

        result = deletion_insertion(score_fn, images, maps, step=5, batch_size=batch_size)
        n_steps = math.ceil(36 / 5)
        assert max(sizes) <= batch_size
        # Every point is scored once, the unperturbed image once for both curves.
        assert sum(sizes) == n * (2 * n_steps + 1)
        assert result.deletion_auc.shape == (n,)


def test_model_mode_is_restored_and_no_gradients_are_kept():
    torch.manual_seed(5)
    model = small_model().train()
    model[3].eval()  # a submodule with its own flag must keep it
    images, maps = torch.randn(3, 3, 8, 8), torch.rand(3, 8, 8)
    classes = torch.tensor([1, 2, 3])
    result = deletion_insertion(
        class_probability(model, classes), images, maps, step=9, batch_size=10, model=model
    )
    assert model.training and model[1].training and not model[3].training
    assert not result.deletion_curve.requires_grad and not result.insertion_auc.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # The scores are the eval-mode scores (BN running statistics), not batch statistics.
    eval_model = small_model().eval()
    expected = deletion_insertion(class_probability(eval_model, classes), images, maps, step=9)
    torch.testing.assert_close(result.deletion_curve, expected.deletion_curve)


def test_bf16_autocast_keeps_aucs_within_0_01_of_fp32():
    torch.manual_seed(6)
    model = small_model()
    images, maps = torch.randn(6, 3, 16, 16), torch.rand(6, 16, 16)
    score_fn = class_probability(model, torch.randint(0, 5, (6,)))
    fp32 = deletion_insertion(score_fn, images, maps, step=16)
    bf16 = deletion_insertion(score_fn, images, maps, step=16, amp=True)
    assert (fp32.deletion_auc - bf16.deletion_auc).abs().max() < 0.01
    assert (fp32.insertion_auc - bf16.insertion_auc).abs().max() < 0.01
    assert bf16.deletion_auc.dtype == torch.float32


def test_user_mistakes_raise_clear_errors():
    images, maps = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    score_fn = class_probability(small_model(), torch.tensor([0, 1]))
    with pytest.raises(FamBenchError, match="image resolution"):
        deletion_insertion(score_fn, images, torch.rand(2, 4, 4))
    with pytest.raises(FamBenchError, match="Unknown substrate"):
        deletion_insertion(score_fn, images, maps, deletion_substrate="noise")
    with pytest.raises(FamBenchError, match="step"):
        deletion_insertion(score_fn, images, maps, step=0)
    with pytest.raises(FamBenchError, match="ties must be one of"):
        deletion_insertion(score_fn, images, maps, ties="raster")
    with pytest.raises(FamBenchError, match="one score per perturbed image"):
        deletion_insertion(lambda x, i: x.mean(), images, maps, step=8)


# -- ties and non-finite maps --------------------------------------------------------------


def _row_weighted_score(h: int, w: int):
    """A linear score in [0, 1] for images of ones that weighs the top rows most, so the
    order in which tied pixels go changes the curve a lot."""
    weight = torch.linspace(1.0, 0.0, h)[:, None].expand(h, w).contiguous()
    weight = weight / (3 * weight.sum())

    def score_fn(x, index):
        return (x * weight).sum(dim=(1, 2, 3))

    return score_fn


def test_random_ties_make_a_constant_map_score_as_a_random_map():
    """Under ties="pixel" a constant map's pixel order is a uniform permutation: the
    expected deletion curve of a linear score is then the straight line from s(image)
    to s(substrate), AUC 0.5, which random maps also give; the stable raster order
    deletes the heavily weighted top rows first and scores far lower."""
    h = w = 8
    n = 512
    score_fn = _row_weighted_score(h, w)
    images = torch.ones(n, 3, h, w)
    constant = torch.zeros(n, h, w)
    random_maps = torch.rand(n, h, w, generator=torch.Generator().manual_seed(3))
    kwargs = {"step": 4, "insertion_substrate": "zeros"}
    tied = deletion_insertion(score_fn, images, constant, ties="pixel", seed=1, **kwargs)
    rand = deletion_insertion(score_fn, images, random_maps, ties="pixel", seed=2, **kwargs)
    stable = deletion_insertion(score_fn, images, constant, ties="stable", **kwargs)

    def mean_and_se(x):
        return float(x.mean()), float(x.std() / math.sqrt(len(x)))

    m_tied, se_tied = mean_and_se(tied.deletion_auc)
    m_rand, se_rand = mean_and_se(rand.deletion_auc)
    assert se_tied > 0  # per-sample tie orders differ
    assert abs(m_tied - 0.5) < 4 * se_tied
    assert abs(m_rand - 0.5) < 4 * se_rand
    assert abs(m_tied - m_rand) < 4 * math.hypot(se_tied, se_rand)
    # Insertion of the same pixels is the mirror image: AUC 1 - deletion AUC per sample.
    torch.testing.assert_close(tied.insertion_auc, 1 - tied.deletion_auc)
    # Stable raster order: the curve of deleting row-major, i.e. 1 - the cumulative
    # weight share of the first k*4 pixels, far below the random expectation.
    share = torch.linspace(1.0, 0.0, h)[:, None].expand(h, w).flatten()
    share = share / share.sum()
    expected = torch.cat([torch.ones(1), 1 - share.cumsum(0)[3::4]])
    torch.testing.assert_close(stable.deletion_curve[0], expected, atol=1e-5, rtol=1e-5)
    assert float(stable.deletion_auc[0]) < m_tied - 0.1


def test_random_ties_are_seeded_and_only_break_ties():
    h, w = 6, 10
    score_fn = _row_weighted_score(h, w)
    images = torch.rand(4, 3, h, w, generator=torch.Generator().manual_seed(0))
    maps = (torch.rand(4, h, w, generator=torch.Generator().manual_seed(1)) * 3).floor()
    a = deletion_insertion(score_fn, images, maps, step=5, seed=7)
    b = deletion_insertion(score_fn, images, maps, step=5, seed=7)
    c = deletion_insertion(score_fn, images, maps, step=5, seed=8)
    torch.testing.assert_close(a.deletion_curve, b.deletion_curve)
    assert not torch.equal(a.deletion_curve, c.deletion_curve)
    # A generator continues its stream: two calls draw different tie orders.
    gen = torch.Generator().manual_seed(7)
    first = deletion_insertion(score_fn, images, maps, step=5, seed=gen)
    second = deletion_insertion(score_fn, images, maps, step=5, seed=gen)
    torch.testing.assert_close(first.deletion_curve, a.deletion_curve)
    assert not torch.equal(first.deletion_curve, second.deletion_curve)
    # Without ties the order is the map's, whatever the tie rule.
    distinct = torch.rand(4, h, w, generator=torch.Generator().manual_seed(2))
    r = deletion_insertion(score_fn, images, distinct, step=5, ties="pixel", seed=3)
    s = deletion_insertion(score_fn, images, distinct, step=5, ties="stable")
    torch.testing.assert_close(r.deletion_curve, s.deletion_curve)
    torch.testing.assert_close(r.insertion_curve, s.insertion_curve)


def test_per_sample_seeds_make_tie_orders_independent_of_the_batch():
    """With a (N,) seed tensor a sample's curve is the same alone or in any batch (shards,
    resumed runs), and a constant map still scores as a uniform order in expectation."""
    h, w = 6, 10
    score_fn = _row_weighted_score(h, w)
    images = torch.rand(5, 3, h, w, generator=torch.Generator().manual_seed(0))
    maps = (torch.rand(5, h, w, generator=torch.Generator().manual_seed(1)) * 3).floor()
    seeds = torch.tensor([10, 11, 12, 13, 14])
    full = deletion_insertion(score_fn, images, maps, step=5, seed=seeds)
    part = deletion_insertion(score_fn, images[3:], maps[3:], step=5, seed=seeds[3:])
    torch.testing.assert_close(full.deletion_curve[3:], part.deletion_curve)
    torch.testing.assert_close(full.insertion_curve[3:], part.insertion_curve)
    other = deletion_insertion(score_fn, images, maps, step=5, seed=seeds + 100)
    assert not torch.equal(full.deletion_curve, other.deletion_curve)
    n = 512
    ones = torch.ones(n, 3, 8, 8)
    tied = deletion_insertion(
        _row_weighted_score(8, 8), ones, torch.zeros(n, 8, 8), step=4, seed=torch.arange(n)
    )
    se = float(tied.deletion_auc.std() / math.sqrt(n))
    assert se > 0 and abs(float(tied.deletion_auc.mean()) - 0.5) < 4 * se
    with pytest.raises(FamBenchError, match="one integer per map"):
        deletion_insertion(score_fn, images, maps, seed=torch.zeros(3, dtype=torch.long))


def test_random_tie_order_keeps_the_maps_order_between_values():
    from evaluation.causal import pixel_ranks

    maps = torch.tensor([[[2.0, 1.0, 2.0], [0.0, 1.0, 2.0]]])
    ranks = pixel_ranks(maps, "pixel", torch.Generator().manual_seed(0))[0]
    # The three 2s take ranks 0-2, the two 1s ranks 3-4, the 0 rank 5.
    assert sorted(ranks[[0, 2, 5]].tolist()) == [0, 1, 2]
    assert sorted(ranks[[1, 4]].tolist()) == [3, 4]
    assert ranks[3].item() == 5
    assert pixel_ranks(maps, "stable")[0].tolist() == [0, 3, 1, 5, 4, 2]


def test_a_non_finite_map_gives_nan_for_its_sample_only():
    torch.manual_seed(1)
    model = small_model()
    images = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    score_fn = class_probability(model, torch.tensor([0, 1, 2]))
    bad = maps.clone()
    bad[1] = float("nan")
    bad[2, 0, 0] = float("inf")
    result = deletion_insertion(score_fn, images, bad, step=8)
    clean = deletion_insertion(score_fn, images[:1], maps[:1], step=8)
    assert (
        torch.isnan(result.deletion_auc[1:]).all() and torch.isnan(result.insertion_auc[1:]).all()
    )
    assert torch.isnan(result.deletion_curve[1:]).all()
    torch.testing.assert_close(result.deletion_auc[:1], clean.deletion_auc)
    torch.testing.assert_close(result.insertion_curve[:1], clean.insertion_curve)


def test_maps_sharing_images_give_the_repeated_images_curves_and_score_them_once():
    """Several methods' maps of one image (``image_index``) give exactly the curves of the
    image repeated once per map, while the map-independent points are scored once per
    image: the unperturbed image, the fully deleted one and the blur substrate."""
    h, w, n, m = 6, 10, 3, 4
    score_fn = _row_weighted_score(h, w)
    calls = []

    def counted(x, index):
        calls.append(len(x))
        return score_fn(x, index)

    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(m * n, h, w, generator=torch.Generator().manual_seed(1))
    seeds = torch.arange(n).repeat(m)
    image_index = torch.arange(m * n) % n
    shared = deletion_insertion(
        counted, images, maps, step=7, seed=seeds, image_index=image_index, batch_size=16
    )
    shared_calls = sum(calls)
    calls.clear()
    repeated = deletion_insertion(
        counted, images.repeat(m, 1, 1, 1), maps, step=7, seed=seeds, batch_size=16
    )
    for field in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
        torch.testing.assert_close(getattr(shared, field), getattr(repeated, field), rtol=0, atol=0)
    n_steps = math.ceil(h * w / 7)
    # per map: 2 (n_steps - 1) perturbed points; per image: 3 map-independent points
    assert shared_calls == m * n * 2 * (n_steps - 1) + 3 * n
    assert sum(calls) == m * n * (2 * (n_steps - 1) + 3)
    with pytest.raises(FamBenchError, match="image_index"):
        deletion_insertion(score_fn, images, maps, step=7)
    # no maps of these images: empty curves and not one call (nothing to compare with)
    calls.clear()
    none = deletion_insertion(
        counted, images, maps[:0], step=7, image_index=image_index[:0], batch_size=16
    )
    assert none.deletion_curve.shape == (0, n_steps + 1) and none.insertion_auc.shape == (0,)
    assert sum(calls) == 0


def test_shared_images_change_no_number_with_a_real_network():
    """The same equality with a convolutional network scoring mixed batches (issue 14: the
    de-duplication must not change one number of results.csv)."""
    from experiments.models.conv4 import Conv4

    torch.manual_seed(0)
    model = Conv4(hidden=16, pools=(True, True, False, False)).eval()
    n, m = 4, 3
    reference = torch.randn(n, 16)

    def score_fn(x, index):
        return torch.nn.functional.cosine_similarity(model(x), reference[index], dim=1)

    images, maps = torch.randn(n, 3, 32, 32), torch.rand(m * n, 32, 32)
    image_index = torch.arange(m * n) % n
    shared = deletion_insertion(
        score_fn, images, maps, step=32, seed=image_index, image_index=image_index, batch_size=64
    )
    repeated = deletion_insertion(
        lambda x, i: score_fn(x, i % n), images.repeat(m, 1, 1, 1), maps, step=32,
        seed=image_index, batch_size=64,
    )  # fmt: skip
    assert torch.equal(shared.deletion_curve, repeated.deletion_curve)
    assert torch.equal(shared.insertion_curve, repeated.insertion_curve)


def test_smooth_ties_make_a_constant_map_score_exactly_as_the_random_floor():
    """Issue 25: under ties="smooth" a constant map's tied pixels follow the field the
    ``random`` method draws for the sample, so on a real network the two give the same
    deletion and insertion AUC on every sample (they are the same pixel order); under
    ties="pixel" the constant map's salt-and-pepper order deletes faster than the floor."""
    from baselines.random_map import RandomMap, smooth_tie_field
    from experiments.models.conv4 import Conv4

    torch.manual_seed(0)
    model = Conv4(hidden=16, pools=(True, True, False, False)).eval()
    n = 6
    images = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        reference = model(images) + 0.1 * torch.randn(n, 16)
    seeds = torch.tensor([11, 5, 2**40 + 3, 7, 123456789, 42])

    def score_fn(x, index):
        return torch.nn.functional.cosine_similarity(model(x), reference[index], dim=1)

    random_maps = RandomMap(model)(images, reference, sample_seeds=seeds)
    constant = torch.zeros(n, 32, 32)
    field = smooth_tie_field(model, None, images, seeds)
    # the field is the random method's map itself, at the target layer's resolution (8 x 8)
    assert torch.equal(field, random_maps)
    assert not torch.equal(field[0], field[1])
    kwargs = dict(step=32, ties="smooth", tie_field=field, batch_size=40)
    floor = deletion_insertion(score_fn, images, random_maps, **kwargs)
    tied = deletion_insertion(score_fn, images, constant, **kwargs)
    torch.testing.assert_close(tied.deletion_auc, floor.deletion_auc, rtol=0, atol=1e-6)
    torch.testing.assert_close(tied.insertion_auc, floor.insertion_auc, rtol=0, atol=1e-6)
    pixel = deletion_insertion(score_fn, images, constant, step=32, ties="pixel", seed=seeds)
    assert not torch.allclose(pixel.deletion_auc, floor.deletion_auc, atol=1e-3)


def test_smooth_ties_rank_a_partly_tied_map_by_its_values_first():
    """Outside its ties a map's order is its own; inside, the field's (descending)."""
    from evaluation.causal import pixel_ranks

    maps = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    field = torch.tensor([[[0.0, 0.2, 0.9], [0.1, 0.5, 0.3]]])
    ranks = pixel_ranks(maps, "smooth", tie_field=field)[0].tolist()
    # 1.0 first, 0.5 second; the four zeros by field 0.9, 0.5, 0.3, 0.2
    assert ranks == [0, 5, 2, 1, 3, 4]
    with pytest.raises(FamBenchError, match="tie_field"):
        pixel_ranks(maps, "smooth")
