"""Episodes of the few-shot family: drawing them, classifying them, explaining them.

- :func:`episode_sampler`: an ``EpisodeSampler`` whose shape errors name the config keys;
- :class:`EpisodeClassifier`: what an algorithm decides with on one episode (the
  references, the explained similarity, the class probabilities);
- :func:`episode_accuracy`: the accuracy of an algorithm's classifier over the episodes
  of a sampler (the task metric and the training monitor of every algorithm);
- :class:`EpisodeEvaluation`: the evaluation of every algorithm, one unit per episode.

Nothing here knows an algorithm by name: an algorithm is anything with the attributes
of :class:`~experiments.tasks.fewshot.algorithm.FewShotAlgorithm` that these read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from experiments.data import EpisodeSampler
from experiments.data.seeding import derive_seed
from experiments.embedding import embed
from experiments.tasks.base import TaskEvaluation, Unit, annotation_sizes, stack_items
from experiments.training.batches import labels_of
from fam.errors import FamBenchError
from fam.layers import eval_mode
from fam.similarity import SimilarityLike, pairwise


def episode_sampler(
    dataset: Any,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    keys: tuple[str, str, str],
) -> EpisodeSampler:
    """``EpisodeSampler`` over ``dataset``; an impossible shape names the config keys."""
    try:
        return EpisodeSampler(labels_of(dataset), way, shot, query, episodes, seed)
    except FamBenchError as err:
        raise FamBenchError(
            f"{err} Change {keys[0]}={way}, {keys[1]}={shot} or {keys[2]}={query} so that "
            "every episode fits the split."
        ) from None


@dataclass
class EpisodeClassifier:
    """What a few-shot model decides with on one episode.

    - ``references (W, D)``: what the explainers receive as the reference of class ``c``;
    - ``similarity``: a name (``fam.similarity``) or a callable ``(emb (N, D), ref (N, D))
      -> (N,)`` such that ``similarity(e(x), references[c])`` is the model's own score of
      class ``c``;
    - ``probabilities(emb (Q, D)) -> (Q, W)``: the causal score the metrics read
      (``metric.score=probability``);
    - ``decision(emb) -> (Q, W)``: the scores whose argmax is the model's prediction
      (``None``: the probabilities);
    - ``reference_follows_model``: False when the references only name classes of a fixed
      support set (matchingnet), so that the randomisation sanity check keeps them.
    """

    references: Tensor
    similarity: SimilarityLike
    probabilities: Callable[[Tensor], Tensor]
    reference_follows_model: bool = True
    decision: Callable[[Tensor], Tensor] | None = None

    def decide(self, emb: Tensor) -> Tensor:
        """``(Q, D) -> (Q, W)`` scores whose argmax is the prediction."""
        return (self.decision or self.probabilities)(emb)

    def similarity_to(self, emb: Tensor, classes: Tensor) -> Tensor:
        """``(N, D), (N,)`` episode positions ``-> (N,)``: each embedding's similarity to
        the reference of its class (a named similarity is read off the full ``(N, W)``
        matrix, as the model decides; a callable is called on the pairs)."""
        if callable(self.similarity):
            return self.similarity(emb, self.references[classes])
        return pairwise(self.similarity, emb, self.references).gather(1, classes[:, None])[:, 0]


def mean_ci95(values: Tensor) -> dict[str, float]:
    """Mean and normal-approximation 95% half-width ``1.96 * std / sqrt(n)`` (the few-shot
    literature's convention)."""
    values = values.double()
    n = values.numel()
    mean = values.mean()
    std = values.std(unbiased=True) if n > 1 else torch.zeros_like(mean)
    return {"mean": float(mean), "ci95": float(1.96 * std / math.sqrt(n)), "n": n}


def episode_accuracy(
    model: nn.Module, dataset: Any, sampler: Any, algorithm: Any
) -> dict[str, float]:
    """Accuracy of ``algorithm``'s classifier over every episode of ``sampler``.

    ``algorithm``: anything with ``classifier(support (W*S, D), n_way, n_shot) ->``
    :class:`EpisodeClassifier`. Each image is embedded once (eval mode, so an embedding
    does not depend on its episode). Returns ``{"mean", "ci95", "n"}`` over episodes.
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
    with torch.no_grad():
        for ep in episodes:
            support = emb[row[ep.support.to(emb.device)]]
            query = emb[row[ep.query.to(emb.device)]]
            clf = algorithm.classifier(support, ep.n_way, len(ep.support) // ep.n_way)
            pred = clf.decide(query).argmax(1)
            accuracies.append((pred == ep.query_labels.to(emb.device)).float().mean())
    return mean_ci95(torch.stack(accuracies).cpu())


class EpisodeEvaluation(TaskEvaluation):
    """Episodes of the evaluation split, one unit per episode, explained with the
    algorithm's :class:`EpisodeClassifier`.

    In ``pairs`` mode (``SyntheticShapes(mode="pairs")``) each query image shows its own
    class's object and one of another episode class (picked from ``(seed, episode,
    query)``); the first is the ground truth, the second goes into ``other_masks``.
    """

    #: a query's label or the model's prediction (a second map where they differ)
    explains = ("true", "predicted")

    def __init__(self, algorithm, dataset, sampler, n_way, n_shot, n_query, score, seed, pairs):
        self.algorithm, self.dataset, self.sampler = algorithm, dataset, sampler
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.similarity = algorithm.similarity_name
        self.score, self.seed, self.pairs = score, seed, pairs
        self.score_label = (
            algorithm.score_label if score == "probability" else algorithm.similarity_label
        )

    @property
    def num_units(self) -> int:
        return int(self.sampler.num_episodes)

    @property
    def confidence_available(self) -> bool:
        return self.score == "probability" or self.algorithm.similarity_confidence is not None

    def chance(self) -> float:
        return 1.0 / self.n_way

    def queries(self, e: int, device: torch.device) -> dict[str, Any]:
        """The query images of episode ``e`` (class-major: query ``j`` belongs to episode
        class ``j // n_query``), their labels and masks, and the support images."""
        episode = self.sampler.episode(e)
        classes = torch.as_tensor(episode.classes).long()
        position = torch.arange(self.n_way).repeat_interleave(self.n_query)
        out: dict[str, Any] = {"other_masks": None, "other_labels": None, "classes": classes}
        if self.pairs:
            # the other object's class: a stream of its own, keyed by (seed, episode, query)
            offset = torch.tensor(
                [derive_seed(self.seed, e, j) % (self.n_way - 1) for j in range(len(position))]
            )
            other = (position + 1 + offset) % self.n_way
            keys = e * len(position) + torch.arange(len(position))
            batch = self.dataset.pairs(classes[position], classes[other], keys)
            out.update(
                images=batch["image"].to(device),
                masks=batch["mask"].bool().to(device),
                other_masks=batch["other_mask"].bool().to(device),
                labels=classes[position].tolist(),
                other_labels=classes[other].tolist(),
                index=keys.tolist(),  # pair images are identified by their render key
                extras={"annotation_sizes": annotation_sizes(self.dataset, len(keys))},
            )
        else:
            query_idx = torch.as_tensor(episode.query).tolist()
            extras: dict[str, Any] = {}
            images, masks, labels = stack_items(self.dataset, query_idx, device, extras)
            out.update(images=images, masks=masks, labels=labels, index=query_idx, extras=extras)
        out["position"] = position.to(device)
        out["support"] = stack_items(
            self.dataset, torch.as_tensor(episode.support).tolist(), device
        )[0]
        return out

    def unit(self, e: int, model: nn.Module, device: torch.device) -> Unit:
        algorithm = self.algorithm
        algorithm.to(device)
        q = self.queries(e, device)
        position, support_images = q["position"], q["support"]
        n_way, n_shot = self.n_way, self.n_shot

        def classifier_of(net: nn.Module) -> EpisodeClassifier:
            return algorithm.classifier(embed(net, support_images), n_way, n_shot)

        clf = classifier_of(model)
        score, to_confidence = self.score, algorithm.similarity_confidence

        def explaining(explained: Tensor) -> dict[str, Any]:
            """Reference and scores of the class ``explained (N,)`` (episode positions)."""
            reference = clf.references[explained]

            def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
                probs = clf.probabilities(emb)
                return probs.gather(1, explained[index][:, None])[:, 0]

            def probability(x: Tensor, index: Tensor) -> Tensor:
                return embedding_probability(model(x).float(), index)

            def raw_similarity(x: Tensor, index: Tensor) -> Tensor:
                return clf.similarity_to(model(x).float(), explained[index])

            def similarity_confidence(x: Tensor, index: Tensor) -> Tensor:
                return to_confidence(raw_similarity(x, index))

            confidence_fn = None
            if score == "probability":
                confidence_fn = probability
            elif to_confidence is not None:
                confidence_fn = similarity_confidence
            if clf.reference_follows_model:

                def reference_fn(net: nn.Module) -> Tensor:
                    return classifier_of(net).references[explained]
            else:

                def reference_fn(net: nn.Module) -> Tensor:
                    return reference

            return {
                "reference": reference,
                "score_fn": probability if score == "probability" else raw_similarity,
                "confidence_fn": confidence_fn,
                "reference_fn": reference_fn,
                "embedding_score": embedding_probability,
            }

        images = q["images"]
        with torch.no_grad(), eval_mode(model):
            predicted = torch.cat(
                [clf.decide(model(images[i : i + 256]).float()) for i in range(0, len(images), 256)]
            ).argmax(1)
        n = len(position)
        classes = q["classes"]
        columns = {
            "sample_id": [e * n + j for j in range(n)],
            "episode": [e] * n,
            "index": q["index"],
            "label": q["labels"],
            "predicted_label": classes[predicted.cpu()].tolist(),
            "correct": (predicted == position).tolist(),
        }
        if q["other_labels"] is not None:
            columns["other_label"] = q["other_labels"]
        common = dict(
            unit=e,
            images=images,
            similarity=clf.similarity,
            masks=q["masks"],
            other_masks=q["other_masks"],
            boxes=q["extras"].get("boxes"),
            annotation_sizes=q["extras"].get("annotation_sizes"),
            columns=columns,
        )
        as_predicted = Unit(**common, **explaining(predicted), explains="predicted")
        return Unit(**common, **explaining(position), explains="true", predicted_unit=as_predicted)

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        self.algorithm.to(next(iter(model.parameters())).device)
        acc = episode_accuracy(model, self.dataset, self.sampler, self.algorithm)
        return {
            "fewshot_accuracy": float(acc["mean"]),
            "fewshot_accuracy_ci95": float(acc["ci95"]),
            "episodes": int(acc["n"]),
        }
