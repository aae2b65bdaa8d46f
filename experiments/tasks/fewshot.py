"""Few-shot classification with prototypes (ProtoNet, Snell et al. 2017).

Each query of an episode is explained against the prototype (mean support embedding) of
its true class with the task similarity. The metrics read, with
``metric.score=probability`` (default), the episode softmax of that class over the
similarities to all prototypes (prototypes from the unperturbed support, at the model's
own temperature), or with ``similarity`` the raw similarity. Average Drop / Increase in
Confidence read the probability (or ``max(cos, 0)`` for a cosine model under
``metric.score=similarity``; skipped with a note for the raw negative distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from experiments.data.seeding import derive_seed
from experiments.embedding import embed
from experiments.tasks.base import Evaluation, TaskFamily, Unit, annotation_sizes, stack_items
from fam.errors import FamBenchError
from fam.layers import eval_mode
from fam.similarity import pairwise

#: ``task.distance``: the similarity each names (``fam.similarity``)
DISTANCES = {"squared_euclidean": "euclidean", "euclidean": "euclidean_distance"}


@dataclass
class FewShotConfig:
    """``conf/task/fewshot.yaml``."""

    name: str = "fewshot"
    #: protonet | matchingnet | relationnet | simpleshot (experiments/tasks/fewshot_algorithms.py)
    algorithm: str = "protonet"
    similarity: str = "euclidean"
    #: protonet with similarity=euclidean: squared_euclidean (Snell et al.) | euclidean
    #: (-||e - p||, easyfsl's logit)
    distance: str = "squared_euclidean"
    temperature: float | None = None
    train_way: int = 5
    train_shot: int = 5
    train_query: int = 15
    monitor_way: int = 5
    monitor_shot: int = 5
    monitor_query: int = 15
    monitor_episodes: int = 50
    monitor_every: int = 0
    #: relationnet: channels of the relation module's conv blocks
    relation_hidden: int = 64

    def __post_init__(self) -> None:
        from experiments.tasks.fewshot_algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise FamBenchError(
                f"task.algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}."
            )
        if self.similarity not in ("euclidean", "cosine"):
            raise FamBenchError(
                f"task.similarity must be 'euclidean' or 'cosine' for ProtoNet, got "
                f"{self.similarity!r}."
            )
        if self.distance not in DISTANCES:
            raise FamBenchError(
                f"task.distance must be one of {list(DISTANCES)}, got {self.distance!r}."
            )
        if self.temperature is not None and self.temperature <= 0:
            raise FamBenchError(f"task.temperature must be > 0 or null, got {self.temperature}.")
        self._refuse_keys_the_algorithm_ignores()
        for key in ("train_way", "train_shot", "train_query", "monitor_way", "monitor_shot"):
            if getattr(self, key) < 1:
                raise FamBenchError(f"task.{key} must be >= 1, got {getattr(self, key)}.")

    def _refuse_keys_the_algorithm_ignores(self) -> None:
        """A key the algorithm never reads would still name the cache entry and the table
        while the numbers are those of the default: refuse it (values other than the
        default only, since experiment files set the defaults explicitly)."""
        a = self.algorithm
        ignored = []
        if a != "protonet" and self.similarity != "euclidean":
            ignored.append(f"task.similarity={self.similarity} (only protonet takes it)")
        if self.temperature is not None and (
            a == "relationnet" or (a == "protonet" and self.similarity == "euclidean")
        ):
            ignored.append(
                f"task.temperature={self.temperature} (the negative squared distance and the "
                "relation module have none; protonet takes it with task.similarity=cosine)"
            )
        if self.distance != FewShotConfig.distance and (
            a != "protonet" or self.similarity != "euclidean"
        ):
            ignored.append(
                f"task.distance={self.distance} (protonet with task.similarity=euclidean only)"
            )
        if a != "relationnet" and self.relation_hidden != FewShotConfig.relation_hidden:
            ignored.append(f"task.relation_hidden={self.relation_hidden} (relationnet only)")
        if ignored:
            raise FamBenchError(
                f"task.algorithm={a} does not read {'; '.join(ignored)}: drop the override(s) "
                "(conf/task/fewshot.yaml lists what each algorithm takes)."
            )


def episode_sampler(
    dataset: Any,
    way: int,
    shot: int,
    query: int,
    episodes: int,
    seed: int,
    keys: tuple[str, str, str],
):
    """``EpisodeSampler`` over ``dataset``; an impossible shape names the config keys."""
    from experiments.data import EpisodeSampler
    from experiments.training.batches import labels_of

    try:
        return EpisodeSampler(labels_of(dataset), way, shot, query, episodes, seed)
    except FamBenchError as err:
        raise FamBenchError(
            f"{err} Change {keys[0]}={way}, {keys[1]}={shot} or {keys[2]}={query} so that "
            "every episode fits the split."
        ) from None


class FewShot(TaskFamily):
    name = "fewshot"
    Config = FewShotConfig

    def __init__(self, config: FewShotConfig) -> None:
        from experiments.tasks.fewshot_algorithms import algorithm_for

        super().__init__(config)
        self.algorithm = algorithm_for(config)

    def check_data(self, run, train_set, eval_set):
        from experiments.config import MetricConfig

        m, default = run.metric, MetricConfig()
        given = [
            f"metric.{key}={getattr(m, key)}"
            for key in ("temperature", "distractors", "distractor_classes")
            if getattr(m, key) != getattr(default, key)
        ]
        if given:
            raise FamBenchError(
                f"{', '.join(given)} set(s) the retrieval and contrastive probability; the "
                "few-shot score is the algorithm's own episode softmax (its temperature is "
                "task.temperature). Drop the override(s)."
            )

    # learned state beside the network (a relation module, a temperature): the sidecar
    @property
    def requires_task_state(self) -> bool:
        return self.algorithm.requires_task_state

    def task_state(self, module: nn.Module) -> dict[str, Tensor]:
        return self.algorithm.task_state(module)

    def load_task_state(self, state: dict[str, Tensor]) -> None:
        self.algorithm.load_task_state(state)

    def training_module(self, model: nn.Module, train_set: Any, optim: dict[str, Any]):
        return self.algorithm.training_module(model, train_set, optim)

    def train_loader(self, train_set: Any, trainer: Any, seed: int):
        from torch.utils.data import DataLoader

        from experiments.training.batches import EpisodeImages

        own = self.algorithm.train_loader(train_set, trainer, seed)
        if own is not None:
            return own
        c = self.config
        sampler = episode_sampler(
            train_set,
            c.train_way,
            c.train_shot,
            c.train_query,
            trainer.max_steps,
            seed,
            ("task.train_way", "task.train_shot", "task.train_query"),
        )
        workers = trainer.num_workers
        return DataLoader(
            EpisodeImages(train_set, sampler),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def monitor(self, train_set: Any, val_set: Any, seed: int):
        c = self.config
        sampler = episode_sampler(
            val_set,
            c.monitor_way,
            c.monitor_shot,
            c.monitor_query,
            c.monitor_episodes,
            seed,
            ("task.monitor_way", "task.monitor_shot", "task.monitor_query"),
        )
        return "val_fewshot_accuracy", lambda m: self.algorithm.accuracy(
            m, val_set, sampler, train_set
        )["mean"]

    def protocol(self, eval_cfg: Any) -> dict[str, Any]:
        return {"n_way": eval_cfg.n_way, "n_shot": eval_cfg.n_shot, "n_query": eval_cfg.n_query}

    def evaluation(self, run, train_set, eval_set, model, device) -> FewShotEvaluation:
        e = run.eval
        if e.n_way < 2:
            raise FamBenchError(f"Episodes need eval.n_way >= 2 to compare classes, got {e.n_way}.")
        sampler = episode_sampler(
            eval_set,
            e.n_way,
            e.n_shot,
            e.n_query,
            e.num_episodes,
            run.seed,
            ("eval.n_way", "eval.n_shot", "eval.n_query"),
        )
        pairs = getattr(eval_set, "mode", "single") == "pairs"
        self.algorithm.prepare(model, train_set)
        return self.algorithm.evaluation(eval_set, sampler, e, run.metric.score, run.seed, pairs)


class FewShotEvaluation(Evaluation):
    """Episodes of the evaluation split, one unit per episode.

    In ``pairs`` mode (``SyntheticShapes(mode="pairs")``) each query image shows its own
    class's object and one of another episode class (picked from ``(seed, episode,
    query)``); the first is the ground truth, the second goes into ``other_masks``.
    """

    def __init__(
        self,
        dataset,
        sampler,
        n_way,
        n_shot,
        n_query,
        similarity,
        score,
        seed,
        pairs=False,
        temperature: float = 1.0,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        # the model's own logit scale (a cosine ProtoNet's learned tau; 1 for euclidean)
        self.temperature = float(temperature)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.similarity, self.score, self.seed, self.pairs = similarity, score, seed, pairs
        self.score_label = (
            "class probability (episode softmax)"
            if score == "probability"
            else f"{similarity} similarity to the prototype"
        )

    #: a query's label or the model's prediction (a second map where they differ)
    explains = ("true", "predicted")

    @property
    def num_units(self) -> int:
        return int(self.sampler.num_episodes)

    @property
    def confidence_available(self) -> bool:
        return self.score == "probability" or self.similarity == "cosine"

    def chance(self) -> float:
        return 1.0 / self.n_way

    def unit(self, e: int, model: nn.Module, device: torch.device) -> Unit:
        episode = self.sampler.episode(e)
        classes = torch.as_tensor(episode.classes).long()
        support, _, _ = stack_items(self.dataset, torch.as_tensor(episode.support).tolist(), device)
        query_idx = torch.as_tensor(episode.query).tolist()
        # Queries are class-major: query j belongs to episode class j // n_query.
        position = torch.arange(self.n_way).repeat_interleave(self.n_query)
        other_masks = None
        if self.pairs:
            # the other object's class: a stream of its own, keyed by (seed, episode, query)
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
            extras = {"annotation_sizes": annotation_sizes(self.dataset, len(query_idx))}
        else:
            extras = {}
            images, masks, labels = stack_items(self.dataset, query_idx, device, extras)
            other_labels = None
        position = position.to(device)

        def prototypes_of(net: nn.Module) -> Tensor:
            return embed(net, support).view(self.n_way, self.n_shot, -1).mean(1)

        prototypes = prototypes_of(model)
        similarity = self.similarity

        def logits(x: Tensor) -> Tensor:
            return pairwise(similarity, model(x).float(), prototypes)

        tau = self.temperature  # the model's own logit scale
        score = self.score

        def explaining(explained: Tensor) -> dict[str, Any]:
            """Reference and scores of the class ``explained (N,)`` (episode positions)."""

            def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
                probs = torch.softmax(tau * pairwise(similarity, emb, prototypes), dim=1)
                return probs.gather(1, explained[index][:, None])[:, 0]

            def probability(x: Tensor, index: Tensor) -> Tensor:
                return embedding_probability(model(x).float(), index)

            def raw_similarity(x: Tensor, index: Tensor) -> Tensor:
                return logits(x).gather(1, explained[index][:, None])[:, 0]

            def shifted_cosine(x: Tensor, index: Tensor) -> Tensor:
                return raw_similarity(x, index).clamp_min(0)

            confidence_fn = None
            if score == "probability":
                confidence_fn = probability
            elif similarity == "cosine":
                confidence_fn = shifted_cosine
            return {
                "reference": prototypes[explained],
                "score_fn": probability if score == "probability" else raw_similarity,
                "confidence_fn": confidence_fn,
                "reference_fn": lambda net: prototypes_of(net)[explained],
                "embedding_score": embedding_probability,
            }

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
            "predicted_label": classes[predicted.cpu()].tolist(),
            "correct": (predicted == position).tolist(),
        }
        if other_labels is not None:
            columns["other_label"] = other_labels
        common = dict(
            unit=e,
            images=images,
            similarity=similarity,
            masks=masks,
            other_masks=other_masks,
            boxes=extras.get("boxes"),
            annotation_sizes=extras.get("annotation_sizes"),
            columns=columns,
        )
        as_predicted = Unit(**common, **explaining(predicted), explains="predicted")
        return Unit(**common, **explaining(position), explains="true", predicted_unit=as_predicted)

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        from experiments.training.metrics import fewshot_accuracy

        acc = fewshot_accuracy(model, self.dataset, self.sampler, self.similarity)
        return {
            "fewshot_accuracy": float(acc["mean"]),
            "fewshot_accuracy_ci95": float(acc["ci95"]),
            "episodes": int(acc["n"]),
        }
