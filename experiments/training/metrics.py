"""Task accuracy of an embedding network: kNN, Recall@K, the linear probe.

Each embeds images once (eval mode, no gradients, on the model's device) and works on
the embeddings there; only the final numbers leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments.embedding import embed
from experiments.training.batches import labels_of
from fam.errors import FamBenchError


def knn_accuracy(
    model: nn.Module, train_set: Any, test_set: Any, k: int = 20, temperature: float = 0.1
) -> float:
    """Top-1 accuracy of a weighted kNN classifier on L2-normalised embeddings.

    lightly's ``knn_predict`` (InstDisc/SimCLR monitor): the ``k`` most cosine-similar
    training embeddings vote with weight ``exp(sim / temperature)``.
    """
    from lightly.utils.benchmarking import knn_predict

    bank = F.normalize(embed(model, train_set), dim=1)
    bank_labels = labels_of(train_set).to(bank.device)
    query = F.normalize(embed(model, test_set), dim=1)
    query_labels = labels_of(test_set).to(bank.device)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, len(bank))
    correct = torch.zeros((), device=bank.device)
    bank_t = bank.T.contiguous()
    for start in range(0, len(query), 1024):  # bounds the (B, N) similarity matrix
        pred = knn_predict(
            query[start : start + 1024],
            bank_t,
            bank_labels,
            num_classes,
            knn_k=k,
            knn_t=temperature,
        )[:, 0]
        correct += (pred == query_labels[start : start + 1024]).sum()
    return float(correct) / len(query)


def recall_at_k(
    model: nn.Module,
    query_set: Any,
    gallery_set: Any | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    exclude_self: bool | None = None,
) -> dict[str, float]:
    """Recall@K of cosine retrieval, plus pytorch-metric-learning's ``precision_at_1``.

    Recall@K (the CUB/Cars/SOP protocol) is the fraction of queries with at least one
    gallery item of the same label among their K nearest neighbours. The neighbours come
    from pml's ``CustomKNN(CosineSimilarity())`` (the knn its ``AccuracyCalculator`` uses;
    pml has no recall@k by name), and ``precision_at_1`` from ``AccuracyCalculator``
    itself; the two agree on Recall@1 by construction. ``gallery_set=None`` or the same
    object as ``query_set`` means leave-one-out on one set (``exclude_self`` defaults to
    True then: a query never retrieves itself).
    Returns ``{"recall@1": ..., ..., "precision_at_1": ...}``.
    """
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    same = gallery_set is None or gallery_set is query_set
    if exclude_self is None:
        exclude_self = same
    if exclude_self and not same:
        raise FamBenchError(
            "exclude_self=True needs the gallery to be the query set (leave-one-out); "
            "pass gallery_set=None or the same dataset object."
        )
    query = embed(model, query_set)
    query_labels = labels_of(query_set).to(query.device)
    gallery, gallery_labels = (
        (query, query_labels)
        if same
        else (embed(model, gallery_set), labels_of(gallery_set).to(query.device))
    )
    ks = sorted({int(k) for k in ks})
    available = gallery.shape[0] - int(exclude_self)
    if ks[0] < 1 or ks[-1] > available:
        raise FamBenchError(
            f"Recall@K needs 1 <= K <= the number of gallery images a query can retrieve "
            f"({available}); got ks={ks}. Lower the largest K (task.recall_ks) or use a "
            "larger gallery."
        )
    knn = CustomKNN(CosineSimilarity(), batch_size=1024)
    _, indices = knn(query, ks[-1], gallery, ref_includes_query=exclude_self)
    hits = gallery_labels[indices] == query_labels[:, None]  # (Q, K_max)
    result = {f"recall@{k}": int(hits[:, :k].any(dim=1).sum()) / len(query) for k in ks}
    calculator = AccuracyCalculator(
        include=("precision_at_1",), k=1, knn_func=knn, device=query.device
    )
    result["precision_at_1"] = float(
        calculator.get_accuracy(
            query,
            query_labels,
            gallery,
            gallery_labels,
            ref_includes_query=exclude_self,
        )["precision_at_1"]
    )
    return result


def linear_probe_accuracy(
    model: nn.Module, train_set: Any, test_set: Any, max_iter: int = 1000, c: float = 1.0
) -> float:
    """Linear-probe accuracy: scikit-learn ``LogisticRegression`` on frozen embeddings.

    The standard SSL evaluation (SimCLR, Chen et al. 2020): the encoder is frozen, a
    multinomial logistic regression (lbfgs, L2 ``C=c``) is fitted on the standardised
    embeddings of ``train_set`` and scored (top-1) on ``test_set``; both must share their
    label space. Deterministic (lbfgs has no randomness).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = embed(model, train_set).cpu().double().numpy()
    test = embed(model, test_set).cpu().double().numpy()
    scaler = StandardScaler().fit(train)
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(scaler.transform(train), labels_of(train_set).numpy())
    return float(probe.score(scaler.transform(test), labels_of(test_set).numpy()))
