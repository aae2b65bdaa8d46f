"""Contrastive (SimCLR) and retrieval: explain a test query against a nearest neighbour.

- ``contrastive``: a query image is classified as the field classifies a self-supervised
  embedding and the FAM authors' code does (:mod:`experiments.tasks.knn`): a weighted kNN
  vote over the bank of training-split images (``task.bank_size`` of them, or all;
  cosine, ``task.knn_k`` = 20 neighbours, weights ``exp(s / task.knn_temperature)``,
  T = 0.07). With ``task.reference=knn_class`` (default) it is explained against the mean
  normalised bank embedding of the predicted class among those neighbours;
  ``task.reference=nearest`` explains it against its nearest bank item. Both are fixed,
  deterministic references (an augmented view would make the explained score depend on
  augmentation randomness). With ``task.holdout_per_class > 0`` the last
  ``holdout_per_class`` images of every training class (in index order) are held out:
  the encoder never trains on them, they are not in the bank, and they are the queries,
  the kNN test set and the linear probe's test set. That is how an evaluation split with
  other classes than the training split (the synthetic shapes: 64 train / 20 test
  classes) still gets a kNN accuracy and a probe on the classes the bank holds.
- ``retrieval``: a test query is explained against the embedding of its top-1 gallery
  image (cosine, the query itself excluded; gallery = the test split, leave-one-out). In
  ``pairs`` mode (``SyntheticShapes(mode="pairs")``) the query is re-rendered to hold an
  object of the retrieved image's class (the ground truth) and one of another test class
  (``other_masks``, ``other_label``).

The score the faithfulness metrics read (``metric.score``, DESIGN.md section 4):

- ``probability`` (default) under ``task.reference=knn_class`` (contrastive's default):
  the kNN classifier's probability of the predicted class, the normalised vote
  ``sum_{i in top-k, y_i = c} w_i / sum_{i in top-k} w_i``, with the bank held fixed and
  the neighbours re-found for every perturbed image (few-shot's episode probability is its
  counterpart).
- ``probability`` under ``task.reference=nearest`` (contrastive) and for retrieval: the
  softmax, at temperature ``metric.temperature``, of the
  perturbed query's similarities to the reference and to a fixed set of distractors, the
  ``metric.distractors`` (K) nearest other bank items of the *unperturbed* query (the
  reference and, for retrieval, the query itself excluded), by default only items of
  other classes than the reference's (``metric.distractor_classes=other``; ``any`` admits
  the reference's class). Same-class distractors are near copies of the reference: the
  probability then stays near ``1/(K+1)`` whatever is deleted (measured: mask vs random
  deletion AUC 0.085 vs 0.123 with them, 0.096 vs 0.186 without, at T=0.02).
  ``metric.temperature=null`` is the training loss's temperature where it has one
  (SimCLR's NT-Xent ``task.temperature``) and :data:`RETRIEVAL_TEMPERATURE` for the pml
  losses, which have none. The raw cosine of non-negative pooled embeddings can barely
  move when pixels are deleted (DESIGN.md section 4); the probability asks whether the
  query still picks its reference over the nearest items of other classes.
- ``similarity``: the raw similarity to the reference.

Average Drop / Increase in Confidence read the probability, or ``max(cosine, 0)`` under
``metric.score=similarity`` (a reference that has become dissimilar counts as a full drop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from experiments.embedding import embed
from experiments.tasks.base import TaskFamily, query_order
from experiments.tasks.neighbour_evaluation import NeighbourEvaluation
from experiments.training.batches import labels_of
from fam.errors import FamBenchError

#: softmax temperature of the retrieval probability when ``metric.temperature`` is null:
#: the multi-similarity, contrastive and triplet losses have no temperature of their own;
#: 0.05 is about the spread of a trained model's cosines to its nearest gallery items.
RETRIEVAL_TEMPERATURE = 0.01


@dataclass
class ContrastiveConfig:
    """``conf/task/contrastive.yaml`` (SimCLR, Chen et al. 2020; MoCo v2, BYOL, SimSiam:
    ``experiments/training/contrastive_algorithms.py``)."""

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
        from experiments.training.contrastive_algorithms import ALGORITHMS

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


class Subset(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset``, with its ``labels`` and attributes (masks,
    classes, normalisation) passed through."""

    def __init__(self, dataset: Any, indices: Tensor) -> None:
        self.dataset, self.indices = dataset, indices.long()
        self.labels = labels_of(dataset)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.indices[i])]

    def base_indices(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The dataset's own indices of items ``indices`` of this subset."""
        return self.indices[torch.as_tensor(indices, dtype=torch.long)]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        base = self.base_indices(indices).tolist()
        if hasattr(self.dataset, "__getitems__"):
            return list(self.dataset.__getitems__(base))
        return [self.dataset[i] for i in base]

    def images_at(self, indices: Tensor) -> Tensor:
        from experiments.embedding import gather

        return gather(self.dataset, self.base_indices(indices))

    def images_on_other_backgrounds(self, indices: Tensor, keys: Tensor) -> Tensor:
        return self.dataset.images_on_other_backgrounds(self.base_indices(indices), keys)

    def pairs(self, class_a: Tensor, class_b: Tensor, keys: Tensor) -> dict:
        """Pair images (by classes and keys, no item indices): the dataset's own."""
        return self.dataset.pairs(class_a, class_b, keys)

    def __getattr__(self, name: str) -> Any:
        # Data attributes (masks, classes, normalisation) pass through; anything indexed
        # by item is defined above with the index mapped, and unknown methods that take
        # item indices must never reach the dataset unmapped.
        if name in ("dataset", "indices", "labels") or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self.dataset, name)
        if callable(value):
            raise AttributeError(
                f"{name!r}: a method of {type(self.dataset).__name__} is not passed through a "
                "Subset (its item indices would not be mapped)."
            )
        return value


