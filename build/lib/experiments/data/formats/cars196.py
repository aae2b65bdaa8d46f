"""Cars196 / Stanford Cars (Krause et al. 2013) from ``cars_annos.mat`` + ``car_ims/``.

This is the all-in-one layout of the original release (``car_ims.tgz`` and
``cars_annos.mat``, read with ``scipy.io.loadmat``): each annotation has
``relative_im_path``, the box ``bbox_x1, bbox_y1, bbox_x2, bbox_y2`` (1-based, inclusive
pixel corners), ``class`` (1..196) and ``test``. Class splits (``protocol``):

- ``"retrieval"`` (default): the deep-metric-learning split, the first half of the
  classes (1-98) train, the second half (99-196) test.
- ``"official"``: the image-level ``test`` flag (8,144 train / 8,041 test images).

The box is carried as ``mask`` (``masks="box"``, default; ``"none"`` drops it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from experiments.data.base import FileDataset, dataset_error
from experiments.data.formats._util import check_option, check_split, contiguous, first_missing

NAME = "Cars196"
LAYOUT = (
    "root/cars_annos.mat (struct array 'annotations' with relative_im_path, bbox_x1, bbox_y1, "
    "bbox_x2, bbox_y2, class, test; cell 'class_names') and the images at "
    "root/<relative_im_path> (car_ims/000001.jpg ...)"
)
SOURCE = (
    "the Stanford Cars release (ai.stanford.edu/~jkrause/cars/car_dataset.html: car_ims.tgz and "
    "cars_annos.mat; mirrors exist on Kaggle and the Hugging Face Hub)"
)
FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def load_cars196(
    root: str | Path,
    split: str,
    image_size: int = 224,
    normalise: bool = True,
    protocol: str = "retrieval",
    masks: str = "box",
) -> FileDataset:
    """Cars196 ``split`` ("train" | "test") under ``protocol`` ("retrieval" | "official")."""
    from scipy.io import loadmat  # scipy is only needed for this format

    root = Path(root)
    check_split(NAME, split, ("train", "test"))
    check_option(NAME, "protocol", protocol, ("retrieval", "official"))
    check_option(NAME, "masks", masks, ("box", "none"))
    path = root / "cars_annos.mat"
    if not path.is_file():
        raise dataset_error(NAME, root, "cars_annos.mat is missing", LAYOUT, SOURCE)
    try:
        mat = loadmat(path, squeeze_me=True)
        annotations = np.atleast_1d(mat["annotations"])
        fields = annotations.dtype.names or ()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise dataset_error(
            NAME, path, f"the file has no readable 'annotations' ({err})", LAYOUT, SOURCE
        ) from err
    absent = [f for f in FIELDS if f not in fields]
    if absent:
        raise dataset_error(NAME, path, f"the annotations lack the fields {absent}", LAYOUT, SOURCE)
    class_ids = annotations["class"].astype(np.int64)
    n_classes = int(class_ids.max())
    if protocol == "official":
        keep = (annotations["test"].astype(int) == 0) == (split == "train")
    else:
        keep = (class_ids <= n_classes // 2) == (split == "train")
    annotations, class_ids = annotations[keep], class_ids[keep]
    paths = [root / str(p) for p in annotations["relative_im_path"]]
    missing = first_missing(paths)
    if missing is not None:
        raise dataset_error(
            NAME,
            root,
            f"the image {missing} listed in cars_annos.mat does not exist",
            LAYOUT,
            SOURCE,
        )
    corners = np.stack(
        [annotations[f"bbox_{c}"].astype(np.float64) for c in ("x1", "y1", "x2", "y2")], 1
    )
    # 1-based inclusive corners -> 0-based (x, y, width, height) in pixel edges
    boxes = torch.tensor(
        np.concatenate([corners[:, :2] - 1, corners[:, 2:] - corners[:, :2] + 1], 1)
    )
    names = [str(n) for n in np.atleast_1d(mat.get("class_names", []))]
    labels, keys = contiguous(class_ids.tolist())
    classes = [names[k - 1] if k - 1 < len(names) else str(k) for k in keys]
    return FileDataset(
        paths,
        labels,
        classes,
        image_size,
        normalise,
        boxes=boxes if masks == "box" else None,
    )
