"""Helpers shared by the format readers: split and option checks, labels, missing files;
and what the readers of your own data (imagefolder, manifest) share: the seeded split
(``split_by``, ``split_fractions``, ``split_seed``) and the normalisation statistics."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.data.common import IMAGENET_MEAN, IMAGENET_STD
from fam.errors import FamBenchError


def check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise FamBenchError(
            f"The {name} dataset has splits {', '.join(repr(s) for s in allowed)}; got "
            f"split={split!r}."
        )


def check_option(name: str, option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise FamBenchError(
            f"The {name} dataset option {option} must be one of "
            f"{', '.join(repr(s) for s in allowed)}; got {value!r}."
        )


def contiguous(values: Sequence) -> tuple[list[int], list]:
    """Map arbitrary class keys to ``0..C-1`` in sorted key order: (labels, sorted keys)."""
    keys = sorted(set(values))
    position = {k: i for i, k in enumerate(keys)}
    return [position[v] for v in values], keys


def first_missing(paths: Sequence[Path]) -> Path | None:
    for path in paths:
        if not path.is_file():
            return path
    return None


SPLITS = ("train", "val", "test")


def normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Sequence[float], Sequence[float]]:
    """``(mean, std)`` to normalise images with: the given statistics, ImageNet's for
    ``None``."""
    return (
        IMAGENET_MEAN if mean is None else tuple(mean),
        IMAGENET_STD if std is None else tuple(std),
    )


def check_fractions(name: str, fractions: Sequence[float]) -> tuple[float, float, float]:
    """``split_fractions`` as three non-negative numbers (train, val, test) summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise FamBenchError(
            f"The {name} dataset option split_fractions must be three non-negative numbers "
            f"(train, val, test) that sum to 1, e.g. [0.6, 0.2, 0.2]; got {list(fractions)}."
        )
    return values  # type: ignore[return-value]


def seeded_split(
    keys: Sequence, fractions: Sequence[float], seed: int, name: str, what: str
) -> dict[str, set]:
    """Split the distinct ``keys`` into train/val/test by ``fractions`` after a seeded shuffle.

    The shuffle is ``numpy.random.default_rng(seed).permutation`` of the sorted keys, so
    the split depends on the seed and the set of keys only (not on file order). Counts are
    ``round(f * n)`` for train and val, the rest for test; every split with a positive
    fraction gets at least one key, or this is an error naming the numbers.
    """
    distinct = sorted(set(keys), key=str)
    n = len(distinct)
    counts = [round(fractions[0] * n), round(fractions[1] * n)]
    counts.append(n - sum(counts))
    if any(c < 1 for c, f in zip(counts, fractions, strict=True) if f > 0) or counts[2] < 0:
        raise FamBenchError(
            f"The {name} dataset has {n} {what}; split_fractions {list(fractions)} cannot give "
            f"every split at least one. Add {what}, change data.options.split_fractions, or "
            "arrange the data in train/val/test folders (or a split column)."
        )
    order = [distinct[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    bounds = [0, counts[0], counts[0] + counts[1], n]
    return {s: set(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def split_indices(
    classes: Sequence,
    split: str,
    split_by: str,
    fractions: Sequence[float],
    seed: int,
    name: str,
) -> list[int]:
    """Indices of the samples (one class key each) that fall in ``split``.

    ``split_by="classes"``: disjoint classes per split (few-shot, retrieval);
    ``"images"``: every class in every split, its images divided (contrastive / kNN).
    """
    check_option(name, "split_by", split_by, ("classes", "images"))
    check_split(name, split, SPLITS)
    fractions = check_fractions(name, fractions)
    if split_by == "classes":
        chosen = seeded_split(classes, fractions, seed, name, "classes")[split]
        return [i for i, c in enumerate(classes) if c in chosen]
    keep = []
    for key in sorted(set(classes), key=str):
        members = [i for i, c in enumerate(classes) if c == key]
        counts = [round(fractions[0] * len(members)), round(fractions[1] * len(members))]
        bounds = [0, counts[0], counts[0] + counts[1], len(members)]
        order = [members[i] for i in _permutation(len(members), seed, key)]
        part = SPLITS.index(split)
        keep += order[bounds[part] : bounds[part + 1]]
    if not keep:
        raise FamBenchError(
            f"The {split} split of the {name} dataset is empty: split_fractions "
            f"{list(fractions)} of {len(classes)} images (split_by=images rounds per class) "
            "leave it no image. Change data.options.split_fractions or add images."
        )
    return sorted(keep)


def _permutation(n: int, seed: int, key) -> list[int]:
    # per-class stream: the split of one class does not depend on the other classes
    stream = zlib.crc32(str(key).encode())
    return np.random.default_rng([int(seed), stream]).permutation(n).tolist()
