"""Image trees with one folder per class: your own data, and tieredImageNet.

Two layouts are read (``data=imagefolder data.root=<folder>``):

- **split folders**: ``root/<split>/<class>/<image>`` (``train``, ``val``, ``test``); the
  split is the folder, ``data.options.split_*`` are ignored;
- **class folders only**: ``root/<class>/<image>``. The split is made here, deterministic
  from ``split_seed``: ``split_by="classes"`` (default; disjoint classes per split, as
  few-shot and retrieval protocols need) or ``"images"`` (every class in every split, its
  images divided; for contrastive kNN evaluation), in ``split_fractions`` (train, val,
  test; default 0.6/0.2/0.2). See :func:`experiments.data.formats._util.seeded_split`.

Classes are the sorted sub-folder names; labels count within the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from experiments.data.base import IMAGE_EXTENSIONS, FileDataset, dataset_error
from experiments.data.common import IMAGENET_MEAN, IMAGENET_STD
from experiments.data.formats._util import SPLITS, contiguous, normalisation, split_indices

LAYOUT = (
    "root/<split>/<class>/<image> (one folder per split, e.g. train/val/test, one sub-folder "
    "per class) or root/<class>/<image> (one folder per class; the split is made by "
    "data.options.split_by/split_fractions/split_seed); image files "
    ".jpg/.jpeg/.png/.bmp/.webp inside"
)
SOURCES = {
    "imagefolder": "your own data arranged as above",
    "tieredImageNet": (
        "the tieredImageNet split of Ren et al. (2018) (github.com/renmengye/few-shot-ssl-public), "
        "built from ImageNet ILSVRC-2012 (image-net.org) and extracted into train/val/test "
        "class folders"
    ),
}


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_tree(folder: Path, root: Path, name: str) -> tuple[list[Path], list[str]]:
    source = SOURCES.get(name, SOURCES["imagefolder"])
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise dataset_error(name, root, f"the folder {folder} has no class folders", LAYOUT, source)
    paths, classes = [], []
    for class_dir in class_dirs:
        files = _images(class_dir)
        if not files:
            raise dataset_error(
                name, root, f"the class folder {class_dir} holds no image files", LAYOUT, source
            )
        paths += files
        classes += [class_dir.name] * len(files)
    return paths, classes


def read_split_folder(
    root: str | Path,
    split: str,
    image_size: int = 84,
    normalise: bool = True,
    name: str = "imagefolder",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> FileDataset:
    """Images under ``root/split/<class>/``; labels follow sorted class-folder names."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        source = SOURCES.get(name, SOURCES["imagefolder"])
        raise dataset_error(name, root, f"the split folder {folder} does not exist", LAYOUT, source)
    paths, classes = _class_tree(folder, root, name)
    labels, names = contiguous(classes)
    return FileDataset(paths, labels, names, image_size, normalise, mean=mean, std=std)


def load_imagefolder(
    root: str | Path,
    split: str,
    image_size: int = 84,
    normalise: bool = True,
    split_by: str = "classes",
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FileDataset:
    """``split`` of a class-folder tree in either layout (module docstring).

    ``mean`` / ``std``: normalisation statistics (``None``: ImageNet's).
    """
    root = Path(root)
    mean, std = normalisation(mean, std)
    if not root.is_dir():
        raise dataset_error(
            "imagefolder", root, "the folder does not exist", LAYOUT, SOURCES["imagefolder"]
        )
    if (root / split).is_dir() or any((root / s).is_dir() for s in SPLITS):
        return read_split_folder(root, split, image_size, normalise, "imagefolder", mean, std)
    paths, classes = _class_tree(root, root, "imagefolder")
    keep = split_indices(classes, split, split_by, split_fractions, split_seed, "imagefolder")
    labels, names = contiguous([classes[i] for i in keep])
    return FileDataset(
        [paths[i] for i in keep], labels, names, image_size, normalise, mean=mean, std=std
    )
