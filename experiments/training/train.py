"""``train_or_load``: load a checkpoint, reuse a cached one, or train with Lightning."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.training.base import TaskModule
from experiments.training.batches import (
    EpisodeImages,
    IndexedBatches,
    TwoViews,
    labels_of,
    pass_through,
)
from experiments.training.checkpoints import cache_path, load_weights, save_weights
from experiments.training.contrastive import SimCLRModule
from experiments.training.fewshot import ProtoNetModule
from experiments.training.metrics import embed, fewshot_accuracy, knn_accuracy, recall_at_k
from experiments.training.retrieval import MetricLearningModule
from fam.errors import FamBenchError
from fam.layers import model_device

TASKS = ("fewshot", "contrastive", "retrieval")

# Defaults of trainer_cfg. Only these keys are accepted, so a typo is an error, not a
# silently ignored setting.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 200,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "optimizer": "adam",
    "batch_size": 128,
    "accelerator": "auto",
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "precision": "32-true",
    "num_workers": 0,
    "deterministic": False,
    "channels_last": False,
    "gradient_clip_val": None,
    "enable_progress_bar": False,
    "logger": False,
    "log_every_n_steps": 50,
}

# Defaults of the task_cfg keys training reads (other keys, e.g. evaluation settings,
# are left to their users).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "fewshot": {
        "similarity": "euclidean",
        "temperature": None,
        "train_way": 5,
        "train_shot": 5,
        "train_query": 15,
        "monitor_way": 5,
        "monitor_shot": 5,
        "monitor_query": 15,
        "monitor_episodes": 50,
    },
    "contrastive": {
        "temperature": 0.5,
        "projection_dim": 128,
        "min_scale": 0.08,
        "cj_prob": 0.8,
        "cj_strength": 1.0,
        "random_gray_scale": 0.2,
        "gaussian_blur": None,
        "hf_prob": 0.5,
        "knn_k": 20,
    },
    "retrieval": {
        "loss": "multi_similarity",
        "miner": None,
        "margin": None,
        "samples_per_class": 4,
    },
}
COMMON_TASK_DEFAULTS: dict[str, Any] = {"monitor_every": 0}


def train_or_load(
    model: nn.Module,
    train_set: Any,
    task: str,
    task_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    checkpoint: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    key: Mapping[str, Any],
    seed: int = 0,
    val_set: Any | None = None,
) -> nn.Module:
    """Return ``model`` with trained weights, in eval mode, on the device it came on.

    1. ``checkpoint`` given: load it (``weights_only=True``; a state_dict or a Lightning
       checkpoint, see :func:`load_weights`); nothing is trained.
    2. Else, if ``cache_dir/<task>-<model>-<hash>.pt`` exists, load it. The hash is
       sha256[:16] of the canonical JSON of ``{"key": key, "seed": seed}``: ``key`` is the
       plain dict of model + data + training config the caller builds, and the seed is
       added because it changes the trained weights too.
    3. Else train with Lightning (seeded with ``lightning.seed_everything(seed)``) and write
       the embedding network's state_dict to that path atomically (``cache_dir=None``
       trains without caching).

    ``task``: ``"fewshot"`` (ProtoNet on episodes of ``train_set``), ``"contrastive"``
    (SimCLR) or ``"retrieval"`` (pml loss + miner on ``MPerClassSampler`` batches).
    ``task_cfg`` / ``trainer_cfg``: plain dicts, defaults in ``TASK_DEFAULTS`` /
    ``TRAINER_DEFAULTS``. ``val_set`` with ``task_cfg["monitor_every"] > 0`` logs the task
    metric every that many steps (few-shot accuracy, kNN accuracy against ``train_set``,
    Recall@1) as ``val_<metric>`` and in the task module's ``monitor_history``.
    """
    if task not in TASKS:
        raise FamBenchError(f"Unknown task {task!r}; use one of {TASKS}.")
    if checkpoint:
        return load_weights(model, checkpoint).eval()
    path = None
    if cache_dir is not None:
        path = cached_checkpoint(cache_dir, task, model, key, seed)
        if path.is_file():
            return load_weights(model, path).eval()
    device = model_device(model)
    _, trainer = fit(model, train_set, task, task_cfg, trainer_cfg, seed, val_set)
    if device is not None:  # Lightning may leave it elsewhere after teardown
        model.to(device)
    if path is not None and trainer.is_global_zero:
        save_weights(model, path)
    return model.eval()


def resolve_trainer_cfg(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``TRAINER_DEFAULTS`` overridden by ``trainer_cfg``; unknown keys are an error."""
    unknown = sorted(set(trainer_cfg) - set(TRAINER_DEFAULTS))
    if unknown:
        raise FamBenchError(
            f"Unknown trainer setting(s) {unknown}; accepted: {sorted(TRAINER_DEFAULTS)}."
        )
    cfg = {**TRAINER_DEFAULTS, **trainer_cfg}
    if int(cfg["max_steps"]) < 1:
        raise FamBenchError(f"trainer max_steps must be >= 1, got {cfg['max_steps']}.")
    return cfg


