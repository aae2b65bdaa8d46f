"""What each task explains: evaluation units of images, references and scores.

A run is cut into *units* (a few-shot episode, or a block of ``eval.unit_size`` test
queries for the contrastive and retrieval tasks). A unit is a pure function of the config,
the model and its index, so any unit can be recomputed on its own, in any process and in
any order: that is what makes resume and sharding over processes exact.

- ``fewshot``: each query of an episode is explained against the prototype (mean support
  embedding) of its true class with the task similarity. The metrics read, with
  ``metric.score=probability`` (default), the episode softmax of that class over the
  similarities to all prototypes (prototypes from the unperturbed support), or with
  ``similarity`` the raw similarity.
- ``contrastive``: a test image is explained against the embedding of its nearest
  neighbour (cosine) in the bank of training-split images (``task.bank_size`` of them, or
  all); a fixed, deterministic reference (an augmented view would make the explained
  score depend on augmentation randomness). The metrics read the cosine similarity.
- ``retrieval``: a test query is explained against the embedding of its top-1 gallery
  image (cosine, the query itself excluded; gallery = the test split, leave-one-out). The
  metrics read the cosine similarity.

Average Drop and Increase in Confidence need a non-negative score: they read the
probability for few-shot, and ``max(cosine, 0)`` for contrastive and retrieval (a
reference that has become dissimilar counts as a full drop). With the raw few-shot
similarity (negative squared distance) they are skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from experiments.data.seeding import derive_seed, generator
from fam.errors import FamBenchError
from fam.layers import eval_mode
from fam.similarity import resolve_similarity

ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Unit:
    """One evaluation unit on the model's device.

    ``images (N, 3, H, W)``; ``reference (N, D)``; ``masks``/``other_masks`` ``(N, H, W)``
    bool or ``None``; ``score_fn(perturbed (B, 3, H, W), index (B,)) -> (B,)`` the score
    the faithfulness metrics read; ``confidence_fn`` the non-negative score for Average
    Drop / Increase in Confidence (``None``: not available); ``reference_fn(net) -> (N, D)``
    recomputes the references with another network (randomisation sanity check);
    ``columns`` per-sample values written into each result row (lists of length N).
    """

    unit: int
    images: Tensor
    reference: Tensor
    score_fn: ScoreFn
    confidence_fn: ScoreFn | None
    reference_fn: Callable[[nn.Module], Tensor]
    masks: Tensor | None = None
    other_masks: Tensor | None = None
    columns: dict[str, list] = field(default_factory=dict)


def embed(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Embeddings ``(N, D)`` in eval mode without gradients, in batches."""
    with torch.no_grad(), eval_mode(model):
        return torch.cat(
            [model(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
        )


def pairwise(similarity: str, emb: Tensor, refs: Tensor) -> Tensor:
    """Similarity of every embedding to every reference: ``(B, D), (C, D) -> (B, C)``."""
    _, fn = resolve_similarity(similarity)
    b, c = emb.shape[0], refs.shape[0]
    return fn(emb.repeat_interleave(c, 0), refs.repeat(b, 1)).view(b, c)


def stack_items(
    dataset, indices: Sequence[int], device: torch.device
) -> tuple[Tensor, Tensor | None, list[int]]:
    """Images ``(N, 3, H, W)``, masks ``(N, H, W)`` (or ``None``) and labels of items."""
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([it["image"] for it in items]).to(device)
    masks = None
    if getattr(dataset, "has_masks", False):
        masks = torch.stack([torch.as_tensor(it["mask"]) for it in items]).bool().to(device)
    return images, masks, [int(it["label"]) for it in items]


class FewShotTask:
    """Episodes of the evaluation split (``EpisodeSampler``), one unit per episode.

    In ``pairs`` mode (``SyntheticShapes(mode="pairs")``) each query image shows its own
    class's object and one of another episode class (picked from ``(seed, episode,
    query)``); the first is the ground truth, the second goes into ``other_masks``.
    """

    name = "fewshot"

    def __init__(
        self,
        dataset,
        sampler,
        n_way: int,
        n_shot: int,
        n_query: int,
        similarity: str,
        score: str,
        seed: int,
        pairs: bool = False,
    ) -> None:
        if score not in ("probability", "similarity"):
            raise FamBenchError(
                f"metric.score must be 'probability' or 'similarity', got {score!r}."
            )
        resolve_similarity(similarity)
        self.dataset, self.sampler = dataset, sampler
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.similarity, self.score, self.seed, self.pairs = similarity, score, seed, pairs

    @property
    def num_units(self) -> int:
        return int(self.sampler.num_episodes)

    @property
    def confidence_available(self) -> bool:
        return self.score == "probability" or self.similarity == "cosine"

    def unit(self, e: int, model: nn.Module, device: torch.device) -> Unit:
        episode = self.sampler.episode(e)
        classes = torch.as_tensor(episode.classes).long()
        support, _, _ = stack_items(self.dataset, torch.as_tensor(episode.support).tolist(), device)
        query_idx = torch.as_tensor(episode.query).tolist()
        # Queries are class-major: query j belongs to episode class j // n_query.
        position = torch.arange(self.n_way).repeat_interleave(self.n_query)
        other_masks = None
        if self.pairs:
            offset = torch.tensor(
                [derive_seed(self.seed, e, j) % (self.n_way - 1) for j in range(len(position))]
            )
            other_position = (position + 1 + offset) % self.n_way
            keys = e * len(position) + torch.arange(len(position))
            batch = self.dataset.pairs(classes[position], classes[other_position], keys)
            images = batch["image"].to(device)
            masks = batch["mask"].bool().to(device)
            other_masks = batch["other_mask"].bool().to(device)
            labels = classes[position].tolist()
            other_labels = classes[other_position].tolist()
            query_idx = keys.tolist()  # pair images are identified by their render key
        else:
            images, masks, labels = stack_items(self.dataset, query_idx, device)
            other_labels = None
        position = position.to(device)

        def prototypes_of(net: nn.Module) -> Tensor:
            return embed(net, support).view(self.n_way, self.n_shot, -1).mean(1)

        prototypes = prototypes_of(model)
        similarity, score = self.similarity, self.score

        def logits(x: Tensor) -> Tensor:
            return pairwise(similarity, model(x).float(), prototypes)

        def probability(x: Tensor, index: Tensor) -> Tensor:
            probs = torch.softmax(logits(x), dim=1)
            return probs.gather(1, position[index][:, None])[:, 0]

        def raw_similarity(x: Tensor, index: Tensor) -> Tensor:
            return logits(x).gather(1, position[index][:, None])[:, 0]

        def shifted_cosine(x: Tensor, index: Tensor) -> Tensor:
            return raw_similarity(x, index).clamp_min(0)

        score_fn = probability if score == "probability" else raw_similarity
        confidence_fn = None
        if score == "probability":
            confidence_fn = probability
        elif similarity == "cosine":
            confidence_fn = shifted_cosine
        with torch.no_grad(), eval_mode(model):
            predicted = torch.cat(
                [logits(images[i : i + 256]) for i in range(0, len(images), 256)]
            ).argmax(1)
        n = len(position)
        columns = {
            "sample_id": [e * n + j for j in range(n)],
            "episode": [e] * n,
            "index": query_idx,
            "label": labels,
            "correct": (predicted == position).tolist(),
        }
        if other_labels is not None:
            columns["other_label"] = other_labels
        return Unit(
            unit=e,
            images=images,
            reference=prototypes[position],
            score_fn=score_fn,
            confidence_fn=confidence_fn,
            reference_fn=lambda net: prototypes_of(net)[position],
            masks=masks,
            other_masks=other_masks,
            columns=columns,
        )

    def task_metrics(self, model: nn.Module, fewshot_accuracy) -> dict[str, float]:
        acc = fewshot_accuracy(model, self.dataset, self.sampler, self.similarity)
        return {
            "fewshot_accuracy": float(acc["mean"]),
            "fewshot_accuracy_ci95": float(acc["ci95"]),
            "episodes": int(acc["n"]),
        }


class NeighbourTask:
    """Contrastive and retrieval: explain a test query against its nearest neighbour.

    ``queries``: evaluation-split indices explained, in order (units of ``unit_size``);
    ``bank``: the dataset the neighbour comes from; ``neighbours``: bank index of each
    query's neighbour (computed once by :meth:`find_neighbours`).
    """

    def __init__(
        self, name: str, dataset, bank, queries: Tensor, unit_size: int, similarity: str
    ) -> None:
        resolve_similarity(similarity)
        if unit_size < 1:
            raise FamBenchError(f"eval.unit_size must be >= 1, got {unit_size}.")
        self.name, self.dataset, self.bank = name, dataset, bank
        self.queries, self.unit_size, self.similarity = queries, unit_size, similarity
        self.neighbours: Tensor | None = None

    @property
    def confidence_available(self) -> bool:
        # Average Drop / Increase in Confidence need a non-negative score: max(cos, 0) is
        # one; a clamped negative distance or an unbounded dot product is not.
        return self.similarity == "cosine"

    @property
    def num_units(self) -> int:
        return -(-len(self.queries) // self.unit_size)

    def find_neighbours(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        exclude_self: bool,
        bank_indices: Tensor | None = None,
    ) -> None:
        """Nearest bank image of every query (cosine); ``exclude_self`` when bank is the
        evaluation split itself (retrieval's leave-one-out gallery)."""
        bank_ids = torch.arange(len(self.bank)) if bank_indices is None else bank_indices
        bank_emb = torch.cat(
            [
                embed(
                    model, stack_items(self.bank, bank_ids[i : i + batch_size].tolist(), device)[0]
                )
                for i in range(0, len(bank_ids), batch_size)
            ]
        )
        bank_emb = torch.nn.functional.normalize(bank_emb, dim=1)
        best = []
        for i in range(0, len(self.queries), batch_size):
            q = self.queries[i : i + batch_size]
            emb = torch.nn.functional.normalize(
                embed(model, stack_items(self.dataset, q.tolist(), device)[0]), dim=1
            )
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
        images, masks, labels = stack_items(self.dataset, queries, device)
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
            masks=masks,
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


def query_order(n_items: int, num_queries: int | None, seed: int) -> Tensor:
    """The evaluation-split indices explained: a seeded permutation, first ``num_queries``."""
    order = torch.randperm(n_items, generator=generator(seed, 7))
    return order if num_queries is None else order[:num_queries]
