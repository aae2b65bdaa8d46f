"""Split-per-folder image trees: ``root/<split>/<class>/<image>`` (tieredImageNet and any
ImageFolder-style dataset). Classes are the sorted sub-folder names of the split."""

from __future__ import annotations

from pathlib import Path

from experiments.data.base import IMAGE_EXTENSIONS, FileDataset, dataset_error

LAYOUT = (
    "root/<split>/<class>/<image> (one folder per split, e.g. train/val/test, one sub-folder "
    "per class, image files .jpg/.jpeg/.png/.bmp/.webp inside)"
)
SOURCES = {
    "imagefolder": "your own data arranged as above",
    "tieredImageNet": (
        "the tieredImageNet split of Ren et al. (2018) (github.com/renmengye/few-shot-ssl-public), "
        "built from ImageNet ILSVRC-2012 (image-net.org) and extracted into train/val/test "
        "class folders"
    ),
}


def load_imagefolder(
    root: str | Path,
    split: str,
    image_size: int = 84,
    normalise: bool = True,
    name: str = "imagefolder",
) -> FileDataset:
    """Images under ``root/split/<class>/``; labels follow sorted class-folder names."""
    root = Path(root)
    source = SOURCES.get(name, SOURCES["imagefolder"])
    folder = root / split
    if not folder.is_dir():
        raise dataset_error(name, root, f"the split folder {folder} does not exist", LAYOUT, source)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise dataset_error(
                name, root, f"the class folder {class_dir} holds no image files", LAYOUT, source
            )
        paths += files
        labels += [label] * len(files)
    if not class_dirs:
        raise dataset_error(
            name, root, f"the split folder {folder} has no class folders", LAYOUT, source
        )
    return FileDataset(paths, labels, [p.name for p in class_dirs], image_size, normalise)
