"""Stanford Online Products (Song et al. 2016): 22,634 products, the first 11,318 classes
train (59,551 images), the rest test (60,502 images), as listed by ``Ebay_train.txt`` /
``Ebay_test.txt``. Labels are the class ids remapped to ``0..C-1`` within the split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.data.base import FileDataset, dataset_error
from experiments.data.formats._util import check_split, contiguous, first_missing

NAME = "Stanford Online Products"
LAYOUT = (
    "root/Ebay_train.txt and root/Ebay_test.txt (header 'image_id class_id super_class_id "
    "path', space-separated) with the images at root/<path> (e.g. bicycle_final/...JPG)"
)
SOURCE = "cvgl.stanford.edu/projects/lifted_struct (Stanford_Online_Products.zip)"


def load_sop(
    root: str | Path, split: str, image_size: int = 224, normalise: bool = True
) -> FileDataset:
    """SOP ``split`` ("train" | "test")."""
    root = Path(root)
    check_split(NAME, split, ("train", "test"))
    listing = root / f"Ebay_{split}.txt"
    if not listing.is_file():
        raise dataset_error(NAME, root, f"{listing.name} is missing", LAYOUT, SOURCE)
    try:
        table = pd.read_csv(listing, sep=r"\s+", dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise dataset_error(
            NAME, listing, f"the listing cannot be parsed ({err})", LAYOUT, SOURCE
        ) from err
    columns = ["image_id", "class_id", "super_class_id", "path"]
    if list(table.columns) != columns or table.isna().any().any():
        raise dataset_error(
            NAME,
            listing,
            f"the listing needs the header {' '.join(columns)} "
            f"and four fields per line; found columns "
            f"{list(table.columns)}",
            LAYOUT,
            SOURCE,
        )
    try:
        class_ids = table["class_id"].astype(int).tolist()
    except ValueError as err:
        raise dataset_error(
            NAME, listing, f"a class_id is not a number ({err})", LAYOUT, SOURCE
        ) from err
    paths = [root / p for p in table["path"]]
    missing = first_missing(paths)
    if missing is not None:
        raise dataset_error(
            NAME,
            root,
            f"the image {missing} listed in {listing.name} does not exist",
            LAYOUT,
            SOURCE,
        )
    labels, keys = contiguous(class_ids)
    return FileDataset(paths, labels, [str(k) for k in keys], image_size, normalise)
