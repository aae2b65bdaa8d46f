"""Average Drop / Increase in Confidence, and the model-randomisation sanity check."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torchvision.models import resnet18

from evaluation import confidence_change, randomisation_sanity, spearman
from evaluation.sanity import default_cascade
from experiments.models.conv4 import Conv4
from fam import FAM
from fam.errors import FamBenchError


def test_confidence_change_matches_hand_computed_values():
    images = torch.stack(
        [torch.full((3, 2, 2), 2.0), torch.full((3, 2, 2), 2.0), torch.zeros(3, 2, 2)]
    )
    maps = torch.tensor([[[1.0, 1.0], [0.5, 0.5]]] * 3)

    def score_fn(batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        mean = batch.mean(dim=(1, 2, 3))
        # Sample 1's score rises when the image darkens.
        return torch.where(index == 1, 10.0 - mean, mean)

    result = confidence_change(score_fn, images, maps, batch_size=4)
    # Y = 2, O = 2 * 0.75 = 1.5 -> drop 25 %; Y = 8, O = 8.5 -> increase; Y = 0 -> undefined.
    torch.testing.assert_close(result.score, torch.tensor([2.0, 8.0, 0.0]))
    torch.testing.assert_close(result.explanation_score, torch.tensor([1.5, 8.5, 0.0]))
    assert result.drop[0].item() == pytest.approx(25.0)
    assert result.drop[1].item() == 0.0
    assert math.isnan(result.drop[2].item())
    torch.testing.assert_close(result.increase, torch.tensor([0.0, 100.0, 0.0]))


def test_confidence_change_in_image_space_multiplies_the_original_image():
    """Grad-CAM++'s definition: de-normalise, multiply by the map, re-normalise.

    One channel, mean 0.5, std 0.25; normalised pixel z = 2 is x = 2 * 0.25 + 0.5 = 1.0.
    With map value 0.5: image space gives x * 0.5 = 0.5, back to z = (0.5 - 0.5) / 0.25 = 0;
    normalised space gives z * 0.5 = 1. The score is the mean normalised pixel + 1.
    """
    images = torch.full((1, 1, 2, 2), 2.0)
    maps = torch.full((1, 2, 2), 0.5)

    def score_fn(batch, index):
        return batch.mean(dim=(1, 2, 3)) + 1.0

    image = confidence_change(score_fn, images, maps, space="image", mean=[0.5], std=[0.25])
    normalised = confidence_change(score_fn, images, maps, space="normalised")
    # Y = 3; O = 0 + 1 = 1 (image space) -> drop (3 - 1) / 3 = 66.67 %; O = 2 -> 33.33 %.
    torch.testing.assert_close(image.explanation_score, torch.tensor([1.0]))
    torch.testing.assert_close(normalised.explanation_score, torch.tensor([2.0]))
    assert image.drop.item() == pytest.approx(200 / 3)
    assert normalised.drop.item() == pytest.approx(100 / 3)
    # A map of ones leaves the image unchanged in both spaces.
    ones = confidence_change(
        score_fn, images, torch.ones(1, 2, 2), space="image", mean=[0.5], std=[0.25]
    )
    torch.testing.assert_close(ones.explanation_score, ones.score)
    with pytest.raises(FamBenchError, match="mean= and std="):
        confidence_change(score_fn, images, maps, space="image")
    with pytest.raises(FamBenchError, match="one value per channel"):
        confidence_change(score_fn, images, maps, space="image", mean=[0, 0], std=[1, 1])
    with pytest.raises(FamBenchError, match="space must be one of"):
        confidence_change(score_fn, images, maps, space="pixels")


def test_confidence_change_gives_nan_for_a_non_finite_map_only():
    images = torch.rand(3, 3, 4, 4) + 0.1
    maps = torch.rand(3, 4, 4)
    bad = maps.clone()
    bad[1] = float("nan")

    def score_fn(batch, index):
        return batch.mean(dim=(1, 2, 3))

    result = confidence_change(score_fn, images, bad)
    clean = confidence_change(score_fn, images, maps)
    assert math.isnan(result.drop[1].item()) and math.isnan(result.increase[1].item())
    torch.testing.assert_close(result.drop[[0, 2]], clean.drop[[0, 2]])
    torch.testing.assert_close(result.increase[[0, 2]], clean.increase[[0, 2]])


def test_confidence_change_rejects_negative_scores_and_maps_outside_0_1():
    images, maps = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(FamBenchError, match="non-negative score"):
        confidence_change(lambda x, i: x.mean(dim=(1, 2, 3)) - 5.0, images, maps)
    with pytest.raises(FamBenchError, match=r"\[0, 1\]"):
        confidence_change(lambda x, i: x.mean(dim=(1, 2, 3)), images, maps * 2)


def test_spearman_is_nan_for_a_non_finite_row_only():
    a = torch.rand(3, 10)
    b = torch.rand(3, 10)
    bad = a.clone()
    bad[1, 4] = float("nan")
    bad[2, 0] = float("inf")
    rho = spearman(bad, b)
    assert torch.isnan(rho[1:]).all()
    assert rho[0].item() == pytest.approx(spearmanr(a[0], b[0]).statistic, abs=1e-6)


def test_spearman_matches_scipy_with_ties():
    torch.manual_seed(0)
    a = (torch.rand(6, 5, 7) * 5).floor()
    b = a + (torch.rand(6, 5, 7) * 3).floor()
    ours = spearman(a, b)
    for i in range(6):
        expected = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(spearman(torch.ones(1, 4), torch.rand(1, 4)).item())


def test_default_cascade_runs_from_the_output_towards_the_input():
    assert default_cascade(Conv4(hidden=4)) == ["encoder.3", "encoder.2", "encoder.1", "encoder.0"]
    layers = default_cascade(nn.Sequential(resnet18(weights=None)))
    assert layers[:3] == ["0.fc", "0.layer4.1", "0.layer4.0"]
    assert layers[-2:] == ["0.bn1", "0.conv1"]


def small_setup():
    torch.manual_seed(0)
    model = Conv4(hidden=16, pools=(True, True, False, False)).eval()
    images, others = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    return model, images, others


def test_a_map_that_ignores_the_model_stays_perfectly_correlated():
    model, images, others = small_setup()
    fixed = torch.rand(4, 32, 32)
    result = randomisation_sanity(
        model, lambda m: lambda x, r, s: fixed, images, reference=lambda m: m(others)
    )
    assert result.layers == ["encoder.3", "encoder.2", "encoder.1", "encoder.0"]
    assert result.spearman.shape == (4, 4)
    torch.testing.assert_close(result.spearman, torch.ones(4, 4))
    frame = result.to_frame()
    assert len(frame) == 16 and set(frame["layer"]) == set(result.layers)


def test_fam_decorrelates_when_the_top_layers_are_randomised_and_the_model_is_untouched():
    model, images, others = small_setup()
    model.train()  # the reference callable and the explainers must not touch BN statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    result = randomisation_sanity(
        model,
        functools.partial(FAM, target_layer="encoder.3"),
        images,
        reference=lambda m: m(others),
        similarity="cosine",
    )
    # Randomising the top blocks moves FAM's maps away from the trained model's maps (a
    # model-independent map stays at 1, test above). Observed 0.4-0.65 over seeds.
    assert result.spearman[:2].mean(dim=1).max() < 0.8
    assert (result.spearman < 0.95).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and model.encoder[0][1].training
    assert torch.equal(rng_before, torch.random.get_rng_state())
    # Deterministic under the seed.
    again = randomisation_sanity(
        model,
        functools.partial(FAM, target_layer="encoder.3"),
        images,
        reference=lambda m: m(others),
        layers=["encoder.3"],
    )
    torch.testing.assert_close(again.spearman[0], result.spearman[0], equal_nan=True)


def test_sanity_rejects_unknown_layers():
    model, images, others = small_setup()
    with pytest.raises(FamBenchError, match="Unknown layers"):
        randomisation_sanity(
            model,
            functools.partial(FAM, target_layer="encoder.3"),
            images,
            reference=others,
            layers=["encoder.9"],
        )


def test_confidence_with_shared_images_scores_each_image_once_and_changes_nothing():
    from evaluation.confidence import confidence_change as change

    n, m = 3, 4
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    maps = torch.rand(m * n, 8, 8, generator=gen)
    weights = torch.rand(n, 3, 8, 8, generator=gen)
    seen = []

    def score(x, index):
        seen.append(len(x))
        return (x * weights[index]).flatten(1).sum(1).clamp_min(0)

    index = torch.arange(m * n) % n
    shared = change(score, images, maps, batch_size=5, image_index=index)
    assert sum(seen) == n + m * n  # the unperturbed images once, not once per map
    repeated = change(lambda x, i: score(x, i % n), images.repeat(m, 1, 1, 1), maps, batch_size=5)
    for field in ("drop", "increase", "score", "explanation_score"):
        assert torch.equal(getattr(shared, field), getattr(repeated, field))
