"""A run's identity, in one place: which config keys identify what, and the ids made of them.

- the **model** (``model_id``, the model-cache key :func:`training_key`): the model, the
  training data (its content id in place of ``data.root``), the task and the training
  config, less the keys that change only the evaluation or the execution;
- the **table** (``table_id``, :func:`table_id`): the evaluated data, the model, the task
  and the metric settings: one leaderboard table;
- the **method entry** (``settings_id``, :func:`settings_id`): the metric settings and
  protocol (:func:`metric_settings`) plus one method's options (:func:`method_options`,
  less :data:`METHOD_EXECUTION_OPTIONS`);
- the **run** (the fingerprint in ``run.json``, :func:`fingerprint_of`): every config
  entry that can change a number, less :data:`EXECUTION_KEYS`.

Each task family adds its own through class attributes of
:class:`~experiments.tasks.base.TaskFamily`: ``evaluation_keys`` (task keys that stay
out of the model's identity) and ``trainer_identity_keys`` (execution keys of the
trainer that do change its weights). Every id here is stored (``results.csv``,
``run.json``, the cache's file names): none of them may change for an unchanged config.
"""

from __future__ import annotations

from typing import Any

import torch

from evaluation.plain import plain, short_hash
from evaluation.registry import explained_classes
from experiments.config import DataConfig, ModelConfig, RunConfig, TrainerConfig
from experiments.tasks.base import TaskFamily

#: method options that change how fast a method runs, never its maps
METHOD_EXECUTION_OPTIONS = frozenset({"batch_size", "ablation_batch"})
#: trainer keys that change where and how fast training runs, never the weights (training
#: runs in one process whatever ``devices``); a family names those that do change its
#: weights in ``TaskFamily.trainer_identity_keys`` (:func:`trainer_identity`)
TRAINER_EXECUTION_KEYS = frozenset(
    {"accelerator", "devices", "num_nodes", "strategy", "num_workers", "log_every_n_steps"}
)
#: config entries that change how a run executes but never its numbers; they are left
#: out of the fingerprint so a run can resume on other hardware or with other batch sizes.
EXECUTION_KEYS = (
    *(("trainer", k) for k in sorted(TRAINER_EXECUTION_KEYS)),
    ("logger",),
    ("cache_dir",),
    ("output_dir",),
    ("eval", "progress"),
    ("eval", "batch_size"),
    ("eval", "figure_samples"),
    ("eval", "untrained_baseline"),
    ("metric", "batch_size"),
    ("data", "root"),
)
#: model keys that name where the weights come from or what is explained, not the weights
_MODEL_NOT_TRAINED = ("checkpoint", "target_layer", "label")
#: model keys that name where a given checkpoint's tensors sit in its file
_CHECKPOINT_LOCATION = ("checkpoint", "checkpoint_key", "checkpoint_prefix")


def resolve_amp(amp: str, device: torch.device) -> bool:
    """``metric.amp`` of a run on ``device``, decided once per run (the pipeline): ``auto``
    is bf16 autocast on CUDA and fp32 elsewhere (so CPU numbers never depend on it);
    ``true`` forces autocast (bf16 on CPU too)."""
    return amp == "true" or (amp == "auto" and device.type == "cuda")


def trainer_identity(trainer: TrainerConfig, family: TaskFamily) -> dict[str, Any]:
    """Execution keys of the trainer that do change this family's weights
    (``family.trainer_identity_keys``), each when not 0: e.g. the contrastive views are
    drawn in the data-loader workers, one random stream per worker, so ``num_workers > 0``
    trains other weights than ``0``. They join the model cache key and the fingerprint."""
    keys = {}
    for key in family.trainer_identity_keys:
        value = int(getattr(trainer, key))
        if value > 0:
            keys[key] = value
    return keys


def located_data(data: DataConfig, content_id: str | None) -> dict[str, Any]:
    """``data`` as an identity: ``data.root`` (where the files lie) replaced by the
    split's content id (which files they are; :func:`experiments.builders.data_content`),
    for on-disk datasets."""
    located = plain(data)
    located.pop("root", None)
    if content_id:
        located["content"] = content_id
    return located


def training_key(
    run: RunConfig, family: TaskFamily, content: dict[str, str] | None = None
) -> dict[str, Any]:
    """The plain dict the model cache is keyed on (model + data + task + training);
    ``content`` is :func:`~experiments.builders.data_content` (the training split's id
    replaces ``data.root``)."""
    data = located_data(run.data, content and content["train"])
    data.get("options", {}).pop("mode", None)  # pairs only change the evaluation queries
    data.pop("eval_split", None)
    model = plain(run.model)
    for key in _MODEL_NOT_TRAINED:
        model.pop(key, None)
    trainer = {k: v for k, v in plain(run.trainer).items() if k not in TRAINER_EXECUTION_KEYS}
    trainer.update(trainer_identity(run.trainer, family))
    task = dict(run.task)
    for key in family.evaluation_keys:
        task.pop(key, None)
    return {"model": model, "data": data, "task": task, "trainer": trainer}


