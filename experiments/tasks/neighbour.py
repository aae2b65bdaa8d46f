"""Contrastive (SimCLR) and retrieval: explain a test query against a nearest neighbour.

- ``contrastive``: a query image is explained against the embedding of its nearest
  neighbour (cosine) in the bank of training-split images (``task.bank_size`` of them, or
  all); a fixed, deterministic reference (an augmented view would make the explained
  score depend on augmentation randomness). With ``task.holdout_per_class > 0`` the last
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

- ``probability`` (default): the softmax, at temperature ``metric.temperature``, of the
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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.data.seeding import derive_seed
from experiments.embedding import embed
from experiments.tasks.base import Evaluation, TaskFamily, Unit, query_order, stack_items
from experiments.training.batches import labels_of
from fam.errors import FamBenchError
from fam.similarity import resolve_similarity

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
    knn_k: int = 200
    holdout_per_class: int = 0
    probe_max_iter: int = 1000
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    random_gray_scale: float = 0.2
    gaussian_blur: float | None = None
    hf_prob: float = 0.5
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

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices", "labels"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


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

    def training_part(self, train_set: Any) -> Any:
        """The images the encoder trains on and the bank holds (all but the held out)."""
        h = self.config.holdout_per_class
        return train_set if h == 0 else Subset(train_set, holdout_split(train_set, h)[0])

    def training_module(self, model, train_set, optim):
        from experiments.training.contrastive_algorithms import ALGORITHMS

        dim = embed(model, train_set, torch.arange(2)).shape[1]
        return ALGORITHMS[self.config.algorithm](model, dim, self.config, optim)

    def protocol(self, eval_cfg):
        # one leaderboard table per algorithm: the same network trained otherwise
        return {"algorithm": self.config.algorithm}

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

        return "val_knn_accuracy", lambda m: knn_accuracy(
            m, self.training_part(train_set), val_set, self.config.knn_k
        )

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
        )
        ev.find_neighbours(
            model, device, run.eval.batch_size, exclude_self=False, bank_indices=bank
        )
        knn_k, max_iter = c.knn_k, c.probe_max_iter

        def task_metrics(net: nn.Module) -> dict[str, float]:
            from experiments.training.metrics import knn_accuracy, linear_probe_accuracy

            return {
                f"knn{knn_k}_accuracy": float(knn_accuracy(net, bank_set, query_set, knn_k)),
                "linear_probe_accuracy": float(
                    linear_probe_accuracy(net, bank_set, query_set, max_iter=max_iter)
                ),
            }

        ev.metrics_fn = task_metrics
        ev.num_classes = len(getattr(eval_set, "classes", []) or []) or None
        return ev


class Retrieval(TaskFamily):
    name = "retrieval"
    Config = RetrievalConfig

    def training_module(self, model, train_set, optim):
        from experiments.training.retrieval import MetricLearningModule

        c = self.config
        return MetricLearningModule(model, c.loss, c.miner, c.margin, train_set=train_set, **optim)

    def protocol(self, eval_cfg):
        # one leaderboard table per loss: the same network trained otherwise
        return {"loss": self.config.loss}

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


class NeighbourEvaluation(Evaluation):
    """Explain each query against its nearest bank item.

    ``queries``: indices of ``dataset`` explained, in order (units of ``unit_size``);
    ``bank``: the dataset the neighbour comes from; ``neighbours``: bank index of each
    query's neighbour and ``distractor_ids`` ``(Q, K)`` the bank indices of its next K
    nearest items (computed once by :meth:`find_neighbours`, with the bank's embeddings).
    ``score``: ``"probability"`` or ``"similarity"`` (module docstring).
    """

    def __init__(
        self,
        name: str,
        dataset: Any,
        bank: Any,
        queries: Tensor,
        unit_size: int,
        similarity: str,
        score: str = "probability",
        distractors: int = 10,
        temperature: float = 0.5,
        pairs: bool = False,
        seed: int = 0,
        other_classes: bool = True,
    ) -> None:
        resolve_similarity(similarity)
        if score not in ("probability", "similarity"):
            raise FamBenchError(
                f"metric.score must be 'probability' or 'similarity', got {score!r}."
            )
        if distractors < 1 or temperature <= 0:
            raise FamBenchError(
                "The task probability needs metric.distractors >= 1 and metric.temperature "
                f"> 0 (got {distractors} and {temperature})."
            )
        self.name, self.dataset, self.bank = name, dataset, bank
        self.queries, self.unit_size, self.similarity = queries, unit_size, similarity
        self.score, self.distractors, self.temperature = score, distractors, temperature
        self.pairs, self.seed, self.other_classes = pairs, seed, other_classes
        self.neighbours: Tensor | None = None
        self.distractor_ids: Tensor | None = None
        self.bank_ids: Tensor | None = None
        self.bank_emb: Tensor | None = None
        self.metrics_fn = None
        self.num_classes: int | None = None
        self.score_label = (
            f"probability of the reference against {distractors} distractors (T={temperature:g})"
            if score == "probability"
            else f"{similarity} similarity to the reference"
        )

    @property
    def score_settings(self) -> dict[str, Any]:
        """The score's own settings (they go into ``settings_id``)."""
        if self.score != "probability":
            return {}
        return {
            "score_distractors": self.distractors,
            "score_distractor_classes": "other" if self.other_classes else "any",
            "score_temperature": self.temperature,
        }

    @property
    def confidence_available(self) -> bool:
        # the probability and max(cos, 0) are non-negative; a clamped distance or dot is not
        return self.score == "probability" or self.similarity == "cosine"

    @property
    def num_units(self) -> int:
        return -(-len(self.queries) // self.unit_size)

    def chance(self) -> float | None:
        return None if not self.num_classes else 1.0 / self.num_classes

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.metrics_fn(model)

    def _embed_items(self, model, dataset, ids: Tensor, device, batch_size: int) -> Tensor:
        return torch.cat(
            [
                embed(model, stack_items(dataset, ids[i : i + batch_size].tolist(), device)[0])
                for i in range(0, len(ids), batch_size)
            ]
        )

    def find_neighbours(self, model, device, batch_size, exclude_self, bank_indices=None):
        """Nearest bank item of every query (cosine) and its next K nearest (the
        distractors); ``exclude_self`` when the bank is the evaluation split itself
        (retrieval's leave-one-out gallery)."""
        bank_ids = torch.arange(len(self.bank)) if bank_indices is None else bank_indices
        bank_emb = self._embed_items(model, self.bank, bank_ids, device, batch_size)
        bank_unit = F.normalize(bank_emb, dim=1)
        query_emb = self._embed_items(model, self.dataset, self.queries, device, batch_size)
        own = self.queries if exclude_self else None
        rows, distractors = [], []
        for i in range(0, len(self.queries), batch_size):
            emb = query_emb[i : i + batch_size]
            sims = F.normalize(emb, dim=1) @ bank_unit.T
            if exclude_self:
                q = self.queries[i : i + batch_size].to(device)
                sims = sims.masked_fill(bank_ids.to(device)[None, :] == q[:, None], float("-inf"))
            rows.append(sims.argmax(1).cpu())
        rows = torch.cat(rows)
        self.neighbours, self.reference_rows = bank_ids[rows], rows
        self.bank_ids, self.bank_emb = bank_ids, bank_emb.cpu()
        self.bank_labels = labels_of(self.bank)[bank_ids]
        for i in range(0, len(self.queries), batch_size):
            mine = None if own is None else own[i : i + batch_size]
            emb = query_emb[i : i + batch_size]
            distractors.append(self._distractors_of(emb, rows[i : i + batch_size], mine).cpu())
        self.distractor_ids = torch.cat(distractors)

    def _pair_queries(self, u: int, ref_labels: list[int], device) -> dict:
        """Pair images holding an object of the reference's class and one of another."""
        n_classes = int(self.dataset.num_classes)
        a = torch.tensor(ref_labels)
        offset = torch.tensor(
            [derive_seed(self.seed, u, j) % (n_classes - 1) for j in range(len(a))]
        )
        b = (a + 1 + offset) % n_classes
        sl = slice(u * self.unit_size, (u + 1) * self.unit_size)
        batch = self.dataset.pairs(a, b, self.queries[sl])
        return {
            "images": batch["image"].to(device),
            "masks": batch["mask"].bool().to(device),
            "other_masks": batch["other_mask"].bool().to(device),
            "other_labels": b.tolist(),
        }

    def _distractors_of(self, emb: Tensor, reference_rows: Tensor, own: Tensor | None) -> Tensor:
        """Bank rows ``(N, K)`` of the distractors of ``emb``: its K nearest bank items
        other than the reference (bank row ``reference_rows``) and the query's own item;
        with ``other_classes`` only items whose label differs from the reference's."""
        device = emb.device
        bank_unit = F.normalize(self.bank_emb.to(device), dim=1)
        sims = F.normalize(emb, dim=1) @ bank_unit.T
        rows = torch.arange(len(self.bank_ids), device=device)
        reference_rows = reference_rows.to(device)
        drop = rows[None, :] == reference_rows[:, None]
        if own is not None:
            drop |= self.bank_ids.to(device)[None, :] == own.to(device)[:, None]
        if self.other_classes:
            labels = self.bank_labels.to(device)
            drop |= labels[None, :] == labels[reference_rows][:, None]
        sims = sims.masked_fill(drop, float("-inf"))
        k = min(self.distractors, int((~drop).sum(1).min()))
        if k < 1:
            raise FamBenchError(
                "No bank item is left to serve as a distractor; use a larger bank or "
                "metric.distractor_classes=any."
            )
        return sims.topk(k, dim=1).indices

    def unit(self, u: int, model: nn.Module, device: torch.device) -> Unit:
        if self.neighbours is None:
            raise RuntimeError("find_neighbours must run before units are evaluated")
        sl = slice(u * self.unit_size, (u + 1) * self.unit_size)
        queries, neighbours = self.queries[sl].tolist(), self.neighbours[sl].tolist()
        extras: dict = {}
        images, masks, labels = stack_items(self.dataset, queries, device, extras)
        ref_images, _, ref_labels = stack_items(self.bank, neighbours, device)
        reference = embed(model, ref_images)
        distractor_rows = self.distractor_ids[sl]
        other_masks, other_labels = None, None
        correct = [a == b for a, b in zip(labels, ref_labels, strict=True)]
        if self.pairs:
            pair = self._pair_queries(u, ref_labels, device)
            images, masks = pair["images"], pair["masks"]
            other_masks, other_labels = pair["other_masks"], pair["other_labels"]
            labels = list(ref_labels)
            # the distractors of the pair image itself, unperturbed
            own = self.queries[sl] if self.bank is self.dataset else None
            distractor_rows = self._distractors_of(
                embed(model, images), self.reference_rows[sl], own
            ).cpu()
        distractors = self.bank_emb[distractor_rows].to(device)  # (N, K, D)
        _, fn = resolve_similarity(self.similarity)
        temperature = self.temperature

        def similarity(x: Tensor, index: Tensor) -> Tensor:
            return fn(model(x).float(), reference[index])

        def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
            own_sim = fn(emb, reference[index].to(emb.dtype))
            others = distractors[index].to(emb.dtype)  # (B, K, D)
            b, k, d = others.shape
            other_sims = fn(emb.repeat_interleave(k, 0), others.reshape(b * k, d)).view(b, k)
            logits = torch.cat([own_sim[:, None], other_sims], dim=1) / temperature
            return torch.softmax(logits, dim=1)[:, 0]

        def probability(x: Tensor, index: Tensor) -> Tensor:
            return embedding_probability(model(x).float(), index)

        def shifted_cosine(x: Tensor, index: Tensor) -> Tensor:
            return similarity(x, index).clamp_min(0)

        if self.score == "probability":
            score_fn, confidence_fn = probability, probability
        else:
            confidence = shifted_cosine if self.similarity == "cosine" else None
            score_fn, confidence_fn = similarity, confidence
        columns = {
            "sample_id": queries,
            "episode": [u] * len(queries),
            "index": queries,
            "label": labels,
            "reference_index": neighbours,
            "reference_label": ref_labels,
            "correct": correct,
        }
        if other_labels is not None:
            columns["other_label"] = other_labels
        return Unit(
            unit=u,
            images=images,
            reference=reference,
            score_fn=score_fn,
            confidence_fn=confidence_fn,
            reference_fn=lambda net: embed(net, ref_images),
            similarity=self.similarity,
            masks=masks,
            boxes=extras.get("boxes"),
            annotation_sizes=extras.get("annotation_sizes"),
            other_masks=other_masks,
            reference_images=ref_images,
            embedding_score=embedding_probability,
            columns=columns,
        )
