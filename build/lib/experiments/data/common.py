"""Normalisation helpers shared by every dataset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalise_image(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``[0, 1]`` images ``(3, H, W)`` or ``(N, 3, H, W)`` -> ``(x - mean) / std``."""
    return (images - _stats(mean, images)) / _stats(std, images)


def denormalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalise_image`: back to ``[0, 1]`` (up to rounding)."""
    return images * _stats(std, images) + _stats(mean, images)
