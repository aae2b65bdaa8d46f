"""The evaluation pipeline behind ``run.py``: data, model, every method x every metric.

``run(cfg, output_dir)`` does, in order:

1. checks the config (method and metric names, episode shape) and claims the output
   folder: ``run.json`` records the config fingerprint; a folder written under another
   config is refused (resume must never mix results);
2. builds the datasets and the model, and trains it or reuses the cached checkpoint
   (``cache_dir``, outside the run folder; key = model + data + task + training config);
3. writes the task's own accuracy to ``task_metrics.csv``;
4. evaluates every *unit* not yet on disk (a few-shot episode, or ``eval.unit_size``
   contrastive / retrieval queries; :mod:`experiments.tasks`). All methods explain the
   same samples; their maps go through each metric together (one deletion/insertion
   pass packs every method's perturbed images into full batches). Each unit is written
   atomically to ``shards/unit_<u>.pt`` (tmp file + ``os.replace``), so a run killed at
   any point and started again with the same ``hydra.run.dir`` redoes at most the units
   that were in flight;
5. with ``trainer.devices * trainer.num_nodes > 1``, units are sharded round-robin over
   processes started by Lightning Fabric (``trainer.strategy``, default ``ddp_spawn``:
   gloo on CPU, NCCL on GPU). A unit is a pure function of (config, model, unit index):
   every unit seeds torch's RNG and the methods' own generators from ``(seed, unit)``, so
   the merged results equal a one-process run;
6. merges the shards (in unit order) into ``results.csv``, ``summary.csv``,
   ``curves.npz``, ``sanity.csv`` (when ``sanity`` is asked for), the figures and
   ``environment.json``, and hands the summary to the configured logger.

``summary.csv``: per method and metric the mean over samples (``nan`` samples excluded
and counted in ``n_excluded``) with a t-based 95% confidence interval (``mean +- t_{0.975,
n-1} * sd / sqrt(n)``; samples of one episode share a support set, so for few-shot the
interval is somewhat optimistic). ``pointing_game_class_mean`` is the mean over classes
of each class's hit rate (TorchRay's second number); ``degenerate`` the share of
all-zero maps.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch import nn

from evaluation.names import CONFIDENCE_METRICS, GROUND_TRUTH_METRICS, SAMPLE_METRICS
from experiments.atomic import atomic_write, atomic_write_bytes
from experiments.data.seeding import derive_seed
from experiments.plain import to_plain
from experiments.tasks import FewShotTask, NeighbourTask, Unit, query_order
from fam.errors import FamBenchError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHARD_DIR = "shards"

#: metric names accepted in ``metrics``
METRICS = (*SAMPLE_METRICS, "sanity")

#: config entries that change how a run executes but never its numbers; they are left
#: out of the fingerprint so a run can resume on other hardware or with other batch sizes.
EXECUTION_KEYS = (
    ("trainer", "accelerator"),
    ("trainer", "devices"),
    ("trainer", "num_nodes"),
    ("trainer", "strategy"),
    ("trainer", "num_workers"),
    ("logger",),
    ("cache_dir",),
    ("eval", "progress"),
    ("eval", "batch_size"),
    ("eval", "figure_samples"),
    ("metric", "batch_size"),
    ("data", "root"),
)


# -- config checks ------------------------------------------------------------------------
def available_methods() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _name_list(cfg: DictConfig, key: str) -> list[str]:
    value = cfg.get(key)
    if isinstance(value, str):
        value = [value]
    if value is None or not OmegaConf.is_list(value) and not isinstance(value, list):
        raise FamBenchError(f"`{key}` must be a list of names, e.g. {key}=[a,b]; got {value!r}.")
    names = [str(v) for v in value]
    if not names:
        raise FamBenchError(f"`{key}` is empty; name at least one.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FamBenchError(f"`{key}` names {duplicates} more than once.")
    return names


def load_methods(names: list[str]) -> dict[str, Callable[..., Any]]:
    """``name -> factory(model, target_layer)`` from ``conf/method/<name>.yaml``."""
    known = available_methods()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FamBenchError(
            f"Unknown method(s) {unknown}. Valid methods (conf/method/*.yaml): {known}. "
            "Add a method with one module in baselines/ and one YAML file in conf/method/."
        )
    factories = {}
    for name in names:
        node = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
        if "explainer" not in node:
            raise FamBenchError(
                f"conf/method/{name}.yaml has no `explainer` node; it needs explainer: "
                "{_target_: ..., _partial_: true, ...}."
            )
        try:
            factories[str(node.get("name", name))] = instantiate(node.explainer, _partial_=True)
        except InstantiationException as err:
            raise FamBenchError(
                f"conf/method/{name}.yaml: cannot build its explainer "
                f"{node.explainer.get('_target_')!r} ({' '.join(str(err).split())}). Check "
                "`_target_` (a dotted path to the explainer class) and its options."
            ) from err
    return factories


def check_metrics(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise FamBenchError(f"Unknown metric(s) {unknown}. Valid metrics: {list(METRICS)}.")
    return names


def _drop(container: dict, path: tuple[str, ...]) -> None:
    node = container
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def config_fingerprint(cfg: DictConfig) -> tuple[str, dict]:
    """``(sha256[:16], the fingerprinted config)``: every entry that can change a number."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    for path in EXECUTION_KEYS:
        _drop(container, path)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], container


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def claim_output_dir(out: Path, fingerprint: str, fingerprinted: dict) -> None:
    """Refuse a folder that holds results of another config; record ours otherwise.

    A folder whose earlier run wrote no result shard yet (it stopped during training or
    on a config error) holds nothing to mix, so it is taken over by the new config.
    """
    path = out / "run.json"
    has_results = any((out / SHARD_DIR).glob("unit_*.pt"))
    if path.is_file() and has_results:
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") != fingerprint:
            old, new = _flatten(previous.get("config", {})), _flatten(fingerprinted)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise FamBenchError(
                f"The output folder {out} holds results of a different configuration "
                f"(changed: {', '.join(changed[:12]) or 'unknown'}); resuming would mix "
                "them. Use the original settings to resume, or a new folder "
                "(hydra.run.dir=...) for the new ones."
            )
        return
    # Taking the folder over: outputs of an earlier config must not sit beside ours.
    for stale in ("task_metrics.csv", "settings.json"):
        (out / stale).unlink(missing_ok=True)
    atomic_write_bytes(
        path,
        json.dumps(
            {"fingerprint": fingerprint, "config": fingerprinted},
            indent=2,
            sort_keys=True,
            default=str,
        ).encode(),
    )


