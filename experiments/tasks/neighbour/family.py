"""The ``contrastive`` and ``retrieval`` task families and their configs
(``conf/task/contrastive.yaml``, ``conf/task/retrieval.yaml``): training data, training
module, monitor, data checks and the evaluation of each (what they explain and score:
:mod:`experiments.tasks.neighbour`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.embedding import embed
from experiments.tasks.base import TaskFamily, query_order
from experiments.tasks.neighbour.contrastive_algorithms import ALGORITHMS
from experiments.tasks.neighbour.holdout import Subset, holdout_split
from experiments.tasks.neighbour.metric_learning import MetricLearningModule
from experiments.tasks.neighbour.queries import NeighbourEvaluation
from experiments.tasks.neighbour.task_metrics import (
    knn_accuracy,
    linear_probe_accuracy,
    recall_at_k,
)
from experiments.tasks.neighbour.views import TwoViews
from experiments.training.batches import IndexedBatches, image_size_of, pass_through
from fam.errors import FamBenchError

#: softmax temperature of the retrieval probability when ``metric.temperature`` is null:
#: the multi-similarity, contrastive and triplet losses have no temperature of their own;
#: 0.05 is about the spread of a trained model's cosines to its nearest gallery items.
RETRIEVAL_TEMPERATURE = 0.01


@dataclass
class ContrastiveConfig:
    """``conf/task/contrastive.yaml`` (SimCLR, Chen et al. 2020; MoCo v2, BYOL, SimSiam:
    :mod:`experiments.tasks.neighbour.contrastive_algorithms`)."""

    name: str = "contrastive"
    algorithm: str = "simclr"
    similarity: str = "cosine"
    temperature: float = 0.5
    projection_dim: int = 128
    bank_size: int | None = None
    #: the explained reference: "knn_class" (the kNN-predicted class) or "nearest"
    reference: str = "knn_class"
    knn_k: int = 20
    knn_temperature: float = 0.07
    holdout_per_class: int = 0
    probe_max_iter: int = 1000
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    random_gray_scale: float = 0.2
    gaussian_blur: float | None = None
    hf_prob: float = 0.5
    #: probability that a positive pair shares only the object (another background)
    background_swap: float = 0.0
    monitor_every: int = 0
    #: moco, byol: momentum of the key/target encoder (byol: start of its cosine schedule)
    momentum: float = 0.99
    #: moco: keys in the queue (negatives)
    queue_size: int = 4096

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise FamBenchError(
                f"task.algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}."
            )
        if self.holdout_per_class < 0:
            raise FamBenchError(
                f"task.holdout_per_class must be >= 0, got {self.holdout_per_class}."
            )
        cosine_only(self.similarity, "kNN accuracy and the linear probe's features")
        if self.reference not in ("knn_class", "nearest"):
            raise FamBenchError(
                f"task.reference must be 'knn_class' (the weighted kNN prediction's class) or "
                f"'nearest' (the nearest bank image), got {self.reference!r}."
            )
        if self.knn_k < 1 or not self.knn_temperature > 0:
            raise FamBenchError(
                f"task.knn_k must be >= 1 and task.knn_temperature > 0 (got {self.knn_k} and "
                f"{self.knn_temperature})."
            )
        # the algorithm's own option checks
        ALGORITHMS[self.algorithm].check_config(self)


@dataclass
class RetrievalConfig:
    """``conf/task/retrieval.yaml`` (deep metric learning, pytorch-metric-learning)."""

    name: str = "retrieval"
    similarity: str = "cosine"
    loss: str = "multi_similarity"
    miner: str | None = None
    margin: float | None = None
    samples_per_class: int = 4
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    monitor_every: int = 0

    def __post_init__(self) -> None:
        cosine_only(self.similarity, "the gallery ranking, Recall@K")


def cosine_only(similarity: str, ranked_by: str) -> None:
    """The neighbour tasks rank by cosine (``ranked_by``, the distractors, the reference);
    explaining another similarity would explain a score the model does not decide by."""
    if similarity != "cosine":
        raise FamBenchError(
            f"task.similarity={similarity} is not what this task ranks by: {ranked_by}, the "
            "reference and the distractors all use the cosine of the embeddings. Drop "
            "task.similarity (it is cosine here); few-shot ProtoNet takes euclidean."
        )


def _batch_size_error(trainer_key: str, message: str) -> FamBenchError:
    return FamBenchError(f"{message} Change {trainer_key}.")


class Contrastive(TaskFamily):
    name = "contrastive"
    Config = ContrastiveConfig
    # which reference is explained: the same encoder serves both
    evaluation_keys = ("reference",)
    #: the views are drawn in the loader workers, one random stream per worker
    trainer_identity_keys = ("num_workers",)

    def training_part(self, train_set: Any) -> Any:
        """The images the encoder trains on and the bank holds (all but the held out)."""
        h = self.config.holdout_per_class
        return train_set if h == 0 else Subset(train_set, holdout_split(train_set, h)[0])

    def training_module(self, model, train_set, optim):
        dim = embed(model, train_set, torch.arange(2)).shape[1]
        return ALGORITHMS[self.config.algorithm].from_config(model, dim, self.config, optim)

    def protocol(self, eval_cfg):
        # one leaderboard table per algorithm: the same network trained otherwise; the
        # explained reference (and the kNN that picks it) changes every number
        c = self.config
        knn = {"knn_k": c.knn_k, "knn_temperature": c.knn_temperature}
        return {
            "algorithm": c.algorithm,
            "reference": c.reference,
            **(knn if c.reference == "knn_class" else {}),
            **unit_protocol(eval_cfg),
        }

    def train_loader(self, train_set, trainer, seed):
        train_set = self.training_part(train_set)
        if len(train_set) < trainer.batch_size:
            raise _batch_size_error(
                "trainer.batch_size",
                f"SimCLR batch size {trainer.batch_size} exceeds the {len(train_set)} "
                "training images.",
            )
        c = self.config
        views = TwoViews(
            train_set,
            image_size_of(train_set),
            min_scale=c.min_scale,
            cj_prob=c.cj_prob,
            cj_strength=c.cj_strength,
            random_gray_scale=c.random_gray_scale,
            gaussian_blur=c.gaussian_blur,
            hf_prob=c.hf_prob,
            background_swap=c.background_swap,
        )
        w = trainer.num_workers
        return DataLoader(
            views,
            batch_size=trainer.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=w,
            persistent_workers=w > 0,
        )

    def monitor(self, train_set, val_set, seed):
        c = self.config
        return "val_knn_accuracy", lambda m: knn_accuracy(
            m, self.training_part(train_set), val_set, c.knn_k, c.knn_temperature
        )

    def check_data(self, run, train_set, eval_set):
        if getattr(eval_set, "mode", "single") == "pairs":
            raise FamBenchError(
                "data.options.mode=pairs is a few-shot and retrieval variant (a second object "
                "of another class in the query); the contrastive task scores single-object "
                "images and would ignore it. Drop data.options.mode."
            )
        same_classes(train_set, eval_set, run.data)

    def evaluation(self, run, train_set, eval_set, model, device):
        c = self.config
        if c.holdout_per_class > 0:
            bank_set = self.training_part(train_set)
            query_set = Subset(eval_set, holdout_split(eval_set, c.holdout_per_class)[1])
        else:
            bank_set, query_set = train_set, eval_set
        queries = query_order(len(query_set), run.eval.num_queries, run.seed)
        # the bank draws from the next seed's query stream (fixed: it defines earlier runs)
        bank = (
            None if c.bank_size is None else query_order(len(bank_set), c.bank_size, run.seed + 1)
        )
        ev = NeighbourEvaluation(
            "contrastive",
            query_set,
            bank_set,
            queries,
            run.eval.unit_size,
            c.similarity,
            score=run.metric.score,
            distractors=run.metric.distractors,
            other_classes=run.metric.distractor_classes == "other",
            temperature=(
                run.metric.temperature if run.metric.temperature is not None else c.temperature
            ),
            reference=c.reference,
            knn_k=c.knn_k,
            knn_temperature=c.knn_temperature,
        )
        ev.find_neighbours(
            model, device, run.eval.batch_size, exclude_self=False, bank_indices=bank
        )
        knn_k, knn_t, max_iter = c.knn_k, c.knn_temperature, c.probe_max_iter

        def task_metrics(net: nn.Module) -> dict[str, float]:
            return {
                f"knn{knn_k}_accuracy": float(knn_accuracy(net, bank_set, query_set, knn_k, knn_t)),
                "linear_probe_accuracy": float(
                    linear_probe_accuracy(net, bank_set, query_set, max_iter=max_iter)
                ),
            }

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev


def unit_protocol(eval_cfg: Any) -> dict[str, int]:
    """A unit's queries share their random streams (the random maps' seed, the pairs'
    second object), so ``eval.unit_size`` changes those numbers: it joins ``settings_id``
    and ``table_id`` (runs with other unit sizes are never pooled as repeats)."""
    return {"unit_size": int(eval_cfg.unit_size)}


def same_classes(train_set: Any, eval_set: Any, data: Any) -> None:
    """kNN accuracy, the linear probe and the ``correct`` column compare a query's label
    with the bank's (training split): both must number the same classes (labels are per
    split)."""
    bank, queries = getattr(train_set, "classes", None), getattr(eval_set, "classes", None)
    if bank and queries and list(bank) != list(queries):
        raise FamBenchError(
            f"task=contrastive compares each query's label with the labels of the "
            f"{data.train_split!r} split, but data.eval_split={data.eval_split} holds other "
            f"classes ({len(queries)} vs {len(bank)}, e.g. {queries[0]!r} vs {bank[0]!r}), so "
            "kNN and the probe would score label ids of different classes. Query held-out "
            f"images of the training classes: data.eval_split={data.train_split} "
            "task.holdout_per_class=<n> (as experiment=synthetic_simclr does), or a dataset "
            "whose test split has the training classes (CIFAR-10, STL-10)."
        )


class Retrieval(TaskFamily):
    name = "retrieval"
    Config = RetrievalConfig

    def training_module(self, model, train_set, optim):
        c = self.config
        return MetricLearningModule(model, c.loss, c.miner, c.margin, train_set=train_set, **optim)

    def protocol(self, eval_cfg):
        # one leaderboard table per loss: the same network trained otherwise
        return {"loss": self.config.loss, **unit_protocol(eval_cfg)}

    def train_loader(self, train_set, trainer, seed):
        from pytorch_metric_learning.samplers import MPerClassSampler

        view = IndexedBatches(train_set)
        per_class = self.config.samples_per_class
        n_classes = len(torch.unique(view.labels))
        batch_size = trainer.batch_size
        if batch_size % per_class or per_class * n_classes < batch_size:
            raise FamBenchError(
                f"Retrieval batches need trainer.batch_size ({batch_size}) to be a multiple of "
                f"task.samples_per_class ({per_class}) and at most samples_per_class x "
                f"classes ({per_class * n_classes}). Change trainer.batch_size or "
                "task.samples_per_class."
            )
        sampler = MPerClassSampler(
            view.labels,
            per_class,
            batch_size=batch_size,
            length_before_new_iter=max(len(view), batch_size),
        )
        w = trainer.num_workers
        return DataLoader(
            view,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=pass_through,
            drop_last=True,
            num_workers=w,
            persistent_workers=w > 0,
        )

    def monitor(self, train_set, val_set, seed):
        return "val_recall@1", lambda m: recall_at_k(m, val_set, ks=(1,))["recall@1"]

    def evaluation(self, run, train_set, eval_set, model, device):
        if len(eval_set) < 2:
            raise FamBenchError("Retrieval needs at least two gallery images.")
        queries = query_order(len(eval_set), run.eval.num_queries, run.seed)
        pairs = getattr(eval_set, "mode", "single") == "pairs"
        temperature = run.metric.temperature
        ev = NeighbourEvaluation(
            "retrieval",
            eval_set,
            eval_set,
            queries,
            run.eval.unit_size,
            self.config.similarity,
            score=run.metric.score,
            distractors=run.metric.distractors,
            other_classes=run.metric.distractor_classes == "other",
            temperature=RETRIEVAL_TEMPERATURE if temperature is None else temperature,
            pairs=pairs,
            seed=run.seed,
        )
        ev.find_neighbours(model, device, run.eval.batch_size, exclude_self=True)
        ks = tuple(self.config.recall_ks)

        def task_metrics(net: nn.Module) -> dict[str, float]:
            return {k: float(v) for k, v in recall_at_k(net, eval_set, None, ks).items()}

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev
