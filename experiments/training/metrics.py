"""Task accuracy of an embedding network on few-shot episodes, and its confidence
interval.

``fewshot_accuracy`` embeds images once (eval mode, no gradients, on the model's device)
and works on the embeddings there; only the final numbers leave the device. The
neighbour tasks' metrics (kNN, Recall@K, the linear probe) are in
:mod:`experiments.tasks.neighbour.task_metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from experiments.embedding import embed
from fam.errors import FamBenchError
from fam.similarity import SimilarityLike, pairwise


def mean_ci95(values: Tensor) -> dict[str, float]:
    """Mean and normal-approximation 95% half-width ``1.96 * std / sqrt(n)`` (the few-shot
    literature's convention)."""
    values = values.double()
    n = values.numel()
    mean = values.mean()
    std = values.std(unbiased=True) if n > 1 else torch.zeros_like(mean)
    return {"mean": float(mean), "ci95": float(1.96 * std / math.sqrt(n)), "n": n}


def fewshot_accuracy(
    model: nn.Module, dataset: Any, sampler: Any, similarity: SimilarityLike = "euclidean"
) -> dict[str, float]:
    """Nearest-prototype accuracy over every episode of ``sampler`` (an ``EpisodeSampler``).

    Prototypes are mean support embeddings; a query is assigned to the most similar one.
    Each image is embedded once (eval mode, so an embedding does not depend on its
    episode). Returns ``{"mean", "ci95", "n"}`` over episodes.
    """
    episodes = [sampler.episode(e) for e in range(len(sampler))]
    if not episodes:
        raise FamBenchError("The episode sampler has no episodes; set num_episodes >= 1.")
    used = torch.unique(torch.cat([ep.indices for ep in episodes]))
    emb = embed(model, dataset, used)
    row = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    row[used] = torch.arange(len(used))
    row = row.to(emb.device)
    accuracies = []
    for ep in episodes:
        support = emb[row[ep.support.to(emb.device)]]
        query = emb[row[ep.query.to(emb.device)]]
        prototypes = support.view(ep.n_way, -1, support.shape[1]).mean(dim=1)
        target = ep.query_labels.to(emb.device)
        pred = pairwise(similarity, query, prototypes).argmax(dim=1)
        accuracies.append((pred == target).float().mean())
    return mean_ci95(torch.stack(accuracies).cpu())
