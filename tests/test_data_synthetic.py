"""SyntheticShapes: determinism, exact masks, learnable classes, no centre prior, pairs."""

import math

import pytest
import torch

from experiments.data import SyntheticShapes, denormalise, shapes
from experiments.data import synthetic as S
from fam.errors import FamBenchError


def test_splits_are_fixed_disjoint_and_shaped_like_miniimagenet():
    splits = {s: S.split_classes(s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [64, 16, 20]
    assert sorted(sum(splits.values(), [])) == list(range(100))
    ds = SyntheticShapes("test", images_per_class=3, seed=9)
    assert ds.class_ids == splits["test"] and len(set(ds.classes)) == 20
    assert ds.labels.tolist() == [c for c in range(20) for _ in range(3)]


def test_same_seed_gives_identical_tensors_and_other_seeds_differ():
    a = SyntheticShapes("train", images_per_class=4, seed=3)
    b = SyntheticShapes("train", images_per_class=4, seed=3)
    c = SyntheticShapes("train", images_per_class=4, seed=4)
    for i in (0, 7, 250):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
        assert not torch.equal(a[i]["image"], c[i]["image"])


def test_an_image_depends_only_on_seed_class_and_index():
    small = SyntheticShapes("val", images_per_class=3, seed=1)
    large = SyntheticShapes("val", images_per_class=8, seed=1)
    # image 2 of split class 5, rendered within different batches
    assert torch.equal(small[5 * 3 + 2]["image"], large[5 * 8 + 2]["image"])
    images, masks = large.render(torch.tensor([5]), torch.tensor([2]))
    assert torch.equal(masks[0], large[5 * 8 + 2]["mask"])


def test_a_batched_fetch_renders_once_and_equals_item_by_item():
    batched = SyntheticShapes("train", images_per_class=5, seed=2)
    single = SyntheticShapes("train", images_per_class=5, seed=2)
    indices = [17, 3, 250, 3, 101]  # a repeat, out of order
    items = batched.__getitems__(indices)
    assert batched.rendered == 4  # each distinct item once, in one render call
    for index, item in zip(indices, items, strict=True):
        alone = single[index]
        assert item["index"] == index and item["label"] == alone["label"]
        assert torch.equal(item["image"], alone["image"])
        assert torch.equal(item["mask"], alone["mask"])
    images = batched.images_at(torch.tensor(indices))
    assert batched.rendered == 4  # served from the cache
    assert torch.equal(images, torch.stack([single[i]["image"] for i in indices]))
    with pytest.raises(IndexError):
        batched.images_at(torch.tensor([len(batched)]))


def test_a_background_swap_keeps_the_object_and_changes_the_background():
    ds = SyntheticShapes("train", images_per_class=5, seed=2, normalise=False)
    indices = torch.tensor([3, 77])
    swapped = ds.images_on_other_backgrounds(indices, torch.tensor([1, 1]))
    again = ds.images_on_other_backgrounds(indices, torch.tensor([1, 2]))
    for row, index in enumerate(indices.tolist()):
        item = ds[index]
        mask = item["mask"]
        assert torch.equal(swapped[row][:, mask], item["image"][:, mask])  # the same object
        assert (swapped[row][:, ~mask] - item["image"][:, ~mask]).abs().mean() > 0.05
    assert torch.equal(swapped[0], again[0]) and not torch.equal(swapped[1], again[1])


def test_mask_is_exactly_the_pixels_the_object_changed():
    ds = SyntheticShapes("train", images_per_class=1, seed=0)
    labels, indices = torch.arange(64), torch.zeros(64, dtype=torch.long)
    with_object, masks = ds.render(labels, indices)
    without, empty = ds.render(labels, indices, with_object=False)
    changed = (with_object != without).any(1)
    assert not empty.any()
    assert not (changed & ~masks).any()  # nothing drawn outside the mask
    # inside the mask every pixel changed unless the object colour equals the background
    assert (masks & ~changed).sum() <= 0.002 * masks.sum()
    assert masks.flatten(1).any(1).all()


def shape_inside(u, v):
    """Inside tests of every shape in local coordinates: ``(...) -> (10, ...)`` bool."""
    return torch.stack([test(u, v) for test in shapes.SHAPE_TESTS])


def test_every_shape_fits_the_unit_disc_and_the_shapes_differ():
    c = torch.linspace(-1.2, 1.2, 121)
    v, u = torch.meshgrid(c, c, indexing="ij")
    inside = shape_inside(u, v)
    assert not (inside & (u * u + v * v > 1)).any()  # pairs rely on this to not overlap
    area = inside.flatten(1).float().sum(1)
    assert (area > 0.1 * area.max()).all()
    # silhouettes are told apart even up to rotation: best IoU over 18 rotations
    best = torch.zeros(10, 10)
    for k in range(18):
        t = 2 * math.pi * k / 18
        cos, sin = math.cos(t), math.sin(t)
        rotated = shape_inside(cos * u + sin * v, -sin * u + cos * v)
        inter = (inside[:, None] & rotated[None]).flatten(2).sum(-1).float()
        union = (inside[:, None] | rotated[None]).flatten(2).sum(-1).float()
        best = torch.maximum(best, inter / union)
    off_diagonal = best[~torch.eye(10, dtype=torch.bool)]
    assert off_diagonal.max() < 0.9


def test_appearances_are_told_apart_by_object_colour_statistics():
    ds = SyntheticShapes("train", images_per_class=12, seed=2)
    images, masks = ds.render(ds.labels, torch.arange(len(ds)) % 12)  # [0, 1] images
    feats = []
    for image, mask in zip(images, masks, strict=True):
        pixels = image[:, mask]
        feats.append(torch.cat([pixels.mean(1), pixels.std(1)]))
    feats = torch.stack(feats)
    appearance = torch.tensor(ds.class_ids)[ds.labels] % 10
    half = torch.arange(len(feats)) % 12 < 6  # fit centroids on half, test on half
    centroids = torch.stack([feats[half & (appearance == a)].mean(0) for a in range(10)])
    pred = torch.cdist(feats[~half], centroids).argmin(1)
    assert (pred == appearance[~half]).float().mean() > 0.85


def test_objects_are_large_and_spread_over_the_canvas():
    ds = SyntheticShapes("train", images_per_class=25, seed=0)
    n = 25 * 64
    _, masks = ds.render(ds.labels, torch.arange(n) % 25)
    mean_mask = masks.float().mean(0)
    # a centre prior earns little: the centre is barely more often covered than average
    assert mean_mask[12:20, 12:20].mean() < 1.25 * mean_mask.mean()
    quadrants = [masks[:, :16, :16], masks[:, :16, 16:], masks[:, 16:, :16], masks[:, 16:, 16:]]
    touched = torch.stack([q.flatten(1).any(1).float().mean() for q in quadrants])
    assert touched.min() > 0.8 * touched.max()
    rows, cols = masks.any(2).float(), masks.any(1).float()
    ramp = torch.arange(32)

    def span(occupied):
        return (occupied * ramp).amax(1) - torch.where(occupied > 0, ramp, 99).amin(1) + 1

    extent = torch.maximum(span(rows), span(cols)).float() / 32
    assert 0.3 < extent.median() < 0.6 and extent.min() > 0.1


def test_raw_images_are_in_unit_range_and_normalisation_inverts():
    raw = SyntheticShapes("val", images_per_class=2, seed=0, normalise=False)
    norm = SyntheticShapes("val", images_per_class=2, seed=0)
    x, y = raw[3]["image"], norm[3]["image"]
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(denormalise(y, norm.mean, norm.std), x, atol=1e-6)


def test_image_size_is_configurable():
    item = SyntheticShapes("test", image_size=48, images_per_class=1)[0]
    assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (48, 48)


def test_pairs_are_deterministic_disjoint_and_exact():
    ds = SyntheticShapes("test", images_per_class=2, seed=1, mode="pairs")
    p = ds.pair(3, 7, key=11)
    q = SyntheticShapes("test", images_per_class=5, seed=1, mode="pairs").pair(3, 7, key=11)
    assert torch.equal(p["image"], q["image"]) and torch.equal(p["mask"], q["mask"])
    assert (p["label"], p["other_label"]) == (3, 7)
    assert not torch.equal(ds.pair(3, 7, key=12)["image"], p["image"])
    a = torch.arange(20)
    out = ds.pairs(a, (a + 1) % 20, torch.arange(20))
    assert out["image"].shape == (20, 3, 32, 32)
    assert not (out["mask"] & out["other_mask"]).any()
    assert out["mask"].flatten(1).any(1).all() and out["other_mask"].flatten(1).any(1).all()
    # the batched call renders each pair as the single call does
    single = ds.pair(5, 6, key=5)
    assert torch.equal(out["image"][5], single["image"])
    assert torch.equal(out["other_mask"][5], single["other_mask"])


def test_pair_objects_are_the_pixels_they_changed_and_smaller_than_singles():
    a, b = torch.tensor([0, 10, 20, 35]), torch.tensor([55, 66, 77, 99])
    draws = torch.rand(4, shapes.PAIR_DRAWS, generator=torch.Generator().manual_seed(0))
    images, mask_a, mask_b = shapes.render_pairs(a, b, draws, 32)
    start = 2 * shapes.OBJECT_DRAWS
    background = shapes.render_background(draws[:, start : start + shapes.BACKGROUND_DRAWS], 32)
    changed = (images != background).any(1)
    assert not (changed & ~(mask_a | mask_b)).any()
    assert (changed == (mask_a | mask_b)).float().mean() > 0.998
    ds = SyntheticShapes("train", images_per_class=10, seed=0, mode="pairs")
    single_area = torch.stack([ds[i]["mask"] for i in range(0, 640, 7)]).float().mean()
    pairs = ds.pairs(torch.arange(32), torch.arange(32, 64), torch.arange(32))
    assert pairs["mask"].float().mean() < 0.8 * single_area


def test_pairs_need_pairs_mode_and_two_classes():
    with pytest.raises(FamBenchError, match="mode='pairs'"):
        SyntheticShapes("test", images_per_class=1).pair(0, 1, 0)
    with pytest.raises(FamBenchError, match="two different classes"):
        SyntheticShapes("test", images_per_class=1, mode="pairs").pair(2, 2, 0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(FamBenchError, match="splits 'train', 'val' and 'test'"):
        SyntheticShapes("validation")
    with pytest.raises(FamBenchError, match="mode must be"):
        SyntheticShapes("train", mode="pair")


def test_a_subset_maps_every_batched_fetch_to_its_own_items():
    """The holdout Subset (contrastive queries and bank) must hand out its items, not the
    dataset's items at the subset's positions, through every batched path."""
    from experiments.embedding import gather
    from experiments.tasks.base import stack_items
    from experiments.tasks.neighbour.holdout import Subset

    ds = SyntheticShapes("train", images_per_class=6, seed=4)
    subset = Subset(ds, torch.tensor([5, 11, 40, 3]))
    expected = torch.stack([ds[i]["image"] for i in (5, 11, 40, 3)])
    assert torch.equal(gather(subset, [0, 1, 2, 3]), expected)
    images, masks, labels = stack_items(subset, [2, 0], torch.device("cpu"))
    assert torch.equal(images, expected[[2, 0]]) and labels == [ds[40]["label"], ds[5]["label"]]
    assert torch.equal(masks[0], ds[40]["mask"])
    assert subset.labels.tolist() == [ds[i]["label"] for i in (5, 11, 40, 3)]
    swapped = subset.images_on_other_backgrounds(torch.tensor([1]), torch.tensor([7]))
    assert torch.equal(
        swapped, ds.images_on_other_backgrounds(torch.tensor([11]), torch.tensor([7]))
    )
    with pytest.raises(AttributeError, match="not passed through"):
        subset.render  # noqa: B018  (an unmapped per-item method)
