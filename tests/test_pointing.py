"""Pointing game and energy pointing game: hand-made cases and TorchRay's protocol."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation import (
    annotation_tolerance,
    boxes_to_masks,
    energy_pointing_game,
    pointing_game,
    tight_boxes,
)
from fam.errors import FamBenchError


def single(h: int, w: int, *pixels: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    for y, x in pixels:
        mask[0, y, x] = True
    return mask


def torchray_pointing(saliency: torch.Tensor, mask: torch.Tensor, tolerance: float) -> float:
    """TorchRay's PointingGame.evaluate with the point from argmax over the flat map."""
    if mask.sum() == 0:
        return math.nan
    flat = int(torch.argmax(saliency.reshape(-1)))
    y, x = divmod(flat, saliency.shape[1])
    v, u = torch.meshgrid(
        (torch.arange(mask.shape[0]) - y) ** 2,
        (torch.arange(mask.shape[1]) - x) ** 2,
        indexing="ij",
    )
    accept = (v + u) < tolerance**2
    return 1.0 if bool((mask & accept).any()) else 0.0


def test_ties_pick_the_first_maximum_in_row_major_order():
    saliency = torch.zeros(1, 5, 5)
    saliency[0, 1, 2] = saliency[0, 3, 0] = 1.0
    assert pointing_game(saliency, single(5, 5, (1, 2)), tolerance=1.0).item() == 1.0
    assert pointing_game(saliency, single(5, 5, (3, 0)), tolerance=1.0).item() == 0.0


def test_a_constant_map_points_at_the_first_pixel():
    saliency = torch.full((1, 6, 6), 0.5)
    assert pointing_game(saliency, single(6, 6, (0, 1)), tolerance=1.5).item() == 1.0
    assert pointing_game(saliency, single(6, 6, (4, 4)), tolerance=1.5).item() == 0.0


def test_an_empty_mask_is_not_scored():
    hits = pointing_game(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    assert torch.isnan(hits).all()
    energy = energy_pointing_game(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    assert torch.isnan(energy).all()


@pytest.mark.parametrize(("target", "distance"), [((5, 8), 3.0), ((8, 9), 5.0)])
def test_distance_equal_to_the_tolerance_is_a_miss_and_just_under_a_hit(target, distance):
    saliency = torch.zeros(1, 12, 12)
    saliency[0, 5, 5] = 1.0
    mask = single(12, 12, target)
    assert pointing_game(saliency, mask, tolerance=distance).item() == 0.0
    assert pointing_game(saliency, mask, tolerance=distance + 1e-3).item() == 1.0


def test_non_square_images_are_indexed_y_then_x():
    saliency = torch.zeros(1, 6, 10)
    saliency[0, 4, 2] = 1.0
    assert pointing_game(saliency, single(6, 10, (4, 2)), tolerance=0.5).item() == 1.0
    assert pointing_game(saliency, single(6, 10, (2, 4)), tolerance=0.5).item() == 0.0
    weights = torch.zeros(1, 6, 10)
    weights[0, 0, 9] = 3.0
    weights[0, 5, 0] = 1.0
    energy = energy_pointing_game(weights, single(6, 10, (0, 9), (1, 9)))
    assert energy.item() == pytest.approx(0.75)


def test_agrees_with_torchray_on_random_maps_and_masks():
    torch.manual_seed(0)
    n, h, w = 40, 14, 23
    saliency = (torch.rand(n, h, w) * 4).floor()  # ties on purpose
    masks = torch.rand(n, h, w) > 0.97
    masks[:3] = False
    for tolerance in (0.0, 1.0, 2.5, 6.0):
        hits = pointing_game(saliency, masks, tolerance=tolerance)
        expected = torch.tensor(
            [torchray_pointing(saliency[i], masks[i], tolerance) for i in range(n)]
        )
        torch.testing.assert_close(hits, expected, equal_nan=True)
    assert pointing_game(saliency, masks).isnan().sum() == 3


def test_boxes_give_the_same_result_as_the_equivalent_masks():
    torch.manual_seed(1)
    n, h, w = 30, 12, 17
    saliency = torch.rand(n, h, w)
    x0 = torch.randint(-3, w, (n,))
    y0 = torch.randint(-3, h, (n,))
    boxes = torch.stack(
        [x0, y0, x0 + torch.randint(0, 8, (n,)), y0 + torch.randint(0, 8, (n,))], dim=1
    )
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (a, b, c, d) in enumerate(boxes.tolist()):
        masks[i, max(b, 0) : max(d, 0), max(a, 0) : max(c, 0)] = True  # half-open, clipped
    torch.testing.assert_close(boxes_to_masks(boxes, (h, w)), masks)
    for tolerance in (1.0, 3.0):
        torch.testing.assert_close(
            pointing_game(saliency, boxes, tolerance),
            pointing_game(saliency, masks, tolerance),
            equal_nan=True,
        )
    torch.testing.assert_close(
        energy_pointing_game(saliency, boxes), energy_pointing_game(saliency, masks), equal_nan=True
    )
    # Fractional boxes cover the integer pixels x0 <= x < x1.
    frac = boxes_to_masks(torch.tensor([[0.5, 1.0, 2.0, 2.5]]), (4, 4))
    assert frac[0].nonzero().tolist() == [[1, 1], [2, 1]]


def test_energy_is_the_share_of_mass_inside_the_mask():
    weights = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, True]], [[True, False], [False, False]]])
    energy = energy_pointing_game(weights, masks, region="mask")
    assert energy[0].item() == pytest.approx(0.5)
    assert math.isnan(energy[1].item())  # zero map: nothing to share
    with pytest.raises(FamBenchError, match="non-negative"):
        energy_pointing_game(-weights, masks)


