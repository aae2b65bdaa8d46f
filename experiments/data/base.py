"""What every on-disk dataset shares: decoding, resizing, masks from boxes, clear errors.

Images are resized to ``image_size x image_size`` as a whole (no crop, aspect ratio not
kept), so a ground-truth box maps linearly and the object is never cut off; the mask is
rasterised at the output size after the same resize: output pixel ``(i, j)`` is inside
the box iff its centre, mapped back to the original image, is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from experiments.data.common import IMAGENET_MEAN, IMAGENET_STD, normalise_image
from fam.errors import FamBenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def dataset_error(
    name: str, path: Path | str, problem: str, layout: str, source: str
) -> FamBenchError:
    """The one-paragraph error for a missing or malformed dataset."""
    return FamBenchError(
        f"Cannot read the {name} dataset at {path}: {problem}. Expected layout: {layout}. "
        f"Get it from {source}, then point data.root at the folder that holds it "
        f"(nothing is downloaded automatically)."
    )


def box_mask(box: Tensor, original_size: tuple[int, int], size: int) -> Tensor:
    """Rasterise a box at the output size.

    Args:
        box: ``(4,)`` ``(x, y, width, height)`` in original pixel units, ``(x, y)`` the
            top-left corner (0-based, pixel edges).
        original_size: ``(height, width)`` of the original image.
        size: output side ``S``.

    Returns:
        ``(S, S)`` bool mask of the output pixels whose centres fall inside the box.
    """
    height, width = original_size
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    xs = centres * (width / size)
    ys = centres * (height / size)
    x, y, w, h = (float(v) for v in box)
    inside_x = (xs >= x) & (xs < x + w)
    inside_y = (ys >= y) & (ys < y + h)
    return inside_y[:, None] & inside_x[None, :]


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """Resize a soft or binary mask ``(h, w)`` in ``[0, 1]`` to ``(S, S)`` bool (>= 0.5)."""
    resized = TF.resize(mask[None].float(), [size, size], antialias=True)
    return resized[0] >= 0.5


def read_image(path: Path, mode: str = "RGB") -> Tensor:
    """Decode an image file to a uint8 tensor ``(C, h, w)``; unreadable files are errors."""
    try:
        with Image.open(path) as image:
            return TF.pil_to_tensor(image.convert(mode))
    except (OSError, UnidentifiedImageError) as err:
        raise FamBenchError(
            f"Cannot decode the image file {path} ({err}); the dataset copy is damaged or "
            f"incomplete: re-extract it."
        ) from err


class ImageDataset(Dataset):
    """Base of the on-disk datasets.

    Subclasses set ``labels`` (``(N,)`` long), ``classes``, and implement ``raw(index)``
    returning a uint8 image ``(3, h, w)`` and optionally a box ``(4,)`` (x, y, w, h) or a
    soft mask ``(h, w)`` in ``[0, 1]``. Items are ``{"image": (3, S, S), "label", "index"}``
    plus ``"mask": (S, S) bool`` when ``has_masks``.
    """

    has_masks = False

    def __init__(
        self,
        image_size: int,
        normalise: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if int(image_size) < 1:
            raise FamBenchError(
                f"image_size must be a positive number of pixels, got {image_size}."
            )
        self.image_size = int(image_size)
        self.normalise = normalise
        self.mean, self.std = tuple(mean), tuple(std)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, index: int) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, annotation = self.raw(int(index))
        size = self.image_size
        resized = TF.resize(image, [size, size], antialias=True).float() / 255
        if self.normalise:
            resized = normalise_image(resized, self.mean, self.std)
        item = {"image": resized, "label": int(self.labels[index]), "index": int(index)}
        if self.has_masks:
            if annotation is None:
                mask = torch.zeros(size, size, dtype=torch.bool)
            elif annotation.dim() == 1:
                mask = box_mask(annotation, (image.shape[1], image.shape[2]), size)
            else:
                mask = resize_mask(annotation, size)
            item["mask"] = mask
            # the resolution the mask or box was drawn at (the pointing game's tolerance)
            item["annotation_size"] = (int(image.shape[1]), int(image.shape[2]))
        return item


class ArrayDataset(ImageDataset):
    """Images held in a uint8 array ``(N, h, w, 3)`` (or a memory map of one)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        normalise: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(image_size, normalise, mean, std)
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.classes = list(classes)

    def raw(self, index: int) -> tuple[Tensor, None]:
        # a copy: the array may be a read-only memory map
        return torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1), None


class FileDataset(ImageDataset):
    """Images listed as files, with optional boxes ``(N, 4)`` or mask files."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        normalise: bool = True,
        boxes: Tensor | None = None,
        mask_paths: Sequence[Path | None] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(image_size, normalise, mean, std)
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.classes = list(classes)
        self.boxes = boxes
        self.mask_paths = mask_paths
        self.has_masks = boxes is not None or mask_paths is not None

    def raw(self, index: int) -> tuple[Tensor, Tensor | None]:
        image = read_image(self.paths[index])
        if self.mask_paths is not None:
            path = self.mask_paths[index]
            if path is not None:
                return image, read_image(path, "L")[0].float() / 255
            # no segmentation for this image: fall back to its box when there is one
        if self.boxes is not None:
            return image, self.boxes[index]
        return image, None