# -- metric settings ----------------------------------------------------------------------
def metric_settings(
    cfg: DictConfig, image_size: int, task_name: str, similarity: str
) -> dict[str, Any]:
    """The resolved settings every number depends on (step and tolerance in pixels)."""
    m = cfg.metric
    step = int(m.step) if m.step is not None else int(image_size)
    tolerance = float(m.tolerance) * image_size / float(m.tolerance_image_size)
    score = str(m.score) if task_name == "fewshot" else "similarity"
    return {
        "step": step,
        "deletion_substrate": str(m.deletion_substrate),
        "insertion_substrate": str(m.insertion_substrate),
        "blur_kernel": int(m.blur_kernel),
        "blur_sigma": float(m.blur_sigma),
        "tolerance_px": round(tolerance, 4),
        "score": score,
        "similarity": similarity,
        "amp": bool(m.amp),
        "sanity_samples": int(m.sanity_samples),
        "image_size": int(image_size),
        # The evaluation protocol and the explained layer change the numbers as much as the
        # metric settings do (1-shot vs 5-shot, another layer), so they share the id.
        "protocol": _protocol(cfg, task_name),
    }


def _protocol(cfg: DictConfig, task_name: str) -> dict[str, Any]:
    model = cfg.get("model") or {}
    options = model.get("options") or {}
    protocol: dict[str, Any] = {
        "target_layer": model.get("target_layer"),
        "model_options": OmegaConf.to_container(options, resolve=True)
        if isinstance(options, DictConfig)
        else dict(options),
    }
    if task_name == "fewshot":
        protocol.update(
            {k: int(cfg.eval[k]) for k in ("n_way", "n_shot", "n_query") if k in cfg.eval}
        )
    return protocol


SUBSTRATES = ("zeros", "blur", "mean")


