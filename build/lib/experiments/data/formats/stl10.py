"""STL-10 binary files (``stl10_binary``): splits train (5k), test (8k), unlabeled (100k)
and train+unlabeled (for self-supervised training). Images are memory-mapped; labels of
unlabeled images are -1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.data.base import ArrayDataset, dataset_error
from experiments.data.formats._util import check_split

NAME = "STL-10"
LAYOUT = (
    "root/stl10_binary/ (or root itself) with train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
    "unlabeled_X.bin and class_names.txt (uint8 images of 3 x 96 x 96, each channel stored "
    "column-major; labels 1..10)"
)
SOURCE = "cs.stanford.edu/~acoates/stl10 (binary version)"
SIDE = 96
SPLITS = ("train", "test", "unlabeled", "train+unlabeled")


class _Images:
    """Several memory-mapped ``(n, 96, 96, 3)`` views indexed as one."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - self.offsets[part]]


def _images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise dataset_error(NAME, path.parent, f"{path.name} is missing", LAYOUT, SOURCE)
    size = path.stat().st_size
    if size == 0 or size % (3 * SIDE * SIDE):
        raise dataset_error(
            NAME,
            path,
            f"the file size {size} is not a multiple of one image (3 x 96 x 96 bytes)",
            LAYOUT,
            SOURCE,
        )
    data = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, SIDE, SIDE)
    # stored (channel, column, row): transposing gives (row, column, channel)
    return data.transpose(0, 3, 2, 1)


def _labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise dataset_error(NAME, path.parent, f"{path.name} is missing", LAYOUT, SOURCE)
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != count or (labels < 0).any() or (labels > 9).any():
        raise dataset_error(
            NAME,
            path,
            f"expected {count} labels in 1..10, got {len(labels)} "
            f"values in {labels.min(initial=0) + 1}.."
            f"{labels.max(initial=0) + 1}",
            LAYOUT,
            SOURCE,
        )
    return labels


def load_stl10(
    root: str | Path, split: str, image_size: int = 96, normalise: bool = True
) -> ArrayDataset:
    """STL-10 ``split`` as memory-mapped uint8 images."""
    root = Path(root)
    check_split(NAME, split, SPLITS)
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    names_file = folder / "class_names.txt"
    if not names_file.is_file():
        raise dataset_error(NAME, folder, "class_names.txt is missing", LAYOUT, SOURCE)
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    parts, labels = [], []
    for part in split.split("+"):
        images = _images(folder / f"{part}_X.bin")
        parts.append(images)
        if part == "unlabeled":
            labels.append(np.full(len(images), -1, dtype=np.int64))
        else:
            labels.append(_labels(folder / f"{part}_y.bin", len(images)))
    images = parts[0] if len(parts) == 1 else _Images(parts)
    return ArrayDataset(images, np.concatenate(labels), classes, image_size, normalise)
