"""The ``fewshot`` task family and its config (``conf/task/fewshot.yaml``).

:class:`FewShot` trains and evaluates with the algorithm ``task.algorithm`` names
(:mod:`experiments.tasks.fewshot.algorithm`): the algorithm builds the training module
and, per episode, the classifier that :class:`~experiments.tasks.fewshot.episodes.
EpisodeEvaluation` explains; the family draws the episodes and checks the shared keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from experiments.config import MetricConfig
from experiments.embedding import gather
from experiments.tasks.base import TaskFamily
from experiments.tasks.fewshot.algorithm import algorithm_class
from experiments.tasks.fewshot.episodes import EpisodeEvaluation, episode_sampler
from fam.errors import FamBenchError


class EpisodeImages(Dataset):
    """Episode ``e`` of an ``EpisodeSampler`` as one batch: images ``(W*(S+Q), 3, H, W)``,
    support then query, each class-major (the episode label of a row is its class's
    position in ``episode.classes``). Use with ``DataLoader(batch_size=None)``."""

    def __init__(self, dataset: Any, sampler: Any) -> None:
        self.dataset = dataset
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, e: int) -> Tensor:
        return gather(self.dataset, self.sampler.episode(e).indices)


@dataclass
class FewShotConfig:
    """``conf/task/fewshot.yaml``."""

    name: str = "fewshot"
    #: protonet | matchingnet | relationnet | simpleshot (experiments/tasks/fewshot/), a
    #: name registered with experiments.tasks.fewshot.register_algorithm, or the dotted
    #: path of a FewShotAlgorithm subclass
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
        cls = algorithm_class(self.algorithm)
        cls.check_options(self)
        if self.temperature is not None and self.temperature <= 0:
            raise FamBenchError(f"task.temperature must be > 0 or null, got {self.temperature}.")
        self._refuse_keys_the_algorithm_ignores(cls.reads(self))
        for key in ("train_way", "train_shot", "train_query", "monitor_way", "monitor_shot"):
            if getattr(self, key) < 1:
                raise FamBenchError(f"task.{key} must be >= 1, got {getattr(self, key)}.")

    def _refuse_keys_the_algorithm_ignores(self, reads: frozenset[str]) -> None:
        """A key the algorithm never reads would still name the cache entry and the table
        while the numbers are those of the default: refuse it (values other than the
        default only, since experiment files set the defaults explicitly)."""
        ignored = [
            f"task.{key}={getattr(self, key)} ({why})"
            for key, why in ALGORITHM_KEYS.items()
            if key not in reads and getattr(self, key) != getattr(FewShotConfig, key)
        ]
        if ignored:
            raise FamBenchError(
                f"task.algorithm={self.algorithm} does not read {'; '.join(ignored)}: drop "
                "the override(s) (conf/task/fewshot.yaml lists what each algorithm takes)."
            )


#: the task keys only some algorithms read (``FewShotAlgorithm.reads``), and who does
ALGORITHM_KEYS = {
    "similarity": "only protonet takes it",
    "temperature": (
        "the negative squared distance and the relation module have none; protonet takes "
        "it with task.similarity=cosine"
    ),
    "distance": "protonet with task.similarity=euclidean only",
    "relation_hidden": "relationnet only",
}


class FewShot(TaskFamily):
    """Few-shot classification from a support set (``task.name=fewshot``)."""

    name = "fewshot"
    Config = FewShotConfig

    def __init__(self, config: FewShotConfig) -> None:
        super().__init__(config)
        self.algorithm = algorithm_class(config.algorithm)(config)

    def check_data(self, run, train_set, eval_set):
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

    def evaluation(self, run, train_set, eval_set, model, device) -> EpisodeEvaluation:
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
        return EpisodeEvaluation(
            self.algorithm,
            eval_set,
            sampler,
            e.n_way,
            e.n_shot,
            e.n_query,
            run.metric.score,
            run.seed,
            pairs,
        )