def check_settings(cfg: DictConfig) -> None:
    """Check typed settings before anything is trained, so that a typo such as
    ``eval.n_way=five`` is a clear error now rather than a traceback after training."""

    absent = object()

    def integer(path: str, minimum: int, optional: bool = False) -> None:
        value = OmegaConf.select(cfg, path, default=absent)
        if value is absent or (value is None and optional):
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise FamBenchError(
                f"{path} must be an integer >= {minimum}{' or null' if optional else ''}, "
                f"got {value!r}. Example: {path}={max(minimum, 1)}."
            )

    def number(path: str, positive: bool) -> None:
        value = OmegaConf.select(cfg, path, default=None)
        if value is None:
            return
        bad = isinstance(value, bool) or not isinstance(value, int | float)
        if bad or (value <= 0 if positive else value < 0):
            raise FamBenchError(
                f"{path} must be a number {'> 0' if positive else '>= 0'}, got {value!r}."
            )

    def choice(path: str, options: tuple[str, ...]) -> None:
        value = OmegaConf.select(cfg, path, default=None)
        if value is not None and value not in options:
            raise FamBenchError(f"{path} must be one of {list(options)}, got {value!r}.")

    integer("seed", 0)
    for key in ("num_episodes", "n_way", "n_shot", "n_query", "unit_size", "batch_size"):
        integer(f"eval.{key}", 1)
    integer("eval.num_queries", 1, optional=True)
    integer("trainer.max_steps", 0)
    integer("metric.step", 1, optional=True)
    integer("metric.batch_size", 1)
    integer("metric.blur_kernel", 1)
    integer("metric.sanity_samples", 1)
    number("metric.blur_sigma", positive=True)
    number("metric.tolerance", positive=False)
    number("metric.tolerance_image_size", positive=True)
    choice("metric.score", ("probability", "similarity"))
    choice("metric.deletion_substrate", SUBSTRATES)
    choice("metric.insertion_substrate", SUBSTRATES)


