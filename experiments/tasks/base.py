"""The task-family protocol: one class per family owns everything task-specific.

A *task family* (few-shot, contrastive, retrieval, or a user's own) is one subclass of
:class:`TaskFamily` registered with :func:`experiments.tasks.register`. It owns

- its config: the dataclass ``Config`` that ``conf/task/<name>.yaml`` is checked against
  (the one set of defaults; an unknown key is an error naming the nearest one);
- training: :meth:`training_module` (its LightningModule), :meth:`train_loader`,
  :meth:`monitor` (the validation metric logged during training);
- evaluation: :meth:`evaluation` returns a :class:`TaskEvaluation` that cuts the run into
  *units* (a few-shot episode, a block of queries). A unit is a pure function of the
  config, the model and its index, so any unit can be recomputed on its own, in any
  process and order (resume and sharding are exact);
- its own accuracy: :meth:`TaskEvaluation.task_metrics`.

The pipeline, the builders, the worker, the run's identity
(:mod:`experiments.identity`) and training take the family *object* and dispatch
through its methods and class attributes; none of them compares task names. Only the
registry maps ``task.name`` to a class. Task names are still compared outside that path:
:mod:`experiments.unread_keys` lists each built-in family's training-only keys by name,
and :mod:`evaluation.summary` clusters few-shot results by episode
(``CLUSTER_BY_TASK``). A new family costs a task module (the subclass), a training module (its
LightningModule) and ``conf/task/<name>.yaml`` (``name: <name>``, plus ``family:
<dotted path of the class>`` when it lives outside this package).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.data.seeding import Stream, generator

ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Unit:
    """One evaluation unit on the model's device.

    ``images (N, 3, H, W)``; ``reference (N, D)``; ``masks``/``other_masks`` ``(N, H, W)``
    bool or ``None``; ``score_fn(perturbed (B, 3, H, W), index (B,)) -> (B,)`` the score
    the faithfulness metrics read; ``confidence_fn`` the non-negative score for Average
    Drop / Increase in Confidence (``None``: not available); ``reference_fn(net) -> (N, D)``
    recomputes the references with another network (randomisation sanity check);
    ``columns`` per-sample values written into each result row (lists of length N);
    ``similarity`` what the explainers explain (a name or a callable ``(emb, ref) -> (N,)``);
    ``boxes (N, 4)`` and ``annotation_sizes (N, 2)`` (the resolution masks were drawn at)
    when the data has them.
    ``embedding_score(emb (B, D), index (B,)) -> (B,)`` the task probability (whatever
    ``metric.score`` says) of embeddings of (perturbed) samples ``index``, for
    explainers that declare ``needs_task_score`` (Score-CAM's post-softmax score);
    ``None`` when the task has none.
    ``explains``: the class the unit's reference stands for, ``"true"`` (the sample's
    label) or ``"predicted"`` (the model's decision); ``predicted_unit``: for a unit that
    explains ``"true"``, the same samples explained as the model predicts (its
    reference, scores and ``reference_fn`` for the predicted class), or ``None``.
    """

    unit: int
    images: Tensor
    reference: Tensor
    score_fn: ScoreFn
    confidence_fn: ScoreFn | None
    reference_fn: Callable[[nn.Module], Tensor]
    similarity: Any = "cosine"
    masks: Tensor | None = None
    other_masks: Tensor | None = None
    boxes: Tensor | None = None
    annotation_sizes: Tensor | None = None
    reference_images: Tensor | None = None
    embedding_score: ScoreFn | None = None
    columns: dict[str, list] = field(default_factory=dict)
    explains: str = "predicted"
    predicted_unit: Unit | None = None


class TaskEvaluation:
    """What a task family explains on a run (see :meth:`TaskFamily.evaluation`)."""

    #: the score the causal metrics read, in words (figure axes, docs/results.md)
    score_label: str = "score"
    #: the similarity explained (a name for the summary and settings)
    similarity: str = "cosine"
    #: the classes a unit can explain (``Unit.explains``, then its ``predicted_unit``)
    explains: tuple[str, ...] = ("predicted",)
    #: whether ``task_metrics`` of a re-initialised copy is a cheap, meaningful floor
    #: (``eval.untrained_baseline``); few-shot's untrained accuracy is near chance anyway
    untrained_baseline: bool = False

    @property
    def num_units(self) -> int:
        raise NotImplementedError

    @property
    def confidence_available(self) -> bool:
        """Whether Average Drop / Increase in Confidence have a non-negative score."""
        raise NotImplementedError

    def unit(self, u: int, model: nn.Module, device: torch.device) -> Unit:
        raise NotImplementedError

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def chance(self) -> float | None:
        """Chance level of the first task metric (for the 'near chance' warning)."""
        return None


class TaskFamily:
    """Base class of a task family (module docstring). ``config`` is a ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    #: task config keys that change only the evaluation, never the trained weights: they
    #: stay out of the model's identity (:func:`experiments.identity.training_key`)
    evaluation_keys: ClassVar[tuple[str, ...]] = ()
    #: trainer execution keys that do change this family's weights when not 0 (e.g.
    #: ``num_workers`` where views are drawn in the loader workers): they join the model's
    #: identity and the run fingerprint (:func:`experiments.identity.trainer_identity`)
    trainer_identity_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- training -------------------------------------------------------------------------
    def training_module(self, model: nn.Module, train_set: Any, optim: dict[str, Any]):
        """The LightningModule (an ``experiments.training.base.TaskModule``)."""
        raise NotImplementedError

    def train_loader(self, train_set: Any, trainer: Any, seed: int):
        raise NotImplementedError

    def monitor(
        self, train_set: Any, val_set: Any, seed: int
    ) -> tuple[str, Callable[[nn.Module], float]]:
        raise NotImplementedError

    # -- evaluation -----------------------------------------------------------------------
    def check_data(self, run: Any, train_set: Any, eval_set: Any) -> None:
        """Refuse data this task would evaluate otherwise than asked (FamBenchError);
        called before anything is trained or written."""

    def protocol(self, eval_cfg: Any) -> dict[str, Any]:
        """The evaluation-protocol values that change numbers (go into ``settings_id``)."""
        return {}

    def evaluation(
        self, run: Any, train_set: Any, eval_set: Any, model: nn.Module, device: torch.device
    ) -> TaskEvaluation:
        raise NotImplementedError


def stack_items(
    dataset, indices: Sequence[int], device: torch.device, extras: dict | None = None
) -> tuple[Tensor, Tensor | None, list[int]]:
    """Images ``(N, 3, H, W)``, masks ``(N, H, W)`` (or ``None``) and labels of items.

    ``extras``, if given, receives ``annotation_sizes`` ``(N, 2)`` (the resolution each
    mask was drawn at: the items' ``annotation_size`` or the dataset's) and ``boxes``
    ``(N, 4)`` (the items' ``box``) when the dataset has them.
    """
    if hasattr(dataset, "__getitems__"):  # batched fetch (e.g. rendered together)
        items = list(dataset.__getitems__([int(i) for i in indices]))
    else:
        items = [dataset[int(i)] for i in indices]
    images = torch.stack([it["image"] for it in items]).to(device)
    masks = None
    if getattr(dataset, "has_masks", False):
        masks = torch.stack([torch.as_tensor(it["mask"]) for it in items]).bool().to(device)
    if extras is not None:
        extras["annotation_sizes"] = annotation_sizes(dataset, items)
        if items and "box" in items[0]:
            extras["boxes"] = torch.stack([torch.as_tensor(it["box"]) for it in items]).to(device)
    return images, masks, [int(it["label"]) for it in items]


def annotation_sizes(dataset, items: Sequence[dict] | int) -> Tensor | None:
    """``(N, 2)`` (height, width) each item's mask was drawn at, or ``None`` if unknown."""
    n = items if isinstance(items, int) else len(items)
    if not isinstance(items, int) and items and "annotation_size" in items[0]:
        return torch.tensor([list(it["annotation_size"]) for it in items], dtype=torch.float64)
    size = getattr(dataset, "annotation_size", None)
    if size is None:
        return None
    return torch.tensor([list(size)] * n, dtype=torch.float64)


def query_order(n_items: int, num_queries: int | None, seed: int) -> Tensor:
    """The evaluation-split indices explained: a seeded permutation, first ``num_queries``."""
    order = torch.randperm(n_items, generator=generator(seed, Stream.QUERY_ORDER))
    return order if num_queries is None else order[:num_queries]
