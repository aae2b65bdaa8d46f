"""CUB-200-2011 (Wah et al. 2011): 200 bird species with boxes and segmentations.

Class splits (``protocol``), by the 1-based class id of ``classes.txt``:

- ``"fewshot"`` (splits train/val/test, 100/50/50 classes): the split of Chen et al.
  (ICLR 2019, "A Closer Look at Few-shot Classification"), on the 0-based class index
  ``i``: ``i % 2 == 0`` train, ``i % 4 == 1`` val, ``i % 4 == 3`` test.
- ``"retrieval"`` (train/test): the deep-metric-learning split, the first half of the
  classes (1-100) train and the second half (101-200) test.
- ``"official"`` (train/test): the image-level ``train_test_split.txt``.

Masks: ``masks="auto"`` uses the segmentations when a ``segmentations/`` folder exists
(inside root or next to it; soft masks thresholded at 0.5) and the bounding boxes
otherwise; ``"segmentation"``, ``"box"`` or ``"none"`` force a choice.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from experiments.data.base import FileDataset, dataset_error
from experiments.data.formats._util import check_option, check_split, contiguous, first_missing

NAME = "CUB-200-2011"
FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
)
LAYOUT = (
    "root (the CUB_200_2011 folder, or its parent) with images.txt, image_class_labels.txt, "
    "train_test_split.txt, bounding_boxes.txt, classes.txt and images/<class>/<name>.jpg, "
    "optionally segmentations/<class>/<name>.png"
)
SOURCE = "the Caltech-UCSD Birds page (www.vision.caltech.edu/datasets/cub_200_2011)"
PROTOCOL_SPLITS = {
    "fewshot": ("train", "val", "test"),
    "retrieval": ("train", "test"),
    "official": ("train", "test"),
}


def _table(root: Path, name: str, columns: list[str]) -> pd.DataFrame:
    path = root / name
    try:
        table = pd.read_csv(path, sep=" ", header=None, names=columns, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise dataset_error(
            NAME, path, f"the file cannot be parsed ({err})", LAYOUT, SOURCE
        ) from err
    if table.isna().any().any() or table.empty:
        raise dataset_error(
            NAME,
            path,
            f"every line needs {len(columns)} space-separated fields ({' '.join(columns)})",
            LAYOUT,
            SOURCE,
        )
    return table.set_index("image_id") if "image_id" in columns else table


def _class_in_split(index: int, n_classes: int, protocol: str, split: str) -> bool:
    if protocol == "fewshot":
        return {"train": index % 2 == 0, "val": index % 4 == 1, "test": index % 4 == 3}[split]
    return (index < n_classes // 2) == (split == "train")


def load_cub(
    root: str | Path,
    split: str,
    image_size: int = 84,
    normalise: bool = True,
    protocol: str = "fewshot",
    masks: str = "auto",
) -> FileDataset:
    """CUB ``split`` under ``protocol`` ("fewshot" | "retrieval" | "official")."""
    root = Path(root)
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    check_option(NAME, "protocol", protocol, tuple(PROTOCOL_SPLITS))
    check_option(NAME, "masks", masks, ("auto", "segmentation", "box", "none"))
    check_split(f"{NAME} ({protocol} protocol)", split, PROTOCOL_SPLITS[protocol])
    missing = first_missing([root / f for f in FILES])
    if missing is not None:
        raise dataset_error(NAME, root, f"{missing.name} is missing", LAYOUT, SOURCE)
    images = _table(root, "images.txt", ["image_id", "path"])
    labels = _table(root, "image_class_labels.txt", ["image_id", "class_id"])
    is_train = _table(root, "train_test_split.txt", ["image_id", "is_train"])
    boxes = _table(root, "bounding_boxes.txt", ["image_id", "x", "y", "width", "height"])
    class_names = _table(root, "classes.txt", ["class_id", "name"])
    table = images.join([labels, is_train, boxes], how="left")
    if table.isna().any().any():
        raise dataset_error(
            NAME,
            root,
            "some image ids of images.txt are missing from "
            "image_class_labels.txt, train_test_split.txt or "
            "bounding_boxes.txt",
            LAYOUT,
            SOURCE,
        )
    try:
        class_ids = table["class_id"].astype(int)
        box_values = torch.tensor(table[["x", "y", "width", "height"]].astype(float).to_numpy())
    except ValueError as err:
        raise dataset_error(
            NAME, root, f"a class id or box value is not a number ({err})", LAYOUT, SOURCE
        ) from err
    ordered = sorted(int(c) for c in class_names["class_id"])
    position = {c: i for i, c in enumerate(ordered)}
    if protocol == "official":
        keep = (table["is_train"] == "1") == (split == "train")
    else:
        keep = class_ids.map(lambda c: _class_in_split(position[c], len(ordered), protocol, split))
    selected = keep.to_numpy(dtype=bool, copy=True)
    table, class_ids = table[selected], class_ids[selected]
    box_values = box_values[torch.from_numpy(selected)]
    paths = [root / "images" / p for p in table["path"]]
    missing = first_missing(paths)
    if missing is not None:
        raise dataset_error(
            NAME, root, f"the image {missing} listed in images.txt does not exist", LAYOUT, SOURCE
        )
    seg_dir = next(
        (d for d in (root / "segmentations", root.parent / "segmentations") if d.is_dir()), None
    )
    if masks == "segmentation" and seg_dir is None:
        raise dataset_error(
            NAME,
            root,
            "masks='segmentation' but no segmentations/ folder exists in or next to root",
            LAYOUT,
            SOURCE,
        )
    mask_paths = None
    if masks in ("auto", "segmentation") and seg_dir is not None:
        mask_paths = [seg_dir / Path(p).with_suffix(".png") for p in table["path"]]
        missing = first_missing(mask_paths)
        if missing is not None:
            raise dataset_error(
                NAME, root, f"the segmentation {missing} does not exist", LAYOUT, SOURCE
            )
    label_list, keys = contiguous(list(class_ids))
    names = dict(zip(class_names["class_id"].astype(int), class_names["name"], strict=True))
    return FileDataset(
        paths,
        label_list,
        [names[k] for k in keys],
        image_size,
        normalise,
        boxes=box_values if masks != "none" else None,
        mask_paths=mask_paths if masks != "none" else None,
    )