def test_bad_ground_truth_shapes_raise_clear_errors():
    with pytest.raises(FamBenchError, match="does not fit"):
        pointing_game(torch.rand(2, 5, 5), torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(FamBenchError, match="tolerance"):
        pointing_game(torch.rand(1, 5, 5), torch.ones(1, 5, 5, dtype=torch.bool), tolerance=-1)


def test_energy_in_the_box_counts_the_masks_tight_bounding_box():
    """Score-CAM's definition: mass inside the bounding box. An L-shaped mask's tight
    box is the 2x2 square, so the pixel the mask misses counts in the box."""
    weights = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 10.0]]])
    masks = torch.tensor([[[True, True, False], [True, False, False], [False] * 3]])
    # box: (1 + 2 + 3 + 4) / 20 = 0.5; mask: (1 + 2 + 3) / 20 = 0.3
    assert energy_pointing_game(weights, masks).item() == pytest.approx(0.5)
    assert energy_pointing_game(weights, masks, region="box").item() == pytest.approx(0.5)
    assert energy_pointing_game(weights, masks, region="mask").item() == pytest.approx(0.3)
    # Given boxes (e.g. a dataset's annotated boxes) are used as they are: x0, y0, x1, y1.
    boxes = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    assert energy_pointing_game(weights, masks, boxes=boxes).item() == pytest.approx(0.5)
    assert energy_pointing_game(weights, boxes).item() == pytest.approx(0.5)
    with pytest.raises(FamBenchError, match="region must be"):
        energy_pointing_game(weights, masks, region="circle")


def test_tight_boxes_of_masks():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[0, 4, 6] = True
    assert tight_boxes(masks).tolist() == [[2, 1, 7, 5], [0, 0, 0, 0]]
    box = torch.zeros(6, 8, dtype=torch.bool)
    box[1:5, 2:7] = True
    assert torch.equal(boxes_to_masks(tight_boxes(masks), (6, 8))[0], box)


def test_pointing_takes_one_tolerance_per_sample():
    saliency = torch.zeros(2, 10, 10)
    saliency[:, 0, 0] = 1.0
    masks = single(10, 10, (0, 5)).expand(2, 10, 10)
    # Distance 5: a hit with tolerance 6, a miss with tolerance 5 (strict <).
    hits = pointing_game(saliency, masks, tolerance=torch.tensor([6.0, 5.0]))
    assert hits.tolist() == [1.0, 0.0]
    with pytest.raises(FamBenchError, match="one value per sample"):
        pointing_game(saliency, masks, tolerance=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(FamBenchError, match=">= 0"):
        pointing_game(saliency, masks, tolerance=torch.tensor([1.0, -2.0]))


def test_annotation_tolerance_converts_15_px_to_each_images_input_pixels():
    # 448x448 original resized to 224x224: 15 px there are 7.5 input px; 112x112 -> 30 px;
    # 300x200 -> sqrt(224*224 / (300*200)) * 15.
    sizes = torch.tensor([[448, 448], [112, 112], [300, 200]])
    tol = annotation_tolerance(15.0, sizes, (224, 224))
    expected = [7.5, 30.0, 15.0 * math.sqrt(224 * 224 / 60000)]
    assert tol.tolist() == pytest.approx(expected)


def test_a_non_finite_map_is_not_scored_and_others_are():
    saliency = torch.rand(3, 6, 6)
    saliency[1, 2, 2] = float("nan")
    saliency[2] = float("inf")
    masks = torch.ones(3, 6, 6, dtype=torch.bool)
    hits = pointing_game(saliency, masks, tolerance=1.0)
    assert hits[0].item() == 1.0 and torch.isnan(hits[1:]).all()
    energy = energy_pointing_game(saliency, masks, region="mask")
    assert energy[0].item() == pytest.approx(1.0) and torch.isnan(energy[1:]).all()
    assert int(torch.isnan(hits).sum()) == 2
