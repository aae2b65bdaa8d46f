"""On-disk format readers: each reads a tiny dataset written in its format, recovers labels,
pixels and boxes/masks, and rejects a broken copy with the one-paragraph error."""

import pickle
import shutil

import numpy as np
import pytest
import torch
from format_writers import (
    cars_box,
    colour,
    cub_box,
    manifest_box,
    write_cars196,
    write_cifar10,
    write_class_folders,
    write_cub,
    write_imagefolder,
    write_manifest,
    write_miniimagenet,
    write_miniimagenet_pickle,
    write_sop,
    write_stl10,
)

from experiments.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, denormalise
from experiments.data.formats import cifar10
from fam.errors import FamBenchError


def fill(item) -> tuple[int, int, int]:
    """The colour of a uniformly filled raw [0, 1] image, as 0..255 ints."""
    return tuple(int(v) for v in (item["image"].mean((1, 2)) * 255).round().tolist())


def assert_dataset_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "Expected layout" in message and "Get it from" in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    out = {
        "mini": write_miniimagenet(base / "mini", (3, 2, 3), images_per_class=4),
        "pickle": write_miniimagenet_pickle(base / "pickle", (3, 2, 3), images_per_class=4),
        "tiered": write_imagefolder(base / "tiered", n_classes=3, images_per_class=2),
        "cub": write_cub(base / "cub", n_classes=8, images_per_class=2, width=40, height=20),
        "cifar": write_cifar10(base / "cifar", images_per_class=1),
        "stl": write_stl10(base / "stl", unlabeled=3),
    }
    write_sop(base / "sop", n_classes=6, images_per_class=2)
    write_cars196(base / "cars", n_classes=4, images_per_class=2, width=40, height=20)
    return base, out


def copy(roots, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(roots[0] / name, target)
    return target


# miniImageNet -------------------------------------------------------------------------------


def test_miniimagenet_csv_reads_classes_labels_and_pixels(roots):
    base, out = roots
    ds = build_dataset("miniimagenet", base / "mini", "test", 8, normalise=False)
    assert ds.classes == out["mini"]["test"] and not ds.has_masks
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    item = ds[4 * 2 + 3]  # image 3 of the third test class (global class 7)
    assert item["image"].shape == (3, 8, 8) and item["label"] == 2 and item["index"] == 11
    assert fill(item) == colour(7, 3)


def test_miniimagenet_pickle_uses_class_dict_not_order(roots):
    base, out = roots
    ds = build_dataset("miniimagenet", base / "pickle", "val", 16, normalise=False)
    assert ds.classes == out["pickle"]["val"]
    assert ds.labels.tolist() == [0, 1] * 4  # images interleaved by the writer
    assert fill(ds[5]) == colour(4, 2)  # index 5 = image 2 of global class 4


def test_miniimagenet_normalises_with_imagenet_statistics(roots):
    base, _ = roots
    raw = build_dataset("miniimagenet", base / "mini", "train", 16, normalise=False)[0]
    norm = build_dataset("miniimagenet", base / "mini", "train", 16)
    assert (norm.mean, norm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(
        denormalise(norm[0]["image"], norm.mean, norm.std), raw["image"], atol=1e-6
    )


def test_miniimagenet_rejects_a_malformed_csv(roots, tmp_path):
    root = copy(roots, "mini", tmp_path)
    (root / "val.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("miniimagenet", root, "val", 8)
    assert_dataset_error(excinfo, str(root / "val.csv"), "'filename,label'", "meta-learning-lstm")


def test_miniimagenet_rejects_a_missing_image_and_a_missing_split(roots, tmp_path):
    root = copy(roots, "mini", tmp_path)
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("miniimagenet", root, "train", 8)
    assert_dataset_error(excinfo, str(victim), "does not exist")
    (root / "test.csv").unlink()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("miniimagenet", root, "test", 8)
    assert_dataset_error(excinfo, "test.csv", "mini-imagenet-cache-test.pkl")


def test_miniimagenet_rejects_a_pickle_without_class_dict(roots, tmp_path):
    root = copy(roots, "pickle", tmp_path)
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as handle:
        pickle.dump({"image_data": np.zeros((2, 8, 8, 3), np.uint8)}, handle)
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("miniimagenet", root, "train", 8, source="pickle")
    assert_dataset_error(excinfo, "'class_dict'")


# tieredImageNet / image folders ------------------------------------------------------------


def test_tieredimagenet_reads_split_folders(roots):
    base, out = roots
    ds = build_dataset("tieredimagenet", base / "tiered", "val", 8, normalise=False)
    assert ds.classes == out["tiered"]["val"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert fill(ds[3]) == colour(1, 1)


def test_imagefolder_rejects_missing_split_and_empty_class(roots, tmp_path):
    root = copy(roots, "tiered", tmp_path)
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("imagefolder", root, "extra", 8)
    assert_dataset_error(excinfo, str(root / "extra"))
    (root / "train" / "zzz_empty").mkdir()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("tieredimagenet", root, "train", 8)
    assert_dataset_error(excinfo, "zzz_empty", "holds no image files", "renmengye")


def test_a_corrupt_image_names_the_file(roots, tmp_path):
    root = copy(roots, "tiered", tmp_path)
    victim = root / "test" / "test_class1" / "img0.png"
    victim.write_bytes(b"not an image")
    ds = build_dataset("imagefolder", root, "test", 8)
    with pytest.raises(FamBenchError, match="img0.png"):
        ds[2]


# CUB-200-2011 -------------------------------------------------------------------------------


def expected_box_mask(box, size_x_scale, rows, cols):
    x, y, w, h = box
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[y : y + h, int(x * size_x_scale) : int((x + w) * size_x_scale)] = True
    return mask


def test_cub_fewshot_retrieval_and_official_splits(roots):
    cub = roots[1]["cub"]
    names = {s: build_dataset("cub", cub, s, 8).classes for s in ("train", "val", "test")}
    number = {s: [int(n[:3]) for n in v] for s, v in names.items()}
    assert number == {"train": [1, 3, 5, 7], "val": [2, 6], "test": [4, 8]}
    retrieval = {
        s: build_dataset("cub", cub, s, 8, protocol="retrieval").classes for s in ("train", "test")
    }
    assert [int(n[:3]) for n in retrieval["test"]] == [5, 6, 7, 8]
    official = build_dataset("cub", cub, "train", 8, protocol="official")
    assert len(official) == 8 and official.labels.tolist() == list(range(8))


def test_cub_box_comes_back_as_the_right_mask(roots):
    # images are 40 x 20 and come out 20 x 20: columns halve, rows stay
    ds = build_dataset("cub", roots[1]["cub"], "test", 20, masks="box", normalise=False)
    assert ds.has_masks
    for index, image_id in enumerate([7, 8, 15, 16]):  # images of classes 4 and 8
        item = ds[index]
        assert torch.equal(item["mask"], expected_box_mask(cub_box(image_id), 0.5, 20, 20))
        # the white box drawn in the image lies inside the mask
        white = (item["image"] > 0.99).all(0)
        assert white.any() and not (white & ~item["mask"]).any()


def test_cub_uses_segmentations_when_present(roots):
    ds = build_dataset("cub", roots[1]["cub"], "val", 20)  # masks="auto"
    x, y, w, h = cub_box(3)  # image 3 is class 2's first
    assert torch.equal(ds[0]["mask"], expected_box_mask((x, y, w // 2, h), 0.5, 20, 20))


def test_cub_rejects_missing_and_malformed_files(roots, tmp_path):
    root = copy(roots, "cub", tmp_path) / "CUB_200_2011"
    with pytest.raises(FamBenchError, match="splits 'train', 'test'"):
        build_dataset("cub", root, "val", 8, protocol="retrieval")
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    (root / "bounding_boxes.txt").write_text("\n".join(lines[:3] + ["4 1.0 2.0"] + lines[4:]))
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("cub", root, "train", 8)
    assert_dataset_error(excinfo, "bounding_boxes.txt", "caltech")
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("cub", root.parent, "train", 8)
    assert_dataset_error(excinfo, "bounding_boxes.txt is missing")


# CIFAR-10 and STL-10 ------------------------------------------------------------------------


def test_cifar10_recovers_pixels_labels_and_its_own_statistics(roots):
    base, out = roots
    for split in ("train", "test"):
        ds = build_dataset("cifar10", base / "cifar", split, 32, normalise=False)
        assert ds.labels.tolist() == out["cifar"][f"{split}_labels"].tolist()
        for i in (0, len(ds) - 1):
            pixels = (ds[i]["image"] * 255).round().to(torch.uint8).permute(1, 2, 0)
            assert torch.equal(pixels, torch.from_numpy(out["cifar"][split][i]))
    assert len(build_dataset("cifar10", base / "cifar", "train", 32)) == 50
    assert build_dataset("cifar10", base / "cifar", "test", 16).mean == cifar10.MEAN


def test_cifar10_rejects_a_missing_batch(roots, tmp_path):
    root = copy(roots, "cifar", tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("cifar10", root, "train", 32)
    assert_dataset_error(excinfo, "data_batch_3", "cs.toronto.edu")


def test_stl10_reads_the_column_major_layout(roots):
    base, out = roots
    ds = build_dataset("stl10", base / "stl", "test", 96, normalise=False)
    assert ds.labels.tolist() == out["stl"]["test_labels"].tolist()
    pixels = (ds[4]["image"] * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(pixels, torch.from_numpy(out["stl"]["test"][4]))  # corner not transposed
    both = build_dataset("stl10", base / "stl", "train+unlabeled", 24)
    assert len(both) == 13 and both.labels[-3:].tolist() == [-1, -1, -1]
    assert both[12]["image"].shape == (3, 24, 24)


def test_stl10_rejects_a_truncated_file(roots, tmp_path):
    root = copy(roots, "stl", tmp_path)
    data = root / "stl10_binary" / "train_X.bin"
    data.write_bytes(data.read_bytes()[:-5])
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("stl10", root, "train", 96)
    assert_dataset_error(excinfo, "not a multiple of one image", "stl10")


# Stanford Online Products and Cars196 ------------------------------------------------------


def test_sop_reads_the_listing(roots):
    base, _ = roots
    ds = build_dataset("sop", base / "sop", "test", 8, normalise=False)
    assert ds.classes == ["4", "5", "6"] and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert fill(ds[3]) == colour(4, 1)


def test_sop_rejects_a_malformed_listing(roots, tmp_path):
    root = copy(roots, "sop", tmp_path)
    (root / "Ebay_train.txt").write_text("image_id class_id path\n1 1 a.JPG\n")
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("sop", root, "train", 8)
    assert_dataset_error(excinfo, "Ebay_train.txt", "super_class_id", "lifted_struct")


def test_cars196_splits_and_box_masks(roots):
    base, _ = roots
    train = build_dataset("cars196", base / "cars", "train", 40, normalise=False)
    test = build_dataset("cars196", base / "cars", "test", 40)
    assert train.classes == ["Car 1", "Car 2"] and test.classes == ["Car 3", "Car 4"]
    official = build_dataset("cars196", base / "cars", "test", 40, protocol="official")
    assert len(official) == 4 and official.labels.tolist() == [0, 1, 2, 3]
    # images are 40 x 20 and come out 40 x 40: rows double, columns stay
    for n in range(4):
        x1, y1, x2, y2 = cars_box(n)
        expected = torch.zeros(40, 40, dtype=torch.bool)
        expected[2 * (y1 - 1) : 2 * y2, x1 - 1 : x2] = True
        assert torch.equal(train[n]["mask"], expected)


def test_cars196_rejects_missing_annotations(roots, tmp_path):
    root = copy(roots, "cars", tmp_path)
    (root / "cars_annos.mat").unlink()
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("cars196", root, "train", 8)
    assert_dataset_error(excinfo, "cars_annos.mat is missing", "jkrause")


# factory ------------------------------------------------------------------------------------


def test_build_dataset_rejects_unknown_names_options_and_missing_root(roots):
    with pytest.raises(FamBenchError, match="choose one of"):
        build_dataset("imagenet", "/data", "train", 32)
    with pytest.raises(FamBenchError, match="accepts normalise, protocol, masks"):
        build_dataset("cub", roots[1]["cub"], "train", 32, segmentation=True)
    with pytest.raises(FamBenchError, match="set data.root"):
        build_dataset("sop", None, "train", 32)
    synthetic = build_dataset("synthetic", None, "val", 16, images_per_class=2, seed=4)
    assert synthetic[1]["image"].shape == (3, 16, 16) and synthetic.has_masks


# your own data: one-level image folders ------------------------------------------------------


def test_imagefolder_class_folders_get_a_seeded_disjoint_class_split(tmp_path):
    names = write_class_folders(tmp_path, n_classes=10, images_per_class=2)
    parts = {
        s: build_dataset("imagefolder", tmp_path, s, 8, normalise=False)
        for s in ("train", "val", "test")
    }
    assert [len(parts[s].classes) for s in parts] == [6, 2, 2]  # 0.6 / 0.2 / 0.2
    assert sorted(sum((parts[s].classes for s in parts), [])) == sorted(names)
    test = parts["test"]
    assert test.labels.tolist() == [0, 0, 1, 1] and test.classes == sorted(test.classes)
    k = names.index(test.classes[1])
    assert fill(test[3]) == colour(k, 1)  # the second image of the second test class
    again = build_dataset("imagefolder", tmp_path, "test", 8)
    assert again.classes == test.classes  # deterministic
    other = [
        build_dataset("imagefolder", tmp_path, "test", 8, split_seed=s).classes for s in range(5)
    ]
    assert len({tuple(c) for c in other}) > 1  # the seed chooses the split


def test_imagefolder_split_by_images_keeps_every_class_in_every_split(tmp_path):
    write_class_folders(tmp_path, n_classes=3, images_per_class=5)
    options = {"split_by": "images", "split_fractions": [0.6, 0.0, 0.4]}
    train = build_dataset("imagefolder", tmp_path, "train", 8, **options)
    test = build_dataset("imagefolder", tmp_path, "test", 8, **options)
    assert train.classes == test.classes == ["class0", "class1", "class2"]
    assert train.labels.bincount().tolist() == [3, 3, 3]
    assert test.labels.bincount().tolist() == [2, 2, 2]
    assert not set(map(str, train.paths)) & set(map(str, test.paths))
    with pytest.raises(FamBenchError, match="test split of the imagefolder dataset is empty"):
        build_dataset(
            "imagefolder", tmp_path, "test", 8, split_by="images", split_fractions=[0.8, 0.2, 0.0]
        )


def test_imagefolder_split_folders_take_precedence_over_options(roots):
    base, out = roots
    ds = build_dataset("imagefolder", base / "tiered", "val", 8, split_seed=3)
    assert ds.classes == out["tiered"]["val"]


def test_imagefolder_too_few_classes_for_the_split_is_a_clear_error(tmp_path):
    write_class_folders(tmp_path, n_classes=2, images_per_class=2)
    with pytest.raises(FamBenchError, match="has 2 classes"):
        build_dataset("imagefolder", tmp_path, "train", 8)
    with pytest.raises(FamBenchError, match="split_fractions"):
        build_dataset("imagefolder", tmp_path, "train", 8, split_fractions=[0.5, 0.2])


# your own data: CSV manifests ----------------------------------------------------------------


def test_manifest_reads_labels_masks_and_boxes(tmp_path):
    splits = {0: "train", 1: "train", 2: "test", 3: "test"}
    rows = write_manifest(tmp_path, n_classes=4, images_per_class=3, splits=splits)
    ds = build_dataset("manifest", tmp_path / "manifest.csv", "test", 16, normalise=False)
    assert ds.classes == ["15", "20"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.has_masks and ds.has_boxes
    test_rows = [r for r in rows if r["split"] == "test"]
    for index, row in enumerate(test_rows):
        item = ds[index]
        if row["box"] is None:
            assert item["box"].isnan().all() and not item["mask"].any()
            continue
        x0, y0, x1, y1 = row["box"]
        expected = torch.tensor([x0 * 16 / 48, y0 * 16 / 40, x1 * 16 / 48, y1 * 16 / 40])
        torch.testing.assert_close(item["box"], expected)
        box = torch.zeros(16, 16, dtype=torch.bool)
        bx0, by0, bx1, by1 = (round(float(v)) for v in expected)
        box[by0:by1, bx0:bx1] = True
        if row["mask"] is None:  # the box is the mask
            assert torch.equal(item["mask"], box)
        else:  # the mask file (the box's left half) wins over the box
            assert item["mask"].any() and (item["mask"] & ~box).sum() == 0
            assert item["mask"].sum() < box.sum()


def test_manifest_labels_sort_numerically_and_folder_root_works(tmp_path):
    write_manifest(tmp_path, n_classes=4, images_per_class=2, masks=False)
    ds = build_dataset("manifest", tmp_path, "train", 8, split_fractions=[1.0, 0.0, 0.0])
    assert ds.classes == ["5", "10", "15", "20"]
    assert fill(ds[2]) != fill(ds[0])  # decoded from the listed files


def test_manifest_problems_are_one_paragraph_errors(tmp_path):
    write_manifest(tmp_path, n_classes=2, images_per_class=1, splits={0: "train", 1: "test"})
    csv = tmp_path / "manifest.csv"
    text = csv.read_text()
    csv.write_text(text.replace("path,label", "path,lable", 1))
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("manifest", csv, "train", 8)
    assert_dataset_error(excinfo, "missing column(s) ['label']")
    csv.write_text(text.replace("images/c0_0.png", "images/nope.png"))
    with pytest.raises(FamBenchError) as excinfo:
        build_dataset("manifest", csv, "train", 8)
    assert_dataset_error(excinfo, "nope.png does not exist")
    with pytest.raises(FamBenchError, match="no row has split 'val'"):
        csv.write_text(text)
        build_dataset("manifest", csv, "val", 8)
    assert manifest_box(0, 48, 40) == (12, 10, 36, 30)