def model_id(
    run: RunConfig,
    family: TaskFamily,
    content: dict[str, str] | None = None,
    weights: str | None = None,
) -> str:
    """Identifies the weights: with ``model.checkpoint``, the content of the tensors loaded
    (``weights``: :func:`~experiments.training.checkpoints.weights_id`, whatever the file
    format, its entry or its key prefix) and the model config; otherwise the training key."""
    if run.model.checkpoint:
        if not weights:
            raise ValueError("model_id of a checkpoint run needs the loaded weights' id")
        return checkpoint_model_id(run.model, weights)
    return short_hash(training_key(run, family, content), 12)


def checkpoint_model_id(model: ModelConfig, weights: str) -> str:
    """``model_id`` of given weights: their content id and the model config."""
    config = plain(model)
    for key in _CHECKPOINT_LOCATION:
        config.pop(key, None)
    return short_hash({"weights": weights, "model": config}, 12)


def table_id(
    data: DataConfig,
    content_id: str | None,
    model: str,
    task: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    """One leaderboard table: the evaluated data (``content_id``: the evaluation split's),
    the ``model_id``, the task config and the metric settings."""
    value = {
        "data": located_data(data, content_id),
        "model": model,
        "task": dict(task),
        "settings": settings,
    }
    return short_hash(value, 12)


def method_options(target: str, options: dict[str, Any], autocast: bool) -> dict[str, Any]:
    """The options that define a method's maps (``method_options`` in results, part of
    ``settings_id``): ``_target_`` and its options less :data:`METHOD_EXECUTION_OPTIONS`.
    A method's own ``amp`` is recorded as what runs: the run's ``autocast`` turns it on
    for every method that offers it (the worker's ``make_explainer``)."""
    shown = {k: v for k, v in options.items() if k not in METHOD_EXECUTION_OPTIONS}
    if "amp" in shown:
        shown["amp"] = bool(shown["amp"]) or autocast
    return {"_target_": target, **shown}


def metric_settings(
    run: RunConfig, family: TaskFamily, evaluation: Any, autocast: bool
) -> dict[str, Any]:
    """The resolved settings every number depends on (step and tolerance in pixels, the
    run's ``autocast``) and the evaluation protocol (``protocol``): they make up
    ``settings_id``."""
    m = run.metric
    size = run.data.image_size
    step = m.step if m.step is not None else size
    tolerance = m.tolerance * size / m.tolerance_image_size
    return {
        "step": int(step),
        "deletion_substrate": m.deletion_substrate,
        "insertion_substrate": m.insertion_substrate,
        "blur_kernel": m.blur_kernel,
        "blur_sigma": float(m.blur_sigma),
        "ties": m.ties,
        # the class each metric explains (its source's, or metric.explain_class for all)
        "explain_class": explained_classes(
            list(run.metrics),
            m.explain_class,
            tuple(getattr(evaluation, "explains", ("predicted",))),
        ),
        "tolerance": float(m.tolerance),
        "tolerance_at": m.tolerance_at,
        "tolerance_px": round(tolerance, 4),
        "energy_region": m.energy_region,
        "confidence_space": m.confidence_space,
        "score": getattr(evaluation, "score", "similarity"),
        "similarity": evaluation.similarity,
        # the probability's distractors and temperature (contrastive / retrieval)
        **getattr(evaluation, "score_settings", {}),
        "amp": autocast,
        "sanity_samples": m.sanity_samples,
        "image_size": size,
        # The evaluation protocol and the explained layer change the numbers as much as the
        # metric settings do (1-shot vs 5-shot, another layer), so they share the id.
        "protocol": {
            "target_layer": run.model.target_layer,
            "model_options": dict(run.model.options),
            "model_target": run.model.target,
            "model_kwargs": dict(run.model.kwargs),
            **family.protocol(run.eval),
        },
    }


def settings_id(settings: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    """Short hash of the metric settings and protocol, plus one method's options."""
    value = settings if options is None else {**settings, "method": options}
    return short_hash(value, 8)


def fingerprint_of(
    run: RunConfig,
    family: TaskFamily,
    methods: dict[str, dict[str, Any]],
    autocast: bool,
    content: dict[str, str] | None = None,
) -> tuple[str, dict]:
    """``(sha256[:16], the fingerprinted config)``: every entry that can change a number,
    including each listed method's options (``methods``: name -> :func:`method_options`),
    the resolved ``autocast`` and the data's content id (in place of ``data.root``)."""
    container = plain(run)
    for path in EXECUTION_KEYS:
        node = container
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    # metric.amp=auto means fp32 on CPU and bf16 on CUDA: the precision used is what counts
    container["metric"]["amp"] = autocast
    container["method"] = dict(methods)
    container["trainer"].update(trainer_identity(run.trainer, family))
    if content:
        container["data"]["content"] = dict(content)
    return short_hash(container), container
