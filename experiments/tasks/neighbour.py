"""Contrastive (SimCLR) and retrieval: explain a test query against a nearest neighbour.

- ``contrastive``: a test image is explained against the embedding of its nearest
  neighbour (cosine) in the bank of training-split images (``task.bank_size`` of them, or
  all); a fixed, deterministic reference (an augmented view would make the explained
  score depend on augmentation randomness).
- ``retrieval``: a test query is explained against the embedding of its top-1 gallery
  image (cosine, the query itself excluded; gallery = the test split, leave-one-out).

The metrics read the cosine similarity; Average Drop / Increase in Confidence read
``max(cosine, 0)`` (a reference that has become dissimilar counts as a full drop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.embedding import embed
from experiments.tasks.base import Evaluation, TaskFamily, Unit, query_order, stack_items
from fam.errors import FamBenchError
from fam.similarity import resolve_similarity


@dataclass
class ContrastiveConfig:
    """``conf/task/contrastive.yaml`` (SimCLR, Chen et al. 2020)."""

    name: str = "contrastive"
    similarity: str = "cosine"
    temperature: float = 0.5
    projection_dim: int = 128
    bank_size: int | None = None
    knn_k: int = 200
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    random_gray_scale: float = 0.2
    gaussian_blur: float | None = None
    hf_prob: float = 0.5
    monitor_every: int = 0


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


def _batch_size_error(trainer_key: str, message: str) -> FamBenchError:
    return FamBenchError(f"{message} Change {trainer_key}.")


class Contrastive(TaskFamily):
    name = "contrastive"
    Config = ContrastiveConfig

    def training_module(self, model, train_set, optim):
        from experiments.training.contrastive import SimCLRModule

        dim = embed(model, train_set, torch.arange(2)).shape[1]
        c = self.config
        return SimCLRModule(model, dim, c.projection_dim, c.temperature, **optim)

    def train_loader(self, train_set, trainer, seed):
        from torch.utils.data import DataLoader

        from experiments.training.batches import TwoViews, image_size_of

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

        return "val_knn_accuracy", lambda m: knn_accuracy(m, train_set, val_set, self.config.knn_k)

    def evaluation(self, run, train_set, eval_set, model, device):
        queries = query_order(len(eval_set), run.eval.num_queries, run.seed)
        bank_size = self.config.bank_size
        # the bank draws from the next seed's query stream (fixed: it defines earlier runs)
        bank = None if bank_size is None else query_order(len(train_set), bank_size, run.seed + 1)
        ev = NeighbourEvaluation(
            "contrastive",
            eval_set,
            train_set,
            queries,
            run.eval.unit_size,
            self.config.similarity,
        )
        ev.find_neighbours(
            model, device, run.eval.batch_size, exclude_self=False, bank_indices=bank
        )
        knn_k = self.config.knn_k

        def task_metrics(net: nn.Module) -> dict[str, float]:
            from experiments.training.metrics import knn_accuracy

            return {f"knn{knn_k}_accuracy": float(knn_accuracy(net, train_set, eval_set, knn_k))}

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev


class Retrieval(TaskFamily):
    name = "retrieval"
    Config = RetrievalConfig

    def training_module(self, model, train_set, optim):
        from experiments.training.retrieval import MetricLearningModule

        c = self.config
        return MetricLearningModule(model, c.loss, c.miner, c.margin, **optim)

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
        ev = NeighbourEvaluation(
            "retrieval", eval_set, eval_set, queries, run.eval.unit_size, self.config.similarity
        )
        ev.find_neighbours(model, device, run.eval.batch_size, exclude_self=True)
        ks = tuple(self.config.recall_ks)

        def task_metrics(net: nn.Module) -> dict[str, float]:
            from experiments.training.metrics import recall_at_k

            return {k: float(v) for k, v in recall_at_k(net, eval_set, None, ks).items()}

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev


class NeighbourEvaluation(Evaluation):
    """Explain each query against its nearest bank item.

    ``queries``: evaluation-split indices explained, in order (units of ``unit_size``);
    ``bank``: the dataset the neighbour comes from; ``neighbours``: bank index of each
    query's neighbour (computed once by :meth:`find_neighbours`).
    """

    def __init__(self, name, dataset, bank, queries: Tensor, unit_size: int, similarity: str):
        resolve_similarity(similarity)
        self.name, self.dataset, self.bank = name, dataset, bank
        self.queries, self.unit_size, self.similarity = queries, unit_size, similarity
        self.neighbours: Tensor | None = None
        self.metrics_fn = None
        self.num_classes: int | None = None
        self.score_label = f"{similarity} similarity to the reference"

    @property
    def confidence_available(self) -> bool:
        # max(cos, 0) is a non-negative score; a clamped distance or dot product is not.
        return self.similarity == "cosine"

    @property
    def num_units(self) -> int:
        return -(-len(self.queries) // self.unit_size)

    def chance(self) -> float | None:
        return None if not self.num_classes else 1.0 / self.num_classes

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.metrics_fn(model)

    def find_neighbours(self, model, device, batch_size, exclude_self, bank_indices=None):
        """Nearest bank image of every query (cosine); ``exclude_self`` when the bank is
        the evaluation split itself (retrieval's leave-one-out gallery)."""
        bank_ids = torch.arange(len(self.bank)) if bank_indices is None else bank_indices
        bank_emb = torch.cat(
            [
                embed(
                    model, stack_items(self.bank, bank_ids[i : i + batch_size].tolist(), device)[0]
                )
                for i in range(0, len(bank_ids), batch_size)
            ]
        )
        bank_emb = F.normalize(bank_emb, dim=1)
        best = []
        for i in range(0, len(self.queries), batch_size):
            q = self.queries[i : i + batch_size]
            emb = F.normalize(embed(model, stack_items(self.dataset, q.tolist(), device)[0]), dim=1)
            sims = emb @ bank_emb.T
            if exclude_self:
                own = bank_ids.to(device)[None, :] == q.to(device)[:, None]
                sims = sims.masked_fill(own, float("-inf"))
            best.append(bank_ids[sims.argmax(1).cpu()])
        self.neighbours = torch.cat(best)

    def unit(self, u: int, model: nn.Module, device: torch.device) -> Unit:
        if self.neighbours is None:
            raise RuntimeError("find_neighbours must run before units are evaluated")
        sl = slice(u * self.unit_size, (u + 1) * self.unit_size)
        queries, neighbours = self.queries[sl].tolist(), self.neighbours[sl].tolist()
        extras: dict = {}
        images, masks, labels = stack_items(self.dataset, queries, device, extras)
        ref_images, _, ref_labels = stack_items(self.bank, neighbours, device)
        reference = embed(model, ref_images)
        _, fn = resolve_similarity(self.similarity)

        def similarity(x: Tensor, index: Tensor) -> Tensor:
            return fn(model(x).float(), reference[index])

        def confidence(x: Tensor, index: Tensor) -> Tensor:
            return similarity(x, index).clamp_min(0)

        return Unit(
            unit=u,
            images=images,
            reference=reference,
            score_fn=similarity,
            confidence_fn=confidence,
            reference_fn=lambda net: embed(net, ref_images),
            similarity=self.similarity,
            masks=masks,
            boxes=extras.get("boxes"),
            annotation_sizes=extras.get("annotation_sizes"),
            reference_images=ref_images,
            columns={
                "sample_id": queries,
                "episode": [u] * len(queries),
                "index": queries,
                "label": labels,
                "reference_index": neighbours,
                "reference_label": ref_labels,
                "correct": [a == b for a, b in zip(labels, ref_labels, strict=True)],
            },
        )