def holdout_split(dataset: Any, per_class: int) -> tuple[Tensor, Tensor]:
    """``(kept, held_out)`` indices: the last ``per_class`` items of every class (in index
    order) are held out. Needs more than ``per_class`` items in every class."""
    labels = labels_of(dataset)
    held = []
    for c in torch.unique(labels).tolist():
        items = torch.nonzero(labels == c).flatten()
        if len(items) <= per_class:
            raise FamBenchError(
                f"task.holdout_per_class={per_class} leaves no training image of class {c} "
                f"({len(items)} images); lower it or render more images per class."
            )
        held.append(items[-per_class:])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return torch.nonzero(keep).flatten(), held_out


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
        from experiments.training.contrastive_algorithms import ALGORITHMS

        dim = embed(model, train_set, torch.arange(2)).shape[1]
        return ALGORITHMS[self.config.algorithm](model, dim, self.config, optim)

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
        from torch.utils.data import DataLoader

        from experiments.training.batches import TwoViews, image_size_of

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
        from experiments.training.metrics import knn_accuracy

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
            from experiments.training.metrics import knn_accuracy, linear_probe_accuracy

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
        from experiments.training.retrieval import MetricLearningModule

        c = self.config
        return MetricLearningModule(model, c.loss, c.miner, c.margin, train_set=train_set, **optim)

    def protocol(self, eval_cfg):
        # one leaderboard table per loss: the same network trained otherwise
        return {"loss": self.config.loss, **unit_protocol(eval_cfg)}

    def train_loader(self, train_set, trainer, seed):
        from pytorch_metric_learning.samplers import MPerClassSampler
        from torch.utils.data import DataLoader

        from experiments.training.batches import IndexedBatches, pass_through

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
        from experiments.training.metrics import recall_at_k

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
            from experiments.training.metrics import recall_at_k

            return {k: float(v) for k, v in recall_at_k(net, eval_set, None, ks).items()}

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev
