"""Write tiny datasets in each on-disk format (for tests; a few KB each, milliseconds).

Every writer makes PNG-coded images (exact pixels, whatever the file extension the format
customarily uses) whose colour encodes ``(class, image)``: channel 0 = 40 * class + 20
(mod 256), channel 1 = 50 * image + 10 (mod 256), channel 2 = 200, so a test can check
labels and decoding from pixels. Writers return what a test needs to check the reader
(class names, boxes, arrays). Import them in tests as
``from format_writers import write_miniimagenet, ...``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """The fill colour of image ``image_index`` of class ``class_index``."""
    return ((40 * class_index + 20) % 256, (50 * image_index + 10) % 256, 200)


def image_array(class_index: int, image_index: int, width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8 filled with :func:`colour`."""
    return np.broadcast_to(
        np.array(colour(class_index, image_index), np.uint8), (height, width, 3)
    ).copy()


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _per_split(n_classes_per_split: int | Sequence[int]) -> dict[str, int]:
    counts = (
        [n_classes_per_split] * 3
        if isinstance(n_classes_per_split, int)
        else list(n_classes_per_split)
    )
    return dict(zip(SPLITS, counts, strict=True))


def write_miniimagenet(
    root: str | Path,
    n_classes_per_split: int | Sequence[int] = 3,
    images_per_class: int = 4,
    size: int = 16,
) -> dict[str, list[str]]:
    """``root/images/*.jpg`` + ``root/{train,val,test}.csv``; returns class names per split.

    Class ``c`` (counting over all splits) is named ``n{c:08d}``; its colour index is ``c``.
    """
    root = Path(root)
    names: dict[str, list[str]] = {}
    offset = 0
    for split, n in _per_split(n_classes_per_split).items():
        rows = ["filename,label"]
        names[split] = []
        for c in range(offset, offset + n):
            wnid = f"n{c:08d}"
            names[split].append(wnid)
            for i in range(images_per_class):
                filename = f"{wnid}{i:08d}.jpg"
                _save(image_array(c, i, size, size), root / "images" / filename)
                rows.append(f"{filename},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        offset += n
    return names


def write_miniimagenet_pickle(
    root: str | Path,
    n_classes_per_split: int | Sequence[int] = 3,
    images_per_class: int = 4,
    size: int = 16,
) -> dict[str, list[str]]:
    """``root/mini-imagenet-cache-{split}.pkl`` with images interleaved across classes
    (so a reader must use ``class_dict``, not the order); returns class names per split."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {}
    offset = 0
    for split, n in _per_split(n_classes_per_split).items():
        images, class_dict = [], {}
        for i in range(images_per_class):
            for c in range(offset, offset + n):
                class_dict.setdefault(f"n{c:08d}", []).append(len(images))
                images.append(image_array(c, i, size, size))
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, handle)
        names[split] = sorted(class_dict)
        offset += n
    return names


def write_imagefolder(
    root: str | Path,
    splits: Sequence[str] = SPLITS,
    n_classes: int = 3,
    images_per_class: int = 4,
    size: int = 16,
) -> dict[str, list[str]]:
    """``root/<split>/<class>/<image>.png``; class ``k`` of split ``s`` is named
    ``{s}_class{k}`` with colour index ``k``."""
    root = Path(root)
    names: dict[str, list[str]] = {}
    for split in splits:
        names[split] = [f"{split}_class{k}" for k in range(n_classes)]
        for k, name in enumerate(names[split]):
            for i in range(images_per_class):
                _save(image_array(k, i, size, size), root / split / name / f"img{i}.png")
    return names


def cub_box(image_id: int) -> tuple[int, int, int, int]:
    """The ``(x, y, width, height)`` box written for 1-based CUB image ``image_id``."""
    return (4 + 2 * (image_id % 3), 2 + image_id % 2, 20, 12)


def write_cub(
    root: str | Path,
    n_classes: int = 8,
    images_per_class: int = 2,
    width: int = 40,
    height: int = 24,
    with_segmentations: bool = True,
) -> Path:
    """``root/CUB_200_2011/...`` (official files) and ``root/segmentations/`` beside it.

    Images are ``width x height`` filled with the class colour, the box :func:`cub_box`
    drawn white. The segmentation covers only the left half of the box (so a test can
    tell which annotation a reader used). Class ``c`` (1-based) has colour index ``c-1``;
    odd image ids are official train images. Returns the CUB_200_2011 folder.
    """
    cub = Path(root) / "CUB_200_2011"
    cub.mkdir(parents=True, exist_ok=True)
    images, labels, split, boxes, classes = [], [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        for i in range(images_per_class):
            image_id += 1
            path = f"{folder}/Bird_{c}_{i}.jpg"
            x, y, w, h = cub_box(image_id)
            array = image_array(c - 1, i, width, height)
            array[y : y + h, x : x + w] = 255
            _save(array, cub / "images" / path)
            if with_segmentations:
                segmentation = np.zeros((height, width), np.uint8)
                segmentation[y : y + h, x : x + w // 2] = 255
                _save(segmentation, Path(root) / "segmentations" / Path(path).with_suffix(".png"))
            images.append(f"{image_id} {path}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {image_id % 2}")
            boxes.append(f"{image_id} {x}.0 {y}.0 {w}.0 {h}.0")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
        ("classes.txt", classes),
    ):
        (cub / name).write_text("\n".join(lines) + "\n")
    return cub


def write_cifar10(root: str | Path, images_per_class: int = 2) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` with 5 train batches and a test batch.

    Each image has its class colour and a black top-left 4 x 8 (rows x columns) corner,
    so a transposed reader is caught. Returns ``{"train": (N, 32, 32, 3), "train_labels",
    "test", "test_labels"}`` in the order written.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n_batches in (("train", 5), ("test", 1)):
        arrays, labels = [], []
        for i in range(images_per_class * n_batches):
            for c in range(10):
                array = image_array(c, i, 32, 32)
                array[:4, :8] = 0
                arrays.append(array)
                labels.append(c)
        arrays = np.stack(arrays)
        out[split], out[f"{split}_labels"] = arrays, np.array(labels)
        rows = arrays.transpose(0, 3, 1, 2).reshape(len(arrays), -1)
        names = [f"data_batch_{b}" for b in range(1, 6)] if split == "train" else ["test_batch"]
        for b, name in enumerate(names):
            part = slice(b * len(rows) // n_batches, (b + 1) * len(rows) // n_batches)
            with open(folder / name, "wb") as handle:
                pickle.dump({b"data": rows[part], b"labels": labels[part]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{c}".encode() for c in range(10)]}, handle)
    return out


def write_stl10(
    root: str | Path, train_per_class: int = 1, test_per_class: int = 1, unlabeled: int = 3
) -> dict[str, np.ndarray]:
    """``root/stl10_binary`` in the column-major binary layout (labels 1..10).

    Images have the class colour and a black top-left 8 x 24 (rows x columns) corner.
    Returns ``{"train", "train_labels", "test", "test_labels", "unlabeled"}`` with images
    ``(N, 96, 96, 3)`` and 0-based labels.
    """
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_class in (
        ("train", train_per_class),
        ("test", test_per_class),
        ("unlabeled", None),
    ):
        if per_class is None:
            labels = np.arange(unlabeled) % 10
        else:
            labels = np.repeat(np.arange(10), per_class)
        arrays = np.stack([image_array(int(c), i, 96, 96) for i, c in enumerate(labels)])
        arrays[:, :8, :24] = 0
        out[split] = arrays
        # (N, row, column, channel) -> stored (N, channel, column, row)
        (folder / f"{split}_X.bin").write_bytes(arrays.transpose(0, 3, 2, 1).tobytes())
        if per_class is not None:
            out[f"{split}_labels"] = labels
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(10)) + "\n")
    return out


def write_sop(
    root: str | Path, n_classes: int = 6, images_per_class: int = 2, size: int = 16
) -> None:
    """``root/Ebay_{train,test}.txt`` + images; classes ``1..n/2`` train, the rest test.

    Class ids are 1-based; class ``k`` has colour index ``k - 1``.
    """
    root = Path(root)
    lines = {
        "train": ["image_id class_id super_class_id path"],
        "test": ["image_id class_id super_class_id path"],
    }
    image_id = 0
    for k in range(1, n_classes + 1):
        split = "train" if k <= n_classes // 2 else "test"
        for i in range(images_per_class):
            image_id += 1
            path = f"thing_final/{k}_{i}.JPG"
            _save(image_array(k - 1, i, size, size), root / path)
            lines[split].append(f"{image_id} {k} {1 + k % 2} {path}")
    for split, rows in lines.items():
        (root / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")


def cars_box(image_index: int) -> tuple[int, int, int, int]:
    """1-based inclusive ``(x1, y1, x2, y2)`` written for 0-based image ``image_index``."""
    return (3 + image_index % 4, 2, 22 + image_index % 4, 13)


def write_cars196(
    root: str | Path,
    n_classes: int = 4,
    images_per_class: int = 2,
    width: int = 40,
    height: int = 24,
) -> None:
    """``root/cars_annos.mat`` + ``root/car_ims/``; boxes from :func:`cars_box` drawn white.

    Class ``k`` (1-based) has colour index ``k - 1``; the ``test`` flag is set on odd
    images.
    """
    from scipy.io import savemat

    root = Path(root)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    n = 0
    for k in range(1, n_classes + 1):
        for i in range(images_per_class):
            path = f"car_ims/{n + 1:06d}.jpg"
            x1, y1, x2, y2 = cars_box(n)
            array = image_array(k - 1, i, width, height)
            array[y1 - 1 : y2, x1 - 1 : x2] = 255
            _save(array, root / path)
            records.append((path, x1, y1, x2, y2, k, n % 2))
            n += 1
    annotations = np.array(records, dtype=[(f, object) for f in fields])
    class_names = np.array([f"Car {k}" for k in range(1, n_classes + 1)], dtype=object)
    savemat(
        root / "cars_annos.mat",
        {"annotations": annotations[None], "class_names": class_names[None]},
    )


def write_class_folders(
    root: str | Path, n_classes: int = 5, images_per_class: int = 3, size: int = 16
) -> list[str]:
    """``root/<class>/<image>.png`` (one level, no split folders); class ``k`` is named
    ``class{k}`` with colour index ``k``. Returns the class names."""
    root = Path(root)
    names = [f"class{k}" for k in range(n_classes)]
    for k, name in enumerate(names):
        for i in range(images_per_class):
            _save(image_array(k, i, size, size), root / name / f"img{i}.png")
    return names


def manifest_box(row: int, width: int, height: int) -> tuple[int, int, int, int]:
    """``x0, y0, x1, y1`` (x1/y1 exclusive) written for manifest row ``row``: even rows get
    a box over the image centre (the middle half), odd rows one in the top-left corner."""
    if row % 2 == 0:
        return (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    return (0, 0, width // 5, height // 5)


def write_manifest(
    root: str | Path,
    n_classes: int = 4,
    images_per_class: int = 3,
    width: int = 48,
    height: int = 40,
    splits: dict[int, str] | None = None,
    masks: bool = True,
) -> list[dict]:
    """``root/manifest.csv`` + ``root/images/`` (+ ``root/masks/``), with boxes.

    Class ``k`` is labelled ``str(5 * (k + 1))`` ("5", "10", ...: sorted as text "10"
    comes before "5", so a reader must sort integer labels numerically) with colour index
    ``k``; its box (:func:`manifest_box`) is drawn white. Every third
    row has no box (empty cells); with ``masks``, rows ``i % 3 == 1`` get a mask image of
    the box's left half. ``splits`` maps a class to its split column value (no column
    when ``None``). Returns one dict per row (path, label, split, box or None, mask or
    None).
    """
    root = Path(root)
    rows, lines = [], []
    header = ["path", "label"] + (["split"] if splits else []) + (["mask"] if masks else [])
    lines.append(",".join(header + ["x0", "y0", "x1", "y1"]))
    row = 0
    for k in range(n_classes):
        for i in range(images_per_class):
            path = f"images/c{k}_{i}.png"
            box = manifest_box(row, width, height) if row % 3 != 2 else None
            array = image_array(k, i, width, height)
            if box is not None:
                array[box[1] : box[3], box[0] : box[2]] = 255
            _save(array, root / path)
            mask = None
            if masks and row % 3 == 1 and box is not None:
                mask = f"masks/c{k}_{i}.png"
                canvas = np.zeros((height, width), np.uint8)
                canvas[box[1] : box[3], box[0] : (box[0] + box[2]) // 2] = 255
                _save(canvas, root / mask)
            cells = [path, str(5 * (k + 1))]
            if splits:
                cells.append(splits[k])
            if masks:
                cells.append(mask or "")
            cells += [str(v) for v in box] if box is not None else ["", "", "", ""]
            lines.append(",".join(cells))
            rows.append(
                {
                    "path": path,
                    "label": str(5 * (k + 1)),
                    "split": splits[k] if splits else None,
                    "box": box,
                    "mask": mask,
                }
            )
            row += 1
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return rows
