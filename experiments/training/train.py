"""``train_or_load``: load a checkpoint, reuse a cached one, or train with Lightning.

Training dispatches through the task family object it is given (a
:class:`~experiments.tasks.base.TaskFamily`, never a name): the family builds its
LightningModule, its loader and its monitor; this module only runs them and knows no
family.

Learned state outside the embedding network (a relation module, a learned temperature)
travels in a *sidecar* next to the weights, ``<weights stem>.task.pt`` (a flat
``name -> tensor`` dict, read with ``weights_only=True``). A family opts in with the
optional methods ``task_state(module) -> dict[str, Tensor]`` (empty: nothing to keep),
``load_task_state(state)`` and the flag ``requires_task_state``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as L
import torch
from torch import nn

from experiments.atomic import atomic_write
from experiments.config import TrainerConfig, typed_node
from experiments.training.base import TaskModule
from experiments.training.checkpoints import cache_path, load_weights, save_weights
from fam.errors import FamBenchError
from fam.layers import model_device

if TYPE_CHECKING:  # the contract a family fulfils; training imports no family
    from experiments.tasks.base import TaskFamily

log = logging.getLogger(__name__)


def train_or_load(
    model: nn.Module,
    train_set: Any,
    family: TaskFamily,
    trainer_cfg: Mapping[str, Any] | TrainerConfig,
    checkpoint: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    key: Mapping[str, Any],
    seed: int = 0,
    val_set: Any | None = None,
    *,
    fallback_dir: str | os.PathLike | None = None,
    logger: Any = False,
    progress: bool = False,
    notes: list[str] | None = None,
) -> nn.Module:
    """Return ``model`` with trained weights, in eval mode, on the device it came on.

    1. ``checkpoint`` given: load it (``weights_only=True``; see :func:`load_weights`);
       nothing is trained.
    2. Else, if ``cache_dir/<task>-<model>-<hash>.pt`` exists, load it. The hash is
       sha256[:16] of the canonical JSON of ``{"key": key, "seed": seed}``: ``key`` is the
       plain dict of model + data + training config the caller builds, and the seed is
       added because it changes the trained weights too.
    3. Else train (:func:`fit`) and write the embedding network's state_dict to that path
       atomically (``cache_dir=None`` trains without caching). If the cache cannot be
       written (read-only, full), the weights go to ``fallback_dir/model.pt`` instead and
       a note says where; a trained model is never thrown away.

    ``family``: the task family (its config included) that trains the model.
    ``val_set`` with the family's ``monitor_every > 0`` logs its task metric during
    training (``monitor_history`` of the task module).
    """
    if checkpoint:
        load_weights(model, checkpoint)
        load_checkpoint_task_state(family, checkpoint)
        return model.eval()
    path = None
    if cache_dir is not None:
        path = cached_checkpoint(cache_dir, family.name, model, key, seed)
        # weights without a sidecar the family needs are an incomplete entry: retrain
        if path.is_file() and (load_task_state(family, path) or not requires_task_state(family)):
            log.info("loading the cached model %s", path)
            load_cached_weights(model, path)
            return model.eval()
    log.info("training for %d steps", as_trainer(trainer_cfg).max_steps)
    device = model_device(model)
    module, trainer = fit(
        model,
        train_set,
        family,
        trainer_cfg,
        seed,
        val_set,
        logger=logger,
        progress=progress,
    )
    if device is not None:  # Lightning may leave it elsewhere after teardown
        model.to(device)
    state = task_state(family, module)
    if state:
        family.load_task_state(state)  # the same state a reload would give
    if trainer.is_global_zero and (path is not None or fallback_dir is not None):
        _keep(model, path, fallback_dir, notes, state)
    return model.eval()


def load_cached_weights(model: nn.Module, path: Path) -> None:
    """Load a model-cache entry; one that cannot be read is named as a cache entry that
    can be deleted (the run then retrains), never as the user's checkpoint."""
    try:
        load_weights(model, path)
    except FamBenchError as err:
        raise FamBenchError(
            f"The model-cache entry {path} cannot be used: {err} This is a cache file the "
            f"suite wrote, not your checkpoint: delete it (rm {path}) and run again to retrain."
        ) from None


def task_state_path(weights: str | os.PathLike) -> Path:
    """The sidecar of a weights file: ``dir/name.pt -> dir/name.task.pt``."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.task.pt")


def load_checkpoint_task_state(family: TaskFamily, checkpoint: str | os.PathLike) -> None:
    """Load the sidecar of a given checkpoint; a family that needs one and finds none is
    a :class:`FamBenchError`."""
    if not load_task_state(family, checkpoint) and requires_task_state(family):
        raise FamBenchError(
            f"model.checkpoint={checkpoint} has no sidecar {task_state_path(checkpoint)}: "
            f"task {family.name!r} ({_algorithm(family)}) keeps learned state beside the "
            "embedding network (e.g. a relation module or a learned temperature), saved "
            "there when the model was trained. Put that file next to the checkpoint, or "
            "leave model.checkpoint unset to train."
        )


def requires_task_state(family: TaskFamily) -> bool:
    return bool(getattr(family, "requires_task_state", False))


def task_state(family: TaskFamily, module: TaskModule) -> dict[str, torch.Tensor]:
    """The family's learned state beside the network after training (``{}``: none)."""
    get = getattr(family, "task_state", None)
    return {} if get is None else {k: v.detach().cpu() for k, v in get(module).items()}