def resolve_task_cfg(task: str, task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``TASK_DEFAULTS[task]`` overridden by ``task_cfg`` (extra keys pass through)."""
    return {**COMMON_TASK_DEFAULTS, **TASK_DEFAULTS[task], **task_cfg}


def build_task_module(
    model: nn.Module,
    train_set: Any,
    task: str,
    task_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
) -> TaskModule:
    """The LightningModule that trains ``model`` for ``task`` (configs already resolved)."""
    optim = {
        "lr": float(trainer_cfg["lr"]),
        "weight_decay": float(trainer_cfg["weight_decay"]),
        "optimizer": trainer_cfg["optimizer"],
        "channels_last": bool(trainer_cfg["channels_last"]),
    }
    if task == "fewshot":
        return ProtoNetModule(
            model,
            int(task_cfg["train_way"]),
            int(task_cfg["train_shot"]),
            int(task_cfg["train_query"]),
            task_cfg["similarity"],
            task_cfg["temperature"],
            **optim,
        )
    if task == "contrastive":
        embedding_dim = embed(model, train_set, torch.arange(2)).shape[1]
        return SimCLRModule(
            model,
            embedding_dim,
            int(task_cfg["projection_dim"]),
            float(task_cfg["temperature"]),
            **optim,
        )
    return MetricLearningModule(
        model, task_cfg["loss"], task_cfg["miner"], task_cfg["margin"], **optim
    )


def train_loader(
    train_set: Any,
    task: str,
    task_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    seed: int,
) -> DataLoader:
    """Batches for ``task``: one episode per step (fewshot), shuffled pairs of views
    (contrastive), class-balanced ``MPerClassSampler`` batches (retrieval)."""
    workers = int(trainer_cfg["num_workers"])
    common = {"num_workers": workers, "persistent_workers": workers > 0}
    batch_size = int(trainer_cfg["batch_size"])
    if task == "fewshot":
        sampler = _episode_sampler(train_set, task_cfg, "train", trainer_cfg["max_steps"], seed)
        return DataLoader(EpisodeImages(train_set, sampler), batch_size=None, **common)
    if task == "contrastive":
        if len(train_set) < batch_size:
            raise FamBenchError(
                f"SimCLR batch_size {batch_size} exceeds the {len(train_set)} training images; "
                "lower trainer.batch_size."
            )
        views = TwoViews(
            train_set,
            _image_size(train_set),
            **{
                k: task_cfg[k]
                for k in (
                    "min_scale",
                    "cj_prob",
                    "cj_strength",
                    "random_gray_scale",
                    "gaussian_blur",
                    "hf_prob",
                )
            },
        )
        return DataLoader(views, batch_size=batch_size, shuffle=True, drop_last=True, **common)
    from pytorch_metric_learning.samplers import MPerClassSampler

    view = IndexedBatches(train_set)
    per_class = int(task_cfg["samples_per_class"])
    n_classes = len(torch.unique(view.labels))
    if batch_size % per_class or per_class * n_classes < batch_size:
        raise FamBenchError(
            f"Retrieval batches need batch_size ({batch_size}) to be a multiple of "
            f"samples_per_class ({per_class}) and at most samples_per_class x classes "
            f"({per_class * n_classes})."
        )
    sampler = MPerClassSampler(
        view.labels,
        per_class,
        batch_size=batch_size,
        length_before_new_iter=max(len(view), batch_size),
    )
    return DataLoader(
        view,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=pass_through,
        drop_last=True,
        **common,
    )


def fit(
    model: nn.Module,
    train_set: Any,
    task: str,
    task_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    seed: int = 0,
    val_set: Any | None = None,
) -> tuple[TaskModule, L.Trainer]:
    """Train ``model`` in place for ``trainer_cfg["max_steps"]`` steps; returns the task
    module (its ``train_losses``, ``monitor_history``) and the trainer."""
    if task not in TASKS:
        raise FamBenchError(f"Unknown task {task!r}; use one of {TASKS}.")
    trainer_cfg = resolve_trainer_cfg(trainer_cfg)
    task_cfg = resolve_task_cfg(task, task_cfg)
    L.seed_everything(seed, workers=True, verbose=False)
    module = build_task_module(model, train_set, task, task_cfg, trainer_cfg)
    loader = train_loader(train_set, task, task_cfg, trainer_cfg, seed)
    if trainer_cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    callbacks = []
    every = int(task_cfg["monitor_every"])
    if val_set is not None and every > 0:
        callbacks.append(Monitor(every, *_monitor(task, train_set, val_set, task_cfg, seed)))
    trainer = L.Trainer(
        max_steps=int(trainer_cfg["max_steps"]),
        max_epochs=-1,
        accelerator=trainer_cfg["accelerator"],
        devices=trainer_cfg["devices"],
        num_nodes=int(trainer_cfg["num_nodes"]),
        strategy=trainer_cfg["strategy"],
        precision=trainer_cfg["precision"],
        deterministic=trainer_cfg["deterministic"],
        gradient_clip_val=trainer_cfg["gradient_clip_val"],
        enable_progress_bar=bool(trainer_cfg["enable_progress_bar"]),
        logger=trainer_cfg["logger"],
        log_every_n_steps=int(trainer_cfg["log_every_n_steps"]),
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    module.train()  # a model that comes back from train_or_load is in eval mode
    trainer.fit(module, loader)
    return module, trainer


def _image_size(dataset: Any) -> int:
    size = getattr(dataset, "image_size", None)
    if size is None:
        size = dataset[0]["image"].shape[-1]
    return int(size[-1] if isinstance(size, tuple | list) else size)


def _episode_sampler(
    dataset: Any, task_cfg: Mapping[str, Any], prefix: str, num_episodes: Any, seed: int
) -> Any:
    """``EpisodeSampler`` over ``dataset``'s labels with the ``<prefix>_way`` /
    ``<prefix>_shot`` / ``<prefix>_query`` settings of ``task_cfg``."""
    from experiments.data import EpisodeSampler

    return EpisodeSampler(
        labels_of(dataset),
        int(task_cfg[f"{prefix}_way"]),
        int(task_cfg[f"{prefix}_shot"]),
        int(task_cfg[f"{prefix}_query"]),
        int(num_episodes),
        seed,
    )


def _monitor(
    task: str, train_set: Any, val_set: Any, task_cfg: Mapping[str, Any], seed: int
) -> tuple[str, Callable[[nn.Module], float]]:
    if task == "fewshot":
        sampler = _episode_sampler(val_set, task_cfg, "monitor", task_cfg["monitor_episodes"], seed)
        return "val_fewshot_accuracy", lambda m: fewshot_accuracy(
            m, val_set, sampler, task_cfg["similarity"]
        )["mean"]
    if task == "contrastive":
        return "val_knn_accuracy", lambda m: knn_accuracy(
            m, train_set, val_set, int(task_cfg["knn_k"])
        )
    return "val_recall@1", lambda m: recall_at_k(m, val_set, ks=(1,))["recall@1"]


class Monitor(L.Callback):
    """Every ``every`` steps (and after the last), evaluate ``fn(model)`` and log it."""

    def __init__(self, every: int, name: str, fn: Callable[[nn.Module], float]) -> None:
        self.every, self.name, self.fn = every, name, fn

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: TaskModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= trainer.max_steps:
            value = self.fn(pl_module.model)
            pl_module.monitor_history.append((step, value))
            pl_module.log(self.name, value, prog_bar=True)


def cached_checkpoint(
    cache_dir: str | os.PathLike, task: str, model: nn.Module, key: Mapping[str, Any], seed: int = 0
) -> Path:
    """Where ``train_or_load`` caches (or finds) the weights for these arguments."""
    return cache_path(cache_dir, task, model, {"key": key, "seed": seed})
