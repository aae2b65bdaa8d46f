"""The few-shot algorithm contract and its registry (``task.algorithm``).

:class:`FewShotAlgorithm` is what one algorithm owns: its option checks (run when the
task config is built, before anything else), its training module and loader, learned
state beside the network (the sidecar) and its :class:`EpisodeClassifier`.
:func:`register_algorithm` (a class decorator) makes a subclass selectable as
``task.algorithm=<its name>``; :func:`algorithm_class` finds it by that name, or imports
it from a dotted path ``task.algorithm=<module>.<Class>``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.tasks.fewshot.episodes import EpisodeClassifier, episode_accuracy
from fam.errors import FamBenchError

#: ``task.algorithm`` -> its class (built-ins and every :func:`register_algorithm` call)
ALGORITHMS: dict[str, type[FewShotAlgorithm]] = {}


class FewShotAlgorithm:
    """One few-shot algorithm: its options, its training module and its episode classifier.

    ``config`` is the family's :class:`~experiments.tasks.fewshot.family.FewShotConfig`.
    Learned state beside the embedding network is held here (set live by
    :meth:`training_module`, or by :meth:`load_task_state` from the sidecar).
    """

    name: ClassVar[str]
    #: the similarity's name in settings and results
    similarity_name: ClassVar[str]
    #: the explained similarity is a non-negative score (Average Drop can read it)
    nonnegative_similarity: ClassVar[bool] = False
    #: the score the causal metrics read under ``metric.score=probability``, in words
    score_label: ClassVar[str] = "class probability (episode softmax)"
    #: the algorithm-specific task keys it reads (``FewShotConfig``'s ``similarity``,
    #: ``distance``, ``temperature``, ``relation_hidden``); a value other than the
    #: default for any other one is refused
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- options (checked when the task config is built) --------------------------------
    @classmethod
    def check_options(cls, config: Any) -> None:
        """Refuse a bad value of an option this algorithm reads (a ``FamBenchError`` that
        names the key); runs in ``FewShotConfig.__post_init__``, before anything runs."""

    @classmethod
    def reads(cls, config: Any) -> frozenset[str]:
        """The algorithm-specific task keys read under ``config`` (default: ``options``)."""
        return frozenset(cls.options)

    # -- training -----------------------------------------------------------------------
    def training_module(self, model: nn.Module, train_set: Any, optim: dict[str, Any]):
        raise NotImplementedError

    def train_loader(self, train_set: Any, trainer: Any, seed: int):
        """A loader of its own, or ``None`` for the family's episodic one."""
        return None

    # -- learned state beside the network (the sidecar) ---------------------------------
    @property
    def requires_task_state(self) -> bool:
        return False

    def task_state(self, module: nn.Module) -> dict[str, Tensor]:
        return {}

    def load_task_state(self, state: dict[str, Tensor]) -> None:
        """Nothing to load by default."""

    # -- evaluation ---------------------------------------------------------------------
    @property
    def similarity_label(self) -> str:
        """The score the causal metrics read under ``metric.score=similarity``, in words."""
        return self.similarity_name

    @property
    def similarity_confidence(self) -> Callable[[Tensor], Tensor] | None:
        """The non-negative score Average Drop / Increase in Confidence read from the
        explained similarity under ``metric.score=similarity`` (``None``: not available)."""
        return _itself if self.nonnegative_similarity else None

    def prepare(self, model: nn.Module, train_set: Any) -> None:
        """Compute what the classifier needs from the training split (SimpleShot's mean)."""

    def to(self, device: torch.device) -> FewShotAlgorithm:
        """Move learned modules to ``device`` in eval mode (before explaining)."""
        return self

    def classifier(self, support: Tensor, n_way: int, n_shot: int) -> EpisodeClassifier:
        """``support (W*S, D)``, class-major -> the episode's classifier."""
        raise NotImplementedError

    def accuracy(self, model: nn.Module, dataset: Any, sampler: Any, train_set: Any = None):
        """``{"mean", "ci95", "n"}`` over the sampler's episodes (the model's own rule)."""
        if train_set is not None:
            self.prepare(model, train_set)
        return episode_accuracy(model, dataset, sampler, self)

    def _episode_module(self, cls, model, **kwargs):
        c = self.config
        return cls(model, c.train_way, c.train_shot, c.train_query, **kwargs)


def _itself(similarity: Tensor) -> Tensor:
    return similarity


def register_algorithm(cls: type[FewShotAlgorithm]) -> type[FewShotAlgorithm]:
    """Class decorator: make ``cls`` selectable as ``task.algorithm=<cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, FewShotAlgorithm)):
        raise TypeError(f"{cls!r} is not a FewShotAlgorithm subclass")
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (its task.algorithm)")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_class(name: str) -> type[FewShotAlgorithm]:
    """The class of ``task.algorithm``: a registered name, or the dotted path of a
    ``FewShotAlgorithm`` subclass (``module.Class`` or ``module:Class``), imported and
    registered on first use."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if "." not in name and ":" not in name:
        raise FamBenchError(f"task.algorithm must be one of {sorted(ALGORITHMS)}, got {name!r}.")
    module, _, attr = name.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise FamBenchError(
            f"task.algorithm={name!r} cannot be imported ({err}); give a registered name "
            f"({sorted(ALGORITHMS)}) or the dotted path of a FewShotAlgorithm subclass."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, FewShotAlgorithm)):
        raise FamBenchError(f"task.algorithm={name!r} is not a FewShotAlgorithm subclass.")
    register_algorithm(cls)
    return cls


def split_episode(emb: Tensor, n_way: int, n_shot: int, n_query: int) -> tuple[Tensor, Tensor]:
    """An episode batch's embeddings ``(W*(S+Q), D) -> support (W*S, D), query (W*Q, D)``
    (``W*S`` support images then ``W*Q`` queries, each class-major); a wrong size is an
    error."""
    n_support = n_way * n_shot
    if emb.shape[0] != n_support + n_way * n_query:
        raise FamBenchError(
            f"Episode batch has {emb.shape[0]} images; {n_way}-way {n_shot}-shot "
            f"{n_query}-query needs {n_support + n_way * n_query}."
        )
    return emb[:n_support], emb[n_support:]
