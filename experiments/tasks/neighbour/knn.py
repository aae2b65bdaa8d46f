"""The weighted kNN classifier of a self-supervised embedding, as the FAM authors run it.

The field classifies a contrastive encoder's test image by a weighted vote of its ``k``
most cosine-similar training images (Wu et al. 2018; DINO's ``knn_classifier``): each
neighbour votes for its label with weight ``exp(s / T)``. The first author's FAM code
(``contri_weight_generate`` in ly9802/DynamicAccumulatedAttentionMap) runs exactly that
(k = 20, T = 0.07 on the normalised DINO bank) and explains the prediction against the
predicted class's neighbours: the mean of their normalised bank embeddings.

Here the vote is normalised to a probability, ``p(c) = sum_{i in top-k, y_i = c} w_i /
sum_{i in top-k} w_i`` (a softmax of ``s / T`` over the ``k`` neighbours, so
``exp(1 / 0.07)`` never overflows), which the faithfulness metrics read with the bank held
fixed and the neighbours re-found for every perturbed image. Everything stays on the
embeddings' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_vote(
    emb: Tensor, bank_unit: Tensor, bank_labels: Tensor, k: int, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` nearest bank items of every embedding and their vote weights.

    Args:
        emb: ``(N, D)`` embeddings (normalised here).
        bank_unit: ``(M, D)`` L2-normalised bank embeddings; ``bank_labels`` ``(M,)``.
    Returns:
        ``(rows (N, k), labels (N, k), weights (N, k))``: bank rows by descending cosine,
        their labels, and ``softmax(s / T)`` over the ``k`` (they sum to 1).
    """
    # at least fp32 (bf16 autocast embeddings), float64 kept
    dtype = torch.promote_types(torch.promote_types(emb.dtype, bank_unit.dtype), torch.float32)
    sims = F.normalize(emb.to(dtype), dim=1) @ bank_unit.to(dtype).T
    top, rows = sims.topk(min(k, bank_unit.shape[0]), dim=1)
    return rows, bank_labels[rows], torch.softmax(top / temperature, dim=1)


def knn_probability(
    emb: Tensor,
    bank_unit: Tensor,
    bank_labels: Tensor,
    classes: Tensor,
    k: int,
    temperature: float,
) -> Tensor:
    """``(N,)``: the kNN classifier's probability of class ``classes[i]`` for ``emb[i]``."""
    _, labels, weights = knn_vote(emb, bank_unit, bank_labels, k, temperature)
    return (weights * (labels == classes[:, None].to(labels.device))).sum(1)


def knn_class_reference(
    emb: Tensor, bank_unit: Tensor, bank_labels: Tensor, k: int, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The prediction and the reference it is explained against.

    Returns ``(predicted (N,), reference (N, D), members (N, k) bank rows, member (N, k)
    bool)``: the class with the largest summed weight (ties: the smaller label), the mean
    of the normalised bank embeddings of its members among the ``k`` neighbours, and which
    of the neighbour rows those members are.
    """
    rows, labels, weights = knn_vote(emb, bank_unit, bank_labels, k, temperature)
    num_classes = int(bank_labels.max()) + 1
    votes = torch.zeros(len(emb), num_classes, device=weights.device, dtype=weights.dtype)
    votes.scatter_add_(1, labels, weights)
    predicted = votes.argmax(1)
    member = labels == predicted[:, None]
    count = member.sum(1, keepdim=True).to(bank_unit.dtype)
    reference = (bank_unit[rows] * member[..., None]).sum(1) / count
    return predicted, reference, rows, member
