"""SyntheticShapes: procedurally rendered shapes with exact masks (the embedded default).

The 100 classes (:mod:`experiments.data.shapes`: 10 shapes x 10 appearances) are split
64 / 16 / 20 (train / val / test) like miniImageNet by a fixed permutation that does not
depend on the dataset seed. An image is a pure function of ``(seed, class, index)``: the
uniforms it is drawn from come from a generator seeded by those integers alone, so it has
the same pixels whatever else is rendered with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from experiments.data.common import normalise_image
from experiments.data.seeding import derive_seed, generator
from experiments.data.shapes import (
    NUM_CLASSES,
    OBJECT_DRAWS,
    PAIR_DRAWS,
    SINGLE_DRAWS,
    class_name,
    render_pairs,
    render_single,
)
from fam.errors import FamBenchError

SPLIT_SIZES = {"train": 64, "val": 16, "test": 20}

# Fixed class assignment, independent of the dataset seed and of torch's RNG algorithms
# (pure-Python hash order), so the splits never change.
_SPLIT_ORDER = sorted(range(NUM_CLASSES), key=lambda c: derive_seed(20_230_711, c))

# Images rendered per batch: small enough that the temporaries stay in cache (about 3x
# faster on CPU than one large batch), large enough to amortise the per-op overhead.
_CHUNK = 256

# Dataset statistics of the rendered images (train split, seed 0, 32 px, 200 per class);
# rounded, fixed so that normalisation never depends on which images were rendered.
MEAN = (0.502, 0.501, 0.498)
STD = (0.259, 0.254, 0.257)


def split_classes(split: str) -> list[int]:
    """Global class ids ``0..99`` of a split (sorted)."""
    if split not in SPLIT_SIZES:
        raise FamBenchError(
            f"SyntheticShapes has splits 'train', 'val' and 'test', got split={split!r}."
        )
    start = {"train": 0, "val": 64, "test": 80}[split]
    return sorted(_SPLIT_ORDER[start : start + SPLIT_SIZES[split]])


def _draws(parts: Sequence[tuple[int, ...]], count: int) -> Tensor:
    """One row of ``count`` uniforms per identifying tuple, each from its own generator."""
    return torch.stack([torch.rand(count, generator=generator(*p)) for p in parts])


def _to_uint8(images: Tensor) -> Tensor:
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


class SyntheticShapes(Dataset):
    """Synthetic few-shot dataset with exact object masks.

    Args:
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        image_size: output side ``S`` in pixels (square images).
        images_per_class: images rendered per class (item ``i`` is image ``i % n`` of
            split class ``i // n``).
        seed: the dataset seed; image ``k`` of global class ``c`` depends only on
            ``(seed, c, k)``, pair images only on ``(seed, class_a, class_b, key)``.
        mode: ``"single"`` (one object per image) or ``"pairs"``, which also enables
            :meth:`pair`. Items ``ds[i]`` are single-object images in both modes (they are
            the support images of a pairs episode).
        normalise: return images normalised with ``MEAN`` / ``STD`` (default), or raw
            ``[0, 1]`` images (e.g. for SimCLR augmentations).
        max_classes: use only this many of the split's classes, evenly spaced over its
            class list (sorted by id, i.e. shape-major, so the subset spans the shapes):
            e.g. 10 training classes for a CIFAR-10-sized contrastive task. ``None``: all.
        clutter: the background's contrast, ``1`` (default) the full colour noise and
            blobs, ``0`` a plain mid-grey background (``0.5 + clutter * (bg - 0.5)``;
            objects are untouched, the masks unchanged).

    Items are dicts ``{"image": (3, S, S) float, "label": int, "index": int,
    "mask": (S, S) bool}``. An item is rendered when it is first asked for (only that
    item: an episode costs its own images, not its classes') and kept as uint8 in a
    least-recently-used cache of at most ``cache_bytes`` (``4 * S * S`` bytes an item);
    an evicted item is rendered again, with the same pixels (rendering is a pure function
    of the item, whatever else is rendered with it).
    """

    has_masks = True
    #: The shapes are analytic (resolution-free); their masks count as annotated at
    #: TorchRay's reference 224 px, so the pointing game's 15 px tolerance
    #: (metric.tolerance_at=annotation) is 15 * image_size / 224 input pixels.
    annotation_size = (224, 224)
    #: bound of the item cache (bytes): the default's training split at 32 px (15 MB) and
    #: a 600-image-per-class test split at 84 px (340 MB) fit; memory never grows past it
    cache_bytes: int = 512 * 2**20

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        images_per_class: int = 600,
        seed: int = 0,
        mode: Literal["single", "pairs"] = "single",
        normalise: bool = True,
        max_classes: int | None = None,
        clutter: float = 1.0,
    ) -> None:
        if mode not in ("single", "pairs"):
            raise FamBenchError(
                f"SyntheticShapes mode must be 'single' or 'pairs', got mode={mode!r}."
            )
        if int(image_size) < 8:
            raise FamBenchError(
                f"SyntheticShapes needs image_size >= 8 to draw recognisable shapes, got "
                f"{image_size}."
            )
        if int(images_per_class) < 1:
            raise FamBenchError(
                f"SyntheticShapes needs images_per_class >= 1, got {images_per_class}."
            )
        if not 0.0 <= float(clutter) <= 1.0:
            raise FamBenchError(f"SyntheticShapes clutter must be in [0, 1], got {clutter}.")
        self.clutter = float(clutter)
        self.split = split
        self.class_ids = split_classes(split)
        if max_classes is not None:
            total = len(self.class_ids)
            if not 1 <= int(max_classes) <= total:
                raise FamBenchError(
                    f"SyntheticShapes max_classes must be between 1 and the {total} classes "
                    f"of split {split!r}, got {max_classes}."
                )
            step = total / int(max_classes)
            self.class_ids = [self.class_ids[int(i * step)] for i in range(int(max_classes))]
        self.classes = [class_name(c) for c in self.class_ids]
        self.image_size = int(image_size)
        self.images_per_class = int(images_per_class)
        self.seed = int(seed)
        self.mode = mode
        self.normalise = normalise
        self.mean, self.std = MEAN, STD
        self.labels = torch.arange(len(self.class_ids)).repeat_interleave(self.images_per_class)
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self.rendered = 0  # items rendered so far (re-renders of evicted items included)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def render(
        self, labels: Tensor, indices: Tensor, with_object: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Render images ``indices`` (within their class) of split classes ``labels``.

        Returns ``[0, 1]`` images ``(N, 3, S, S)`` and masks ``(N, S, S)``, uncached.
        """
        global_ids = torch.tensor(self.class_ids)[torch.as_tensor(labels)]
        parts = [
            (self.seed, 1, c, k)
            for c, k in zip(global_ids.tolist(), torch.as_tensor(indices).tolist(), strict=True)
        ]
        draws = _draws(parts, SINGLE_DRAWS)
        chunks = [
            render_single(
                global_ids[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size, with_object
            )
            for i in range(0, len(parts), _CHUNK)
        ]
        images, masks = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._declutter(images, masks), masks

    def _declutter(self, images: Tensor, objects: Tensor) -> Tensor:
        """``clutter < 1``: the background pulled towards mid grey, objects untouched."""
        if self.clutter == 1.0:
            return images
        calm = 0.5 + self.clutter * (images - 0.5)
        return torch.where(objects[:, None], images, calm)

    def images_on_other_backgrounds(self, indices: Tensor, keys: Tensor) -> Tensor:
        """Items ``indices`` with their object (class, pose, size, colours) unchanged over
        another background, drawn from ``(seed, class, index, key)``: ``(B, 3, S, S)`` as
        items return them, uncached. The background swap of Ryali et al. (ICCV 2021) for
        self-supervised views (``task.background_swap``): a positive pair that shares only
        the object cannot be matched by its background."""
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        labels, ks = (
            [i // self.images_per_class for i in indices],
            [i % self.images_per_class for i in indices],
        )
        if not indices:
            return torch.empty(0, 3, self.image_size, self.image_size)
        global_ids = torch.tensor(self.class_ids)[torch.tensor(labels)]
        parts = list(zip(global_ids.tolist(), ks, strict=True))
        own = _draws([(self.seed, 1, c, k) for c, k in parts], SINGLE_DRAWS)
        other = _draws(
            [(self.seed, 3, c, k, int(key)) for (c, k), key in zip(parts, keys, strict=True)],
            SINGLE_DRAWS,
        )
        draws = torch.cat([own[:, :OBJECT_DRAWS], other[:, OBJECT_DRAWS:]], 1)
        chunks = [
            render_single(global_ids[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size)
            for i in range(0, len(parts), _CHUNK)
        ]
        images, masks = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._finish(_to_uint8(self._declutter(images, masks)).float() / 255)

    def _items(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Items ``indices`` as ``(uint8 image, mask)`` pairs, through the LRU cache.

        The ones not cached are rendered together, in chunks (about 9x faster an image
        than one at a time on CPU), with the same pixels as alone.
        """
        found: dict[int, tuple[Tensor, Tensor]] = {}
        missing = []
        for index in dict.fromkeys(int(i) for i in indices):
            cached = self._cache.get(index)
            if cached is None:
                missing.append(index)
            else:
                self._cache.move_to_end(index)
                found[index] = cached
        if missing:
            labels, ks = zip(*(divmod(i, self.images_per_class) for i in missing), strict=True)
            images, masks = self.render(torch.tensor(labels), torch.tensor(ks))
            images = _to_uint8(images)
            self.rendered += len(missing)
            for row, index in enumerate(missing):
                found[index] = self._cache[index] = (images[row], masks[row])
            item_bytes = 4 * self.image_size**2
            while len(self._cache) * item_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return [found[int(i)] for i in indices]

    def _finish(self, image: Tensor) -> Tensor:
        return normalise_image(image, self.mean, self.std) if self.normalise else image

    def _check_index(self, index: int) -> int:
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return int(index)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Items ``indices`` (the DataLoader's batched fetch): rendered together."""
        indices = [self._check_index(i) for i in indices]
        return [
            {
                "image": self._finish(image.float() / 255),
                "label": index // self.images_per_class,
                "index": index,
                "mask": mask,
            }
            for index, (image, mask) in zip(indices, self._items(indices), strict=True)
        ]

    def images_at(self, indices: Tensor) -> Tensor:
        """Images at ``indices``: ``(B,) -> (B, 3, S, S)`` as items return them (one
        render of the uncached ones; :func:`experiments.embedding.gather`)."""
        indices = [self._check_index(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if not indices:
            return torch.empty(0, 3, self.image_size, self.image_size)
        images = torch.stack([image for image, _ in self._items(indices)])
        return self._finish(images.float() / 255)

    def pairs(self, class_a: Tensor, class_b: Tensor, keys: Tensor) -> dict:
        """Batch of pair images (see :meth:`pair`); arguments are ``(N,)`` int tensors.

        Returns ``image (N, 3, S, S)``, ``label``/``other_label`` ``(N,)``, ``mask`` /
        ``other_mask`` ``(N, S, S)`` bool.
        """
        if self.mode != "pairs":
            raise FamBenchError(
                "SyntheticShapes.pair needs mode='pairs' (set data.mode=pairs); this dataset "
                "was built with mode='single'."
            )
        class_a, class_b = torch.as_tensor(class_a).long(), torch.as_tensor(class_b).long()
        if bool((class_a == class_b).any()):
            raise FamBenchError("SyntheticShapes.pair needs two different classes per image.")
        ids = torch.tensor(self.class_ids)
        ga, gb = ids[class_a], ids[class_b]
        parts = [
            (self.seed, 2, a, b, k)
            for a, b, k in zip(
                ga.tolist(), gb.tolist(), torch.as_tensor(keys).tolist(), strict=True
            )
        ]
        draws = _draws(parts, PAIR_DRAWS)
        chunks = [
            render_pairs(
                ga[i : i + _CHUNK], gb[i : i + _CHUNK], draws[i : i + _CHUNK], self.image_size
            )
            for i in range(0, len(parts), _CHUNK)
        ]
        images, mask_a, mask_b = (torch.cat([c[j] for c in chunks]) for j in range(3))
        images = self._declutter(images, mask_a | mask_b)
        images = _to_uint8(images).float() / 255  # identical pixels to cached singles
        return {
            "image": self._finish(images),
            "label": class_a,
            "mask": mask_a,
            "other_label": class_b,
            "other_mask": mask_b,
        }

    def pair(self, class_a: int, class_b: int, key: int) -> dict:
        """One image with an object of split class ``class_a`` and one of ``class_b``.

        Deterministic in ``(seed, class_a, class_b, key)``. The objects never overlap, so
        ``mask`` (of class_a) and ``other_mask`` are exact and disjoint.

        Returns ``dict(image=(3, S, S), label=class_a, mask=(S, S), other_label=class_b,
        other_mask=(S, S))``.
        """
        out = self.pairs(torch.tensor([class_a]), torch.tensor([class_b]), torch.tensor([key]))
        return {
            "image": out["image"][0],
            "label": int(class_a),
            "mask": out["mask"][0],
            "other_label": int(class_b),
            "other_mask": out["other_mask"][0],
        }
