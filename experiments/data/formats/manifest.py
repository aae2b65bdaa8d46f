"""Your own data as a CSV manifest: ``data=manifest data.root=<file.csv or its folder>``.

Columns (a header row; the first two required, the others optional, in any order)::

    path,label[,split][,mask][,x0,y0,x1,y1]

- ``path``: the image, relative to the CSV's folder (or absolute);
- ``label``: the class (any text; classes are sorted, numerically when all are integers);
- ``split``: ``train`` / ``val`` / ``test``. Without the column the split is made as for a
  one-level image folder (``split_by``, ``split_fractions``, ``split_seed``);
- ``mask``: a mask image (relative like ``path``; grey levels >= 0.5 are the object after
  resizing), an empty cell for none;
- ``x0,y0,x1,y1``: the object's box in the original image's pixels, edge coordinates
  with ``x1``/``y1`` exclusive (a box over pixel columns 10..19 has ``x0=10, x1=20``);
  empty cells for none.

Ground truth: the mask (where given) or else the box, rasterised at the input size like
the CUB reader does, is the sample's ``mask``; a row with neither has an empty mask, which
the pointing games exclude and count. With box columns the dataset also has ``has_boxes``
and a per-sample ``box``: ``(4,)`` float ``x0, y0, x1, y1`` at input resolution (the image
is resized to ``S x S`` as a whole, so ``x * S / width``), NaN where the row has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from experiments.data.base import FileDataset, dataset_error
from experiments.data.formats._util import (
    SPLITS,
    check_split,
    first_missing,
    normalisation,
    split_indices,
)

NAME = "manifest"
REQUIRED = ("path", "label")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
COLUMNS = (*REQUIRED, "split", "mask", *BOX_COLUMNS)
LAYOUT = (
    "a CSV file (data.root, or data.root/manifest.csv) with a header path,label[,split][,mask]"
    "[,x0,y0,x1,y1]; paths relative to the CSV's folder"
)
SOURCE = "your own data, listed as above"


class BoxedFileDataset(FileDataset):
    """A :class:`FileDataset` whose items also carry ``box``: ``(4,)`` ``x0, y0, x1, y1``
    at input resolution (NaN where the sample has none); ``has_boxes`` is true."""

    has_boxes = True

    def __init__(self, *args, boxes_xyxy: Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boxes_xyxy = boxes_xyxy.double()

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        with Image.open(self.paths[index]) as image:  # reads the header only
            width, height = image.size
        size = self.image_size
        scale = torch.tensor([size / width, size / height] * 2, dtype=torch.float64)
        item["box"] = (self.boxes_xyxy[index] * scale).float()
        return item


def _label_order(labels: Sequence[str]) -> list[str]:
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _boxes(table: pd.DataFrame, csv: Path) -> Tensor:
    values = table[list(BOX_COLUMNS)].replace("", float("nan"))
    try:
        boxes = torch.tensor(values.astype(float).to_numpy(), dtype=torch.float64)
    except ValueError as err:
        raise dataset_error(
            NAME, csv, f"a box value is not a number ({err})", LAYOUT, SOURCE
        ) from err
    given = ~boxes.isnan()
    partial = given.any(1) & ~given.all(1)
    inverted = given.all(1) & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    for bad, problem in (
        (partial, "has some but not all of x0,y0,x1,y1"),
        (inverted, "has x1 <= x0 or y1 <= y0"),
    ):
        if bad.any():
            row = int(bad.nonzero()[0, 0]) + 2  # 1-based, after the header
            raise dataset_error(NAME, csv, f"line {row} {problem}", LAYOUT, SOURCE)
    return boxes


def load_manifest(
    root: str | Path,
    split: str,
    image_size: int = 84,
    normalise: bool = True,
    file: str = "manifest.csv",
    split_by: str = "classes",
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FileDataset:
    """``split`` of the manifest at ``root`` (the CSV, or a folder holding ``file``)."""
    root = Path(root)
    csv = root / file if root.is_dir() else root
    if not csv.is_file():
        raise dataset_error(NAME, csv, "the file does not exist", LAYOUT, SOURCE)
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise dataset_error(
            NAME, csv, f"the file cannot be parsed ({err})", LAYOUT, SOURCE
        ) from err
    table.columns = [str(c).strip() for c in table.columns]
    unknown = [c for c in table.columns if c not in COLUMNS]
    missing = [c for c in REQUIRED if c not in table.columns]
    if unknown or missing:
        problem = f"missing column(s) {missing}" if missing else f"unknown column(s) {unknown}"
        other = next(
            (d for d in (";", "\t", "|") if len(table.columns) == 1 and d in table.columns[0]), None
        )
        if other is not None:
            problem += (
                f" (the header {table.columns[0]!r} is one column: the file is separated by "
                f"{other!r}; a manifest is separated by commas, e.g. path,label)"
            )
        raise dataset_error(NAME, csv, f"{problem}; columns are {list(COLUMNS)}", LAYOUT, SOURCE)
    has_box_columns = [c in table.columns for c in BOX_COLUMNS]
    if any(has_box_columns) and not all(has_box_columns):
        raise dataset_error(NAME, csv, "box columns need all of x0,y0,x1,y1", LAYOUT, SOURCE)
    if table.empty or (table["path"] == "").any() or (table["label"] == "").any():
        raise dataset_error(NAME, csv, "every row needs a path and a label", LAYOUT, SOURCE)
    if "split" in table.columns:
        check_split(NAME, split, SPLITS)
        wrong = sorted(set(table["split"]) - set(SPLITS))
        if wrong:
            raise dataset_error(
                NAME, csv, f"split values {wrong} are not train/val/test", LAYOUT, SOURCE
            )
        keep = [i for i, s in enumerate(table["split"]) if s == split]
        if not keep:
            raise dataset_error(NAME, csv, f"no row has split {split!r}", LAYOUT, SOURCE)
    else:
        keep = split_indices(
            list(table["label"]), split, split_by, split_fractions, split_seed, NAME
        )
    table = table.iloc[keep].reset_index(drop=True)
    base = csv.parent
    paths = [base / p for p in table["path"]]
    absent = first_missing(paths)
    if absent is not None:
        raise dataset_error(NAME, csv, f"the image {absent} does not exist", LAYOUT, SOURCE)
    mask_paths = None
    if "mask" in table.columns:
        mask_paths = [base / m if m else None for m in table["mask"]]
        absent = first_missing([m for m in mask_paths if m is not None])
        if absent is not None:
            raise dataset_error(NAME, csv, f"the mask {absent} does not exist", LAYOUT, SOURCE)
    order = _label_order(list(table["label"]))
    position = {c: i for i, c in enumerate(order)}
    labels = [position[c] for c in table["label"]]
    mean, std = normalisation(mean, std)
    options = {"mean": mean, "std": std}
    if not all(has_box_columns):
        return FileDataset(
            paths, labels, order, image_size, normalise, mask_paths=mask_paths, **options
        )
    xyxy = _boxes(table, csv)
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    return BoxedFileDataset(
        paths,
        labels,
        order,
        image_size,
        normalise,
        boxes=xywh,
        mask_paths=mask_paths,
        boxes_xyxy=xyxy,
        **options,
    )
