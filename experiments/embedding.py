"""The one ``embed`` helper (embeddings of images or dataset items, batched, no grads)
and :func:`gather`, the batch access to dataset items it and the training loaders use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fam.layers import eval_mode, model_device


def gather(dataset: Any, indices: Tensor | Sequence[int]) -> Tensor:
    """Images at ``indices``: ``(B,) -> (B, 3, H, W)`` float, normalised as the dataset
    returns them."""
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if hasattr(dataset, "images_at"):
        return dataset.images_at(indices)
    return torch.stack([dataset[i]["image"] for i in indices.tolist()])


@torch.no_grad()
def embed(
    model: nn.Module, source: Tensor | Any, indices: Tensor | None = None, batch_size: int = 256
) -> Tensor:
    """Embeddings ``(B, D)`` (float32) in eval mode, ``batch_size`` images per forward pass.

    ``source``: images ``(B, 3, H, W)`` already on the model's device, or a dataset whose
    items ``indices`` (all by default) are gathered batch by batch onto that device.
    """
    chunks = []
    with eval_mode(model):
        if isinstance(source, Tensor):
            for start in range(0, len(source), batch_size):
                chunks.append(model(source[start : start + batch_size]).float())
        else:
            indices = torch.arange(len(source)) if indices is None else indices
            device = model_device(model) or torch.device("cpu")
            for start in range(0, len(indices), batch_size):
                images = gather(source, indices[start : start + batch_size]).to(device)
                chunks.append(model(images).float())
    return torch.cat(chunks)
