"""miniImageNet (Vinyals et al. 2016, split of Ravi & Larochelle 2017): 64/16/20 classes.

Two layouts are read: the csv split files next to an ``images/`` folder, or the widely
shared pickle caches. ``source="auto"`` takes the csv files when the split's csv exists,
else the pickle. Class labels are the split's class names (wnids) in sorted order.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.data.base import ArrayDataset, FileDataset, ImageDataset, dataset_error
from experiments.data.formats._util import check_option, check_split, contiguous, first_missing

NAME = "miniImageNet"
LAYOUT = (
    "root/images/<filename> plus root/{train,val,test}.csv with the header 'filename,label' "
    "(one row per image), or the pickle caches root/mini-imagenet-cache-{train,val,test}.pkl "
    "holding a dict with 'image_data' (N, 84, 84, 3) uint8 and 'class_dict' {label: [indices]}"
)
SOURCE = (
    "the Ravi & Larochelle split files (github.com/twitter/meta-learning-lstm, "
    "data/miniImagenet) with the images cut from ImageNet ILSVRC-2012 (image-net.org), or "
    "the pickle caches distributed with learn2learn / FEAT"
)
SPLITS = ("train", "val", "test")


def _error(path: Path, problem: str):
    return dataset_error(NAME, path, problem, LAYOUT, SOURCE)


def _from_csv(root: Path, split: str, image_size: int, normalise: bool) -> FileDataset:
    csv = root / f"{split}.csv"
    try:
        table = pd.read_csv(csv, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise _error(csv, f"the csv file is malformed ({err})") from err
    if list(table.columns[:2]) != ["filename", "label"] or table.isna().any().any():
        raise _error(
            csv,
            f"the csv needs the columns 'filename,label' with a value in every "
            f"row; found columns {list(table.columns)}",
        )
    paths = [root / "images" / name for name in table["filename"]]
    missing = first_missing(paths)
    if missing is not None:
        raise _error(root, f"the image {missing} listed in {csv.name} does not exist")
    labels, classes = contiguous(list(table["label"]))
    return FileDataset(paths, labels, classes, image_size, normalise)


def _from_pickle(root: Path, split: str, image_size: int, normalise: bool) -> ArrayDataset:
    path = root / f"mini-imagenet-cache-{split}.pkl"
    try:
        with open(path, "rb") as handle:
            try:
                cache = pickle.load(handle)
            except UnicodeDecodeError:  # caches written by Python 2
                handle.seek(0)
                cache = pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise _error(path, f"the pickle cannot be read ({err})") from err
    if not isinstance(cache, dict) or not {"image_data", "class_dict"} <= set(cache):
        raise _error(path, "the pickle must hold a dict with 'image_data' and 'class_dict'")
    images = np.asarray(cache["image_data"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise _error(
            path, f"'image_data' must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}"
        )
    classes = sorted(cache["class_dict"])
    labels = np.full(len(images), -1, dtype=np.int64)
    for label, name in enumerate(classes):
        labels[np.asarray(cache["class_dict"][name], dtype=np.int64)] = label
    if (labels < 0).any():
        raise _error(
            path,
            f"{int((labels < 0).sum())} images of 'image_data' belong to no class of 'class_dict'",
        )
    return ArrayDataset(images, labels, classes, image_size, normalise)


def load_miniimagenet(
    root: str | Path, split: str, image_size: int = 84, normalise: bool = True, source: str = "auto"
) -> ImageDataset:
    """miniImageNet ``split`` from the csv files (``source="csv"``) or pickles (``"pickle"``)."""
    root = Path(root)
    check_split(NAME, split, SPLITS)
    check_option(NAME, "source", source, ("auto", "csv", "pickle"))
    if source == "auto":
        if (root / f"{split}.csv").is_file():
            source = "csv"
        elif (root / f"mini-imagenet-cache-{split}.pkl").is_file():
            source = "pickle"
        else:
            raise _error(root, f"neither {split}.csv nor mini-imagenet-cache-{split}.pkl exists")
    if source == "csv":
        if not (root / f"{split}.csv").is_file():
            raise _error(root, f"{split}.csv does not exist")
        return _from_csv(root, split, image_size, normalise)
    return _from_pickle(root, split, image_size, normalise)
