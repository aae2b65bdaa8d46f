"""``build_dataset``: one entry point for every dataset name (used by the Hydra configs)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from experiments.data.formats.cars196 import load_cars196
from experiments.data.formats.cifar10 import load_cifar10
from experiments.data.formats.cub import load_cub
from experiments.data.formats.imagefolder import load_imagefolder, read_split_folder
from experiments.data.formats.manifest import load_manifest
from experiments.data.formats.miniimagenet import load_miniimagenet
from experiments.data.formats.sop import load_sop
from experiments.data.formats.stl10 import load_stl10
from experiments.data.synthetic import SyntheticShapes
from fam.errors import FamBenchError


def _synthetic(
    root: str | Path | None, split: str, image_size: int = 32, **options
) -> SyntheticShapes:
    return SyntheticShapes(split, image_size, **options)


def _tiered(root: str | Path, split: str, image_size: int = 84, normalise: bool = True):
    return read_split_folder(root, split, image_size, normalise, name="tieredImageNet")


LOADERS: dict[str, Callable[..., Dataset]] = {
    "synthetic": _synthetic,
    "miniimagenet": load_miniimagenet,
    "tieredimagenet": _tiered,
    "imagefolder": load_imagefolder,
    "manifest": load_manifest,
    "cub": load_cub,
    "cifar10": load_cifar10,
    "stl10": load_stl10,
    "sop": load_sop,
    "cars196": load_cars196,
}

_SYNTHETIC_OPTIONS = ("images_per_class", "seed", "mode", "normalise", "max_classes", "clutter")


def accepted_options(name: str) -> list[str]:
    """The ``data.options`` dataset ``name`` (a key of :data:`LOADERS`) takes."""
    key = name.lower()
    if key == "synthetic":
        return list(_SYNTHETIC_OPTIONS)
    parameters = inspect.signature(LOADERS[key]).parameters
    return [p for p in parameters if p not in ("root", "split", "image_size")]


def build_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | None = None,
    **options,
) -> Dataset:
    """Build dataset ``name`` (see ``LOADERS``) for ``split`` at ``image_size`` pixels.

    ``root`` is ignored by ``synthetic``; ``image_size=None`` takes the dataset's native
    or customary size. ``options`` go to the reader (e.g. ``normalise=False``,
    ``protocol="retrieval"``, ``masks="box"``, ``mode="pairs"``).
    """
    key = name.lower()
    if key not in LOADERS:
        raise FamBenchError(
            f"Unknown dataset {name!r}; choose one of {', '.join(sorted(LOADERS))}."
        )
    loader = LOADERS[key]
    accepted = accepted_options(key)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FamBenchError(
            f"Dataset {name!r} does not take the option(s) {unknown}; it accepts "
            f"{', '.join(accepted) or 'none'}."
        )
    if key != "synthetic" and (root is None or str(root) == ""):
        raise FamBenchError(
            f"Dataset {name!r} is read from disk: set data.root to the folder that holds it."
        )
    if image_size is not None:
        options["image_size"] = int(image_size)
    return loader(root, split, **options)
