"""CIFAR-10 from the python pickles (``cifar-10-batches-py``); splits train (50k) / test (10k).

Normalised with the CIFAR-10 training statistics, not ImageNet's.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from experiments.data.base import ArrayDataset, dataset_error
from experiments.data.formats._util import check_split

NAME = "CIFAR-10"
LAYOUT = (
    "root/cifar-10-batches-py/ (or root itself) with data_batch_1 ... data_batch_5, test_batch "
    "and batches.meta, the python pickles of the official archive"
)
SOURCE = "www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise dataset_error(
            NAME, path, f"the batch file cannot be read ({err})", LAYOUT, SOURCE
        ) from err


def load_cifar10(
    root: str | Path, split: str, image_size: int = 32, normalise: bool = True
) -> ArrayDataset:
    """CIFAR-10 ``split`` ("train" | "test") as ``(N, 32, 32, 3)`` uint8 in memory."""
    root = Path(root)
    check_split(NAME, split, ("train", "test"))
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        if b"data" not in batch or b"labels" not in batch:
            raise dataset_error(
                NAME, folder / name, "the batch has no b'data' / b'labels'", LAYOUT, SOURCE
            )
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[b"labels"]):
            raise dataset_error(
                NAME,
                folder / name,
                f"'data' must be (N, 3072) with one label per row, got {data.shape}",
                LAYOUT,
                SOURCE,
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[b"labels"])
    meta = _unpickle(folder / "batches.meta")
    classes = [n.decode() for n in meta.get(b"label_names", [])]
    if len(classes) != 10:
        raise dataset_error(
            NAME, folder / "batches.meta", "b'label_names' must list 10 classes", LAYOUT, SOURCE
        )
    return ArrayDataset(np.concatenate(images), labels, classes, image_size, normalise, MEAN, STD)
