"""The training of the ``retrieval`` family: deep metric learning with
pytorch-metric-learning's losses and miners (``task.loss``, ``task.miner``,
``task.margin``) in :class:`MetricLearningModule`. Another pml loss is added as a row
of :data:`LOSSES`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from experiments.embedding import embed
from experiments.training.base import TaskModule
from experiments.training.batches import labels_of
from fam.errors import FamBenchError

# loss name -> (pml loss class, its margin keyword, the miner used when none is named)
LOSSES: dict[str, tuple[str, str | None, str]] = {
    "multi_similarity": ("MultiSimilarityLoss", None, "multi_similarity"),
    "contrastive": ("ContrastiveLoss", "neg_margin", "none"),
    "triplet": ("TripletMarginLoss", "margin", "triplet"),
    "proxy_anchor": ("ProxyAnchorLoss", "margin", "none"),
}
#: losses with learned class proxies (built with the number of classes and the dimension)
PROXY_LOSSES = ("proxy_anchor",)
#: Proxy Anchor (Kim et al., CVPR 2020) trains its proxies 100x faster than the network
PROXY_LR_SCALE = 100.0
MINERS = ("multi_similarity", "triplet", "none")


def build_loss_and_miner(
    loss: str = "multi_similarity",
    miner: str | None = None,
    margin: float | None = None,
    num_classes: int | None = None,
    embedding_dim: int | None = None,
) -> tuple[nn.Module, Any]:
    """pml loss and miner by name; ``margin=None`` keeps pml's defaults.

    ``multi_similarity``: MultiSimilarityLoss(alpha=2, beta=50, base=0.5) with
    MultiSimilarityMiner(epsilon=0.1) (Wang et al., CVPR 2019). ``contrastive``:
    ContrastiveLoss(pos_margin=0, neg_margin=margin or 1), no miner. ``triplet``:
    TripletMarginLoss(margin or 0.05) with a semi-hard TripletMarginMiner at the same
    margin. ``proxy_anchor``: ProxyAnchorLoss(num_classes, embedding_dim, margin or 0.1,
    alpha=32) with learned class proxies (training-only: retrieval still compares a query
    with gallery images), no miner. ``miner="none"`` uses all pairs/triplets of the batch.
    """
    from pytorch_metric_learning import losses, miners

    if loss not in LOSSES:
        raise FamBenchError(f"Unknown retrieval loss {loss!r}; use one of {sorted(LOSSES)}.")
    cls_name, margin_kw, default_miner = LOSSES[loss]
    miner = default_miner if miner is None else miner
    if miner not in MINERS:
        raise FamBenchError(f"Unknown retrieval miner {miner!r}; use one of {MINERS}.")
    if margin is not None and margin_kw is None and miner != "triplet":
        # it would enter the cache key and the table while changing nothing
        raise FamBenchError(
            f"task.margin does not apply to loss {loss!r} (it has no margin) with miner "
            f"{miner!r}; drop task.margin, or use task.miner=triplet (whose margin it sets)."
        )
    if miner == "triplet" and margin is None and margin_kw != "margin":
        raise FamBenchError(
            f"task.miner=triplet needs task.margin with loss {loss!r}, which has no triplet "
            "margin of its own to mine at; e.g. task.margin=0.05 (the triplet loss's)."
        )
    kwargs = {margin_kw: margin} if (margin is not None and margin_kw) else {}
    if loss in PROXY_LOSSES:
        if num_classes is None or embedding_dim is None:
            raise FamBenchError(f"Loss {loss!r} needs num_classes and embedding_dim.")
        kwargs = {"num_classes": num_classes, "embedding_size": embedding_dim, **kwargs}
    criterion = getattr(losses, cls_name)(**kwargs)
    if miner == "multi_similarity":
        return criterion, miners.MultiSimilarityMiner()
    if miner == "triplet":
        mining_margin = margin if margin is not None else criterion.margin
        return criterion, miners.TripletMarginMiner(
            margin=mining_margin, type_of_triplets="semihard"
        )
    return criterion, None


class MetricLearningModule(TaskModule):
    """pml loss on the embeddings of a class-balanced batch (``MPerClassSampler``).

    The embedding the loss sees is the model's output (no head): pml's default distances
    for these losses are cosine-like (normalised embeddings), matching cosine retrieval.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str = "multi_similarity",
        miner: str | None = None,
        margin: float | None = None,
        train_set: Any = None,
        **optim,
    ) -> None:
        super().__init__(model, **optim)
        sizes = {}
        if loss in PROXY_LOSSES:
            if train_set is None:
                raise FamBenchError(f"Loss {loss!r} needs the training set (its classes).")
            sizes = {
                "num_classes": int(labels_of(train_set).max()) + 1,
                "embedding_dim": int(embed(model, train_set, torch.arange(2)).shape[1]),
            }
        self.criterion, self.miner = build_loss_and_miner(loss, miner, margin, **sizes)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        emb = self.model(self.images(images)).float()
        pairs = self.miner(emb, labels) if self.miner is not None else None
        return self.criterion(emb, labels, pairs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = super().configure_optimizers()
        proxies = [p for p in self.criterion.parameters() if p.requires_grad]
        if proxies:
            ids = {id(p) for p in proxies}
            group = optimizer.param_groups[0]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": proxies, "lr": self.lr * PROXY_LR_SCALE})
        return optimizer