def save_task_state(state: dict[str, torch.Tensor], weights: str | os.PathLike) -> Path:
    """Write the sidecar of ``weights`` atomically."""
    path = task_state_path(weights)
    atomic_write(path, partial(torch.save, dict(state)))
    return path


def load_task_state(family: TaskFamily, weights: str | os.PathLike) -> bool:
    """Load the sidecar of ``weights`` into the family; ``False`` when there is none."""
    path = task_state_path(weights)
    load = getattr(family, "load_task_state", None)
    if load is None or not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: all mean "not loadable"
        raise FamBenchError(
            f"The task-state sidecar {path} could not be read with torch.load("
            f"weights_only=True): {err}. Delete it (and its weights) to retrain."
        ) from err
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError) as err:
        raise FamBenchError(
            f"The task-state sidecar {path} does not fit task {family.name!r} "
            f"({_algorithm(family)}): {err}. It was saved by another task configuration."
        ) from err
    return True


def _algorithm(family: TaskFamily) -> str:
    config = family.config
    return f"algorithm {getattr(config, 'algorithm', None) or getattr(config, 'loss', '?')}"


def _keep(
    model: nn.Module,
    path: Path | None,
    fallback_dir,
    notes: list[str] | None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the trained weights (and the family's sidecar) to the cache, or to the run
    folder when that fails for any reason (a full disk makes ``torch.save`` raise a
    ``RuntimeError``, not an ``OSError``). When both fail the model stays in memory for
    this run's evaluation and a note says where it could not be saved."""
    failures = []
    for target in (path, Path(fallback_dir) / "model.pt" if fallback_dir is not None else None):
        if target is None:
            continue
        try:
            _save(model, target, state)
        except Exception as err:  # noqa: BLE001 - any write failure: try the next place
            failures.append(f"{target}: {_why(err)}")
            continue
        if target != path:
            _note(
                notes,
                f"the model cache {path.parent if path else None} could not be written "
                f"({failures[0].split(': ', 1)[1]}); the trained model was saved to "
                f"{target} instead (reuse it with model.checkpoint={target}).",
            )
        return
    if fallback_dir is None and path is not None:
        raise FamBenchError(
            f"The trained model could not be written to the cache ({failures[0]}); set "
            "cache_dir=<a writable folder>."
        )
    _note(
        notes,
        f"the trained model could not be saved anywhere ({'; '.join(failures)}); it is "
        "evaluated from memory and lost when the run ends. Free some space or choose "
        "writable folders (cache_dir=..., hydra.run.dir=...) to keep it.",
    )


def _save(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if state:  # the sidecar first: weights alone would be an incomplete entry
        save_task_state(state, path)
    save_weights(model, path)


def _why(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _note(notes: list[str] | None, note: str) -> None:
    log.warning(note)
    if notes is not None:
        notes.append(note)


def as_trainer(trainer_cfg: Mapping[str, Any] | TrainerConfig) -> TrainerConfig:
    """``trainer_cfg`` checked against :class:`TrainerConfig` (the one set of defaults)."""
    if isinstance(trainer_cfg, TrainerConfig):
        return trainer_cfg
    return typed_node("trainer", TrainerConfig, dict(trainer_cfg))


def fit(
    model: nn.Module,
    train_set: Any,
    family: TaskFamily,
    trainer_cfg: Mapping[str, Any] | TrainerConfig,
    seed: int = 0,
    val_set: Any | None = None,
    *,
    logger: Any = False,
    progress: bool = False,
) -> tuple[TaskModule, L.Trainer]:
    """Train ``model`` in place for ``trainer.max_steps`` steps; returns the task module
    (its ``train_losses``, ``monitor_history``) and the trainer.

    ``family``: the task family object; it builds the LightningModule and the loader.
    ``logger``: a Lightning logger that gets the training curves (``train_loss`` every
    ``log_every_n_steps`` steps, the monitor); ``progress``: a progress bar with the
    current loss.
    """
    trainer = as_trainer(trainer_cfg)
    L.seed_everything(seed, workers=True, verbose=False)
    optim = {
        "lr": trainer.lr,
        "weight_decay": trainer.weight_decay,
        "optimizer": trainer.optimizer,
        "channels_last": trainer.channels_last,
    }
    module = family.training_module(model, train_set, optim)
    loader = family.train_loader(train_set, trainer, seed)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    callbacks = []
    every = int(getattr(family.config, "monitor_every", 0) or 0)
    if val_set is not None and every > 0:
        callbacks.append(Monitor(every, *family.monitor(train_set, val_set, seed)))
    if trainer.world_size > 1:
        # DDP would split each batch and average gradients over the processes: the weights
        # would depend on trainer.devices, an execution key (sharded evaluation only)
        log.info(
            "training in one process; trainer.devices=%d x num_nodes=%d shard the evaluation",
            trainer.devices,
            trainer.num_nodes,
        )
    lightning_trainer = L.Trainer(
        max_steps=trainer.max_steps,
        max_epochs=-1,
        accelerator=trainer.accelerator,
        devices=1,
        num_nodes=1,
        strategy="auto",
        precision=trainer.precision,
        deterministic=trainer.deterministic,
        gradient_clip_val=trainer.gradient_clip_val,
        enable_progress_bar=progress,
        logger=logger,
        log_every_n_steps=trainer.log_every_n_steps,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    module.train()  # a model that comes back from train_or_load is in eval mode
    lightning_trainer.fit(module, loader)
    return module, lightning_trainer


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
