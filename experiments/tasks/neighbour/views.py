"""SimCLR's two augmented views of each training image (the contrastive loader's dataset).

:class:`TwoViews` builds lightly's ``SimCLRTransform`` augmentation on tensors, with an
optional background swap for datasets that re-render an object over other backgrounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from experiments.data.common import denormalise, normalise_image
from experiments.embedding import gather
from experiments.training.batches import labels_of
from fam.errors import FamBenchError


def _background_source(dataset: Any) -> tuple[Any, Any]:
    """The dataset that can re-render an item over another background, and the map from
    ``dataset``'s indices to its own (through ``torch.utils.data.Subset`` views)."""
    from torch.utils.data import Subset

    maps = []
    while isinstance(dataset, Subset):  # torch's Subset (the suite's own maps its indices)
        maps.append(torch.as_tensor(dataset.indices, dtype=torch.long))
        dataset = dataset.dataset
    if not hasattr(dataset, "images_on_other_backgrounds"):
        raise FamBenchError(
            f"task.background_swap needs a dataset that renders an object over other "
            f"backgrounds (the synthetic shapes); {type(dataset).__name__} cannot. Set "
            "task.background_swap=0."
        )

    def to_base(index: Tensor) -> Tensor:
        for table in reversed(maps):
            index = table[index]
        return index

    return dataset, to_base


def simclr_blur_kernel(image_size: int) -> int:
    """SimCLR blurs with a kernel of 10% of the image side (odd, at least 3)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _normalisation(dataset: Any) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``(3, 1, 1)`` of the dataset's output; identity for a dataset
    built to return raw ``[0, 1]`` images (``normalise=False``)."""
    if not getattr(dataset, "normalise", True):
        return torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    mean = torch.as_tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0)), dtype=torch.float)
    std = torch.as_tensor(getattr(dataset, "std", (1.0, 1.0, 1.0)), dtype=torch.float)
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


class TwoViews(Dataset):
    """Two SimCLR augmentations of each image: ``(view_a, view_b, label)``.

    The datasets return normalised tensors while lightly's ``SimCLRTransform`` works on PIL
    images, so the same augmentation is built from ``torchvision.transforms.v2`` on tensors
    with lightly's ``SimCLRTransform`` defaults: RandomResizedCrop(scale=(min_scale, 1)),
    horizontal flip 0.5, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 (s = cj_strength),
    grayscale p=0.2, Gaussian blur sigma in (0.1, 2) with p=gaussian_blur (kernel 10% of
    the side). ``gaussian_blur=None`` means 0.5 above 32 px and 0 at 32 px and below (the
    SimCLR paper drops the blur for CIFAR, as lightly's CIFAR examples do).
    ``background_swap``: the probability that the second view starts from the same object
    over another background (Ryali et al., ICCV 2021; datasets with
    ``images_on_other_backgrounds``, i.e. the synthetic shapes). Each view is
    un-normalised to [0, 1], augmented per sample, and normalised again, so views look like
    the dataset's own images (raw ones stay raw).
    """

    def __init__(
        self,
        dataset: Any,
        image_size: int,
        min_scale: float = 0.08,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        random_gray_scale: float = 0.2,
        gaussian_blur: float | None = None,
        hf_prob: float = 0.5,
        background_swap: float = 0.0,
    ) -> None:
        from torchvision.transforms import v2

        self.dataset = dataset
        self.background_swap = float(background_swap)
        self._swap = _background_source(dataset) if background_swap > 0 else None
        self.labels = labels_of(dataset)
        self.mean, self.std = _normalisation(dataset)
        if gaussian_blur is None:
            gaussian_blur = 0.5 if image_size > 32 else 0.0
        s = cj_strength
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(hf_prob),
                v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cj_prob),
                v2.RandomGrayscale(random_gray_scale),
                v2.RandomApply(
                    [v2.GaussianBlur(simclr_blur_kernel(image_size), (0.1, 2.0))], p=gaussian_blur
                ),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def _view(self, image: Tensor) -> Tensor:
        raw = denormalise(image, self.mean, self.std).clamp(0.0, 1.0)
        return normalise_image(self.transform(raw), self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """A batch's samples from one :func:`gather` (the same random views, in the same
        order, as one sample at a time)."""
        images = gather(self.dataset, indices)
        second = images
        if self._swap is not None:
            base, to_base = self._swap
            swap = torch.rand(len(indices)) < self.background_swap
            keys = torch.randint(0, 2**31 - 1, (len(indices),))
            chosen = torch.as_tensor(list(indices), dtype=torch.long)[swap]
            second = images.clone()
            second[swap] = base.images_on_other_backgrounds(to_base(chosen), keys[swap])
        return [
            (self._view(a), self._view(b), self.labels[i])
            for a, b, i in zip(images, second, indices, strict=True)
        ]