def settings_id(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# -- what a worker needs ------------------------------------------------------------------
@dataclass
class Evaluation:
    """Everything a (possibly spawned) worker needs to evaluate units; picklable."""

    task: Any
    model: nn.Module
    methods: dict[str, Callable[..., Any]]
    metrics: list[str]
    settings: dict[str, Any]
    fingerprint: str
    out: Path
    seed: int
    target_layer: str | None
    constants: dict[str, Any]
    explain_batch: int
    metric_batch: int
    figure_samples: int
    progress: bool
    accelerator: str
    notes: list[str] = field(default_factory=list)


def shard_path(out: Path, unit: int) -> Path:
    return out / SHARD_DIR / f"unit_{unit:06d}.pt"


def load_shard(path: Path, fingerprint: str) -> dict:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file cannot come from os.replace; refuse it
        raise FamBenchError(
            f"Cannot read the result shard {path} ({err}); delete it and run again to "
            "recompute that unit."
        ) from err
    if shard.get("fingerprint") != fingerprint:
        raise FamBenchError(
            f"The result shard {path} was written under a different configuration; "
            "resuming would mix results. Resume with the original settings, or use a new "
            "output folder (hydra.run.dir=...)."
        )
    return shard


def _make_explainer(
    factory: Callable[..., Any], model: nn.Module, target_layer: str | None, seed: int
):
    """A fresh explainer per unit; methods with their own RNG get the unit's seed."""
    target = factory.func if hasattr(factory, "func") else factory
    try:
        takes_seed = "seed" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_seed = False
    if takes_seed:
        return factory(model, target_layer, seed=seed)
    return factory(model, target_layer)


def _metric_values(
    ev: Evaluation, unit: Unit, maps: torch.Tensor, n: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample metric values ``(M*N,)`` for all methods' maps ``(M*N, H, W)`` at once."""
    from evaluation import (
        confidence_change,
        deletion_insertion,
        energy_pointing_game,
        pointing_game,
    )

    s, m = ev.settings, len(maps) // n
    images = unit.images.repeat(m, 1, 1, 1)
    values, curves = {}, {}
    if {"deletion_auc", "insertion_auc"} & set(ev.metrics):
        result = deletion_insertion(
            lambda x, i: unit.score_fn(x, i % n),
            images,
            maps,
            step=s["step"],
            deletion_substrate=s["deletion_substrate"],
            insertion_substrate=s["insertion_substrate"],
            batch_size=ev.metric_batch,
            blur_kernel_size=s["blur_kernel"],
            blur_sigma=s["blur_sigma"],
            model=ev.model,
            amp=s["amp"],
        )
        for name in ("deletion", "insertion"):
            if f"{name}_auc" in ev.metrics:
                values[f"{name}_auc"] = getattr(result, f"{name}_auc")
                curves[name] = getattr(result, f"{name}_curve")
    if set(CONFIDENCE_METRICS) & set(ev.metrics) and unit.confidence_fn is not None:
        change = confidence_change(
            lambda x, i: unit.confidence_fn(x, i % n),
            images,
            maps,
            batch_size=ev.metric_batch,
            model=ev.model,
            amp=s["amp"],
        )
        values["average_drop"] = change.drop
        values["increase_in_confidence"] = change.increase
    if unit.masks is not None:
        truths = {"": unit.masks}
        if unit.other_masks is not None:
            truths["_other"] = unit.other_masks
        for suffix, truth in truths.items():
            truth = truth.repeat(m, 1, 1)
            if "pointing_game" in ev.metrics:
                values[f"pointing_game{suffix}"] = pointing_game(maps, truth, s["tolerance_px"])
            if "energy_pointing_game" in ev.metrics:
                values[f"energy_pointing_game{suffix}"] = energy_pointing_game(maps, truth)
    values = {k: v for k, v in values.items() if k.removesuffix("_other") in ev.metrics}
    return values, curves


def evaluate_unit(ev: Evaluation, u: int, device: torch.device) -> dict:
    """All methods and metrics on unit ``u``: the shard's content (CPU tensors)."""
    torch.manual_seed(derive_seed(ev.seed, 11, u))
    unit = ev.task.unit(u, ev.model, device)
    n = len(unit.images)
    names = list(ev.methods)
    maps, degenerate = [], []
    similarity = ev.settings["similarity"]
    for name in names:
        explainer = _make_explainer(
            ev.methods[name], ev.model, ev.target_layer, derive_seed(ev.seed, 13, u)
        )
        for i in range(0, n, ev.explain_batch):
            maps.append(
                explainer(
                    unit.images[i : i + ev.explain_batch],
                    unit.reference[i : i + ev.explain_batch],
                    similarity,
                ).detach()
            )
            flags = getattr(explainer, "degenerate", None)
            degenerate.append(
                flags.bool().to(device)
                if flags is not None
                else torch.zeros(len(maps[-1]), dtype=torch.bool, device=device)
            )
    all_maps = torch.cat(maps).float()
    values, curves = _metric_values(ev, unit, all_maps, n)
    values = {k: v.double().cpu().view(len(names), n) for k, v in values.items()}
    degenerate_flags = torch.cat(degenerate).cpu().view(len(names), n)

    rows = []
    for k, name in enumerate(names):
        for j in range(n):
            row = {col: unit.columns[col][j] for col in ("sample_id", "episode", "index", "label")}
            row["method"] = name
            row.update(ev.constants)
            row.update({metric: float(v[k, j]) for metric, v in values.items()})
            row["degenerate"] = bool(degenerate_flags[k, j])
            row.update({col: vals[j] for col, vals in unit.columns.items() if col not in row})
            rows.append(row)
    shard: dict[str, Any] = {
        "fingerprint": ev.fingerprint,
        "unit": u,
        "rows": rows,
        "curves": {kind: c.float().cpu().view(len(names), n, -1) for kind, c in curves.items()},
        "sample_ids": list(unit.columns["sample_id"]),
    }
    if u == 0 and ev.figure_samples > 0:
        k = min(ev.figure_samples, n)
        shard["figure"] = {
            "images": unit.images[:k].cpu(),
            "masks": unit.masks[:k].cpu() if unit.masks is not None else None,
            "maps": all_maps.view(len(names), n, *all_maps.shape[1:])[:, :k].cpu(),
            "labels": list(unit.columns["label"][:k]),
        }
    if u == 0 and "sanity" in ev.metrics:
        shard["sanity"] = _sanity_rows(ev, unit, names)
    return shard


def _sanity_rows(ev: Evaluation, unit: Unit, names: list[str]) -> list[dict]:
    from evaluation import randomisation_sanity

    k = min(ev.settings["sanity_samples"], len(unit.images))
    rows = []
    for name in names:
        factory = ev.methods[name]

        def make(net: nn.Module, factory=factory):
            return _make_explainer(factory, net, ev.target_layer, derive_seed(ev.seed, 13, 0))

        result = randomisation_sanity(
            ev.model,
            make,
            unit.images[:k],
            lambda net: unit.reference_fn(net)[:k],
            ev.settings["similarity"],
            seed=ev.seed,
        )
        frame = result.to_frame()
        frame.insert(0, "method", name)
        frame["sample_id"] = [unit.columns["sample_id"][i] for i in frame["sample"]]
        rows.extend(frame.to_dict("records"))
    return rows


def _worker(
    fabric, ev: Evaluation, todo: list[int], after_unit: Callable[[int], None] | None
) -> None:
    """Evaluate this rank's share of ``todo`` (round-robin) and write each shard."""
    from tqdm.auto import tqdm

    world, rank = fabric.world_size, fabric.global_rank
    device = fabric.device
    if device.type == "cpu" and world > 1:
        # Processes share the CPU cores instead of each spawning a full thread pool.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ev.model.to(device).eval()
    mine = todo[rank::world]
    (ev.out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        mine,
        desc=f"explain+score ({ev.task.name})",
        unit="unit",
        disable=not ev.progress or rank != 0,
    )
    for u in bar:
        shard = evaluate_unit(ev, u, device)
        atomic_write(shard_path(ev.out, u), partial(torch.save, shard))
        if after_unit is not None:
            after_unit(u)


def launch(
    ev: Evaluation,
    todo: list[int],
    devices: int,
    num_nodes: int,
    strategy: str,
    after_unit: Callable[[int], None] | None = None,
) -> None:
    """Run :func:`_worker` in this process, or on ``devices x num_nodes`` processes."""
    from lightning.fabric import Fabric

    world = int(devices) * int(num_nodes)
    if world > 1:
        if after_unit is not None:
            raise FamBenchError("after_unit hooks run only in single-process evaluation.")
        # Workers receive a pickled copy and move it to their own device.
        ev.model.cpu()
        fabric = Fabric(
            accelerator=ev.accelerator,
            devices=int(devices),
            num_nodes=int(num_nodes),
            strategy=strategy,
        )
        fabric.launch(_worker, ev, todo, None)
    else:
        fabric = Fabric(accelerator=ev.accelerator, devices=1, strategy="auto")
        fabric.launch(_worker, ev, todo, after_unit)


# -- building the run ---------------------------------------------------------------------
def _device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise FamBenchError(
            "trainer.accelerator asks for a GPU but CUDA is not available; use "
            "trainer.accelerator=cpu (or auto)."
        )
    return torch.device("cpu")


def build_datasets(cfg: DictConfig) -> tuple[Any, Any]:
    """``(train_set, eval_set)`` of ``cfg.data`` (FamBenchError when missing/malformed)."""
    from experiments.data import build_dataset

    d = cfg.data
    if OmegaConf.is_missing(d, "root"):
        raise FamBenchError(
            f"Dataset {d.name!r} is read from disk: set data.root=<folder> on the command line "
            f"(conf/data/ describes each layout; `{cfg.name}` cannot run without it)."
        )
    root = to_absolute_path(str(d.root)) if d.root is not None else None
    options = to_plain(d.get("options")) or {}
    train = build_dataset(str(d.name), root, str(d.train_split), int(d.image_size), **options)
    test = build_dataset(str(d.name), root, str(d.eval_split), int(d.image_size), **options)
    return train, test


def training_key(cfg: DictConfig) -> dict[str, Any]:
    """The plain dict hashed into the model cache name (model + data + task + training)."""
    data = to_plain(cfg.data)
    data.pop("root", None)
    data.get("options", {}).pop("mode", None)  # pairs only change the evaluation queries
    data.pop("eval_split", None)
    model = to_plain(cfg.model)
    model.pop("checkpoint", None)
    model.pop("target_layer", None)
    execution = {path[1] for path in EXECUTION_KEYS if path[0] == "trainer"}
    trainer = {k: v for k, v in to_plain(cfg.trainer).items() if k not in execution}
    return {"model": model, "data": data, "task": to_plain(cfg.task), "trainer": trainer}


def build_model(cfg: DictConfig, train_set: Any, device: torch.device) -> nn.Module:
    from experiments.models import build_model_from_config
    from experiments.training import load_weights, train_or_load

    model, _ = build_model_from_config(to_plain(cfg.model))
    model = model.to(device)
    trainer = to_plain(cfg.trainer)
    if int(trainer["devices"]) * int(trainer["num_nodes"]) == 1:
        trainer["strategy"] = "auto"
    checkpoint = cfg.model.checkpoint
    if checkpoint is not None:
        # a given checkpoint is loaded, never trained on (any layout, see load_weights)
        load_weights(
            model,
            to_absolute_path(str(checkpoint)),
            key=cfg.model.get("checkpoint_key"),
            prefix=cfg.model.get("checkpoint_prefix"),
        )
        return model.to(device).eval()
    task_cfg = to_plain(cfg.task)
    task_name = task_cfg.pop("name")
    for key in ("bank_size", "recall_ks"):
        task_cfg.pop(key, None)
    return (
        train_or_load(
            model,
            train_set,
            task_name,
            task_cfg,
            trainer,
            None,
            to_absolute_path(str(cfg.cache_dir)),
            training_key(cfg),
            int(cfg.seed),
        )
        .to(device)
        .eval()
    )


def build_task(
    cfg: DictConfig, train_set: Any, eval_set: Any, model: nn.Module, device: torch.device
):
    task_name = str(cfg.task.name)
    similarity = str(cfg.task.similarity)
    e = cfg.eval
    if task_name == "fewshot":
        from experiments.data import EpisodeSampler

        n_way, n_shot, n_query = int(e.n_way), int(e.n_shot), int(e.n_query)
        num_episodes = int(e.num_episodes)  # >= 1: check_settings
        if n_way < 2:
            raise FamBenchError(f"Episodes need eval.n_way >= 2 to compare classes, got {n_way}.")
        sampler = EpisodeSampler(
            eval_set.labels, n_way, n_shot, n_query, num_episodes, int(cfg.seed)
        )
        pairs = getattr(eval_set, "mode", "single") == "pairs"
        return FewShotTask(
            eval_set,
            sampler,
            n_way,
            n_shot,
            n_query,
            similarity,
            str(cfg.metric.score),
            int(cfg.seed),
            pairs,
        )
    if task_name not in ("contrastive", "retrieval"):
        raise FamBenchError(
            f"Unknown task {task_name!r}; use task=fewshot, contrastive or retrieval."
        )
    num_queries = e.num_queries  # an integer >= 1 or None: check_settings
    queries = query_order(
        len(eval_set), None if num_queries is None else int(num_queries), int(cfg.seed)
    )
    if task_name == "contrastive":
        task = NeighbourTask(
            "contrastive", eval_set, train_set, queries, int(e.unit_size), similarity
        )
        bank_size = cfg.task.get("bank_size")
        bank = (
            None
            if bank_size is None
            else query_order(len(train_set), int(bank_size), int(cfg.seed) + 1)
        )
        task.find_neighbours(
            model, device, int(e.batch_size), exclude_self=False, bank_indices=bank
        )
    else:
        if len(eval_set) < 2:
            raise FamBenchError("Retrieval needs at least two gallery images.")
        task = NeighbourTask("retrieval", eval_set, eval_set, queries, int(e.unit_size), similarity)
        task.find_neighbours(model, device, int(e.batch_size), exclude_self=True)
    return task


def task_metrics(
    cfg: DictConfig, task: Any, model: nn.Module, train_set: Any, eval_set: Any
) -> dict[str, float]:
    from experiments.training import fewshot_accuracy, knn_accuracy, recall_at_k

    if task.name == "fewshot":
        return task.task_metrics(model, fewshot_accuracy)
    if task.name == "contrastive":
        k = int(cfg.task.get("knn_k", 200))
        return {f"knn{k}_accuracy": float(knn_accuracy(model, train_set, eval_set, k))}
    ks = tuple(int(k) for k in cfg.task.get("recall_ks", (1, 2, 4, 8)))
    return {k: float(v) for k, v in recall_at_k(model, eval_set, None, ks).items()}


# -- merging ------------------------------------------------------------------------------
def summarise(results: pd.DataFrame, metric_columns: list[str]) -> pd.DataFrame:
    """One row per method and metric: mean, t-based 95% CI, n, n_excluded."""
    from scipy import stats

    def row(method: str, metric: str, values: np.ndarray) -> dict:
        values = values.astype(float)
        valid = values[~np.isnan(values)]
        n = len(valid)
        mean = float(valid.mean()) if n else math.nan
        half = math.nan
        if n > 1:  # a single sample has no interval (nan)
            half = float(stats.t.ppf(0.975, n - 1) * valid.std(ddof=1) / math.sqrt(n))
        return {
            "method": method,
            "metric": metric,
            "mean": mean,
            "ci95_low": mean - half,
            "ci95_high": mean + half,
            "n": n,
            "n_excluded": len(values) - n,
        }

    out = []
    for method, group in results.groupby("method", sort=False):
        for metric in metric_columns:
            out.append(row(method, metric, group[metric].to_numpy()))
            if metric == "pointing_game":
                per_class = group.groupby("label")[metric].mean().to_numpy()
                out.append(row(method, "pointing_game_class_mean", per_class))
        out.append(row(method, "degenerate", group["degenerate"].to_numpy(float)))
    frame = pd.DataFrame(out)
    for col in ("settings_id", "experiment", "dataset", "model", "task"):
        if col in results:
            frame[col] = results[col].iloc[0]
    return frame


def merge(ev: Evaluation, num_units: int, loaded: dict[Path, dict] | None = None) -> dict[str, Any]:
    """Shards -> results.csv, summary.csv, curves.npz, sanity.csv; returns what figures use.

    ``loaded``: shards already read with :func:`load_shard` (path -> shard), not read again.
    """
    loaded = loaded or {}
    rows, sanity, figure = [], [], None
    curves: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    sample_ids = []
    names = list(ev.methods)
    for u in range(num_units):
        path = shard_path(ev.out, u)
        shard = loaded[path] if path in loaded else load_shard(path, ev.fingerprint)
        rows.extend(shard["rows"])
        sanity.extend(shard.get("sanity", []))
        figure = shard.get("figure", figure)
        sample_ids.extend(shard["sample_ids"])
        for kind, values in shard["curves"].items():
            for k, name in enumerate(names):
                curves[name][kind].append(values[k])
    results = pd.DataFrame(rows)
    metric_columns = [c for m in METRICS for c in (m, f"{m}_other") if c in results.columns]
    front = ["sample_id", "episode", "index", "label", "method", *ev.constants]
    rest = [c for c in results.columns if c not in front and c not in metric_columns]
    results = results[front + metric_columns + rest]
    atomic_write_bytes(ev.out / "results.csv", results.to_csv(index=False).encode())
    summary = summarise(results, metric_columns)
    atomic_write_bytes(ev.out / "summary.csv", summary.to_csv(index=False).encode())
    merged_curves = {
        name: {kind: torch.cat(parts).numpy() for kind, parts in kinds.items()}
        for name, kinds in curves.items()
    }
    if merged_curves:
        arrays = {
            f"{name}/{kind}": arr
            for name, kinds in merged_curves.items()
            for kind, arr in kinds.items()
        }

        def write_curves(tmp: Path) -> None:
            # A file object: given a path, np.savez would append ".npz" to the tmp name.
            with open(tmp, "wb") as f:
                np.savez(f, sample_id=np.asarray(sample_ids), **arrays)

        atomic_write(ev.out / "curves.npz", write_curves)
    if sanity:
        atomic_write_bytes(ev.out / "sanity.csv", pd.DataFrame(sanity).to_csv(index=False).encode())
    return {"results": results, "summary": summary, "curves": merged_curves, "figure": figure}


# -- outputs ------------------------------------------------------------------------------
def write_figures(ev: Evaluation, merged: dict[str, Any], eval_set: Any) -> list[Path]:
    """``maps.png`` (images x methods, ground truth outlined) and ``curves.png``."""
    from experiments.figures import plot_curves, plot_map_grid

    paths = []
    figure = merged["figure"]
    if figure is not None:
        classes = list(getattr(eval_set, "classes", []) or [])
        labels = [classes[int(c)] if int(c) < len(classes) else str(c) for c in figure["labels"]]
        maps = {name: figure["maps"][k] for k, name in enumerate(ev.methods)}
        paths.append(
            plot_map_grid(
                figure["images"],
                maps,
                figure["masks"],
                ev.out / "maps.png",
                eval_set.mean,
                eval_set.std,
                labels=labels,
            )
        )
    if merged["curves"]:
        paths.append(plot_curves(merged["curves"], ev.out / "curves.png"))
    return [Path(p) for p in paths]


def run(
    cfg: DictConfig,
    output_dir: str | os.PathLike,
    *,
    after_unit: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run one experiment into ``output_dir`` (module docstring); resumes what is there.

    ``after_unit(u)`` is called after unit ``u`` was written (single-process runs only;
    tests use it to interrupt a run). Returns the merged frames and the output paths.
    """
    from experiments.environment import write_environment
    from experiments.loggers import build_logger

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = load_methods(_name_list(cfg, "methods"))
    metrics = check_metrics(_name_list(cfg, "metrics"))
    check_settings(cfg)
    logger = build_logger(cfg.logger, out, str(cfg.name))
    fingerprint, fingerprinted = config_fingerprint(cfg)
    claim_output_dir(out, fingerprint, fingerprinted)
    torch.manual_seed(int(cfg.seed))

    accelerator = str(cfg.trainer.accelerator)
    device = _device(accelerator)
    train_set, eval_set = build_datasets(cfg)
    model = build_model(cfg, train_set, device)
    task = build_task(cfg, train_set, eval_set, model, device)

    notes = []
    if not getattr(eval_set, "has_masks", False):
        skipped = [m for m in metrics if m in GROUND_TRUTH_METRICS]
        if skipped:
            notes.append(
                f"{skipped} skipped: dataset {cfg.data.name!r} has no ground-truth masks or boxes."
            )
        metrics = [m for m in metrics if m not in GROUND_TRUTH_METRICS]
    if not task.confidence_available:
        skipped = [m for m in metrics if m in CONFIDENCE_METRICS]
        if skipped:
            notes.append(
                f"{skipped} skipped: they need a non-negative score; the raw "
                f"{cfg.task.similarity} similarity is not (use metric.score="
                "probability)."
            )
        metrics = [m for m in metrics if m not in CONFIDENCE_METRICS]
    for note in notes:
        log.warning(note)

    settings = metric_settings(cfg, int(cfg.data.image_size), task.name, task.similarity)
    sid = settings_id(settings)
    ev = Evaluation(
        task=task,
        model=model,
        methods=methods,
        metrics=metrics,
        settings=settings,
        fingerprint=fingerprint,
        out=out,
        seed=int(cfg.seed),
        target_layer=cfg.model.target_layer,
        accelerator=accelerator,
        constants={
            "experiment": str(cfg.name),
            "dataset": str(cfg.data.name),
            "model": str(cfg.model.name),
            "task": task.name,
            "settings_id": sid,
        },
        explain_batch=int(cfg.eval.batch_size),
        metric_batch=int(cfg.metric.batch_size),
        figure_samples=int(cfg.eval.figure_samples),
        progress=bool(cfg.eval.progress),
        notes=notes,
    )

    task_path = out / "task_metrics.csv"
    if not task_path.is_file():
        values = task_metrics(cfg, task, model, train_set, eval_set)
        frame = pd.DataFrame([{"metric": k, "value": v} for k, v in values.items()])
        for col, value in ev.constants.items():
            frame[col] = value
        atomic_write_bytes(task_path, frame.to_csv(index=False).encode())

    done, loaded = set(), {}
    for path in sorted((out / SHARD_DIR).glob("unit_*.pt")):
        unit = int(path.stem.split("_")[1])
        loaded[path] = load_shard(path, fingerprint)  # merge reuses it
        done.add(unit)
    todo = [u for u in range(task.num_units) if u not in done]
    if done:
        log.info(
            "resuming: %d of %d units already done",
            len(done & set(range(task.num_units))),
            task.num_units,
        )
    if todo:
        launch(
            ev,
            todo,
            int(cfg.trainer.devices),
            int(cfg.trainer.num_nodes),
            str(cfg.trainer.strategy),
            after_unit,
        )
    merged = merge(ev, task.num_units, loaded)
    figures = write_figures(ev, merged, eval_set)
    atomic_write_bytes(
        out / "settings.json",
        json.dumps({"settings_id": sid, "settings": settings, "notes": notes}, indent=2).encode(),
    )
    write_environment(
        out / "environment.json",
        cfg_dict={
            "config": to_plain(cfg),
            "metric_settings": settings,
            "settings_id": sid,
            "notes": notes,
        },
        device=device,
        seed=int(cfg.seed),
    )
    logger.log_run(cfg, merged["summary"], pd.read_csv(task_path), figures)
    table = merged["summary"].pivot(index="method", columns="metric", values="mean")
    log.info("mean per method and metric (settings %s):\n%s", sid, table.round(3).to_string())
    log.info("results in %s", out.resolve())
    return {**merged, "out": out, "figures": figures, "notes": notes, "settings_id": sid}
