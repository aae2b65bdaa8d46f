"""The evaluation pipeline behind ``run.py``: data, model, every method x every metric.

``run(cfg, output_dir)`` reads top to bottom:

1. the config becomes a typed :class:`~experiments.config.RunConfig` (unknown keys and
   wrong values are errors before anything runs); the task family, the methods (with
   their options) and the metrics are resolved and checked;
2. the output folder is locked and claimed (:class:`~experiments.store.OutputStore`):
   ``run.json`` records the fingerprint of everything that changes a number, and a
   folder holding results of another config is refused;
3. the datasets and the model are built, and the model trained or loaded
   (:mod:`experiments.builders`; cached outside the run folder);
4. the task's own accuracy goes to ``task_metrics.csv``;
5. every unit not yet on disk is evaluated (:mod:`experiments.worker`), in this process
   or sharded over ``trainer.devices x trainer.num_nodes`` processes, each unit written
   atomically as a shard;
6. the shards are merged into ``results.csv``, ``curves.npz`` and ``sanity.csv``; the
   summary (:mod:`evaluation.summary`), the figures, ``settings.json``,
   ``environment.json`` and the logger follow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from evaluation.plain import plain
from evaluation.registry import METRICS, metric_columns
from evaluation.reporting.figures import plot_run_figures
from evaluation.reporting.map_grid import plot_map_grid
from evaluation.reporting.report import write_run_report
from evaluation.sanity import reinitialised
from evaluation.summary import summarise
from experiments import builders, config, identity
from experiments.checks import conservation_warnings, run_warnings, settings_warnings
from experiments.environment import write_environment
from experiments.loggers import build_logger
from experiments.store import OutputStore
from experiments.tasks import family_for
from experiments.tasks.base import TaskFamily, annotation_sizes
from experiments.worker import Job, launch
from fam.errors import FamBenchError

log = logging.getLogger(__name__)

#: the steps of a run, one progress line each (:func:`progress`)
STEPS = ("data", "model", "evaluate", "report")


def progress(step: str, text: str, *args: Any) -> None:
    """One progress line, ``[i/4] <step>: <text>``, at the start of each step of a run."""
    log.info("[%d/%d] %s: " + text, STEPS.index(step) + 1, len(STEPS), step, *args)


#: the leading columns of results.csv, in order
FRONT_COLUMNS = [
    "sample_id",
    "episode",
    "index",
    "label",
    "method",
    "experiment",
    "dataset",
    "model",
    "task",
    "settings_id",
    "seed",
    "model_id",
    "table_id",
    "method_options",
]


def check_metrics(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise FamBenchError(f"Unknown metric(s) {unknown}. Valid metrics: {list(METRICS)}.")
    if not any(METRICS[n].per_sample for n in names):
        per_sample = [n for n, spec in METRICS.items() if spec.per_sample]
        raise FamBenchError(
            f"metrics={names} has no per-sample metric: {', '.join(names)} is a run-level "
            "check beside the metrics, and a run without one has no results table (nor a "
            f"leaderboard row). Add one, e.g. metrics=[deletion_auc,{','.join(names)}] "
            f"(valid: {', '.join(per_sample)})."
        )
    return names


def applicable_metrics(
    metrics: list[str],
    eval_set: Any,
    evaluation: Any,
    data_name: str,
    notes: list[str],
    skipped: list[dict[str, str]],
) -> list[str]:
    """Drop metrics the data or the task's score cannot support, each with a note and a
    ``metric_skipped`` entry in ``skipped`` (the run's ``warnings.json``: the leaderboard
    shows it beside the table that lacks the column)."""
    keep = []
    for name in metrics:
        spec = METRICS[name]
        reason = None
        if spec.needs_masks and not getattr(eval_set, "has_masks", False):
            reason = f"dataset {data_name!r} has no ground-truth masks or boxes"
        elif spec.needs_confidence and not evaluation.confidence_available:
            reason = (
                f"it needs a non-negative score; the raw {evaluation.similarity} similarity "
                "is not (use metric.score=probability)"
            )
        if reason is None:
            keep.append(name)
            continue
        note = f"{name} skipped: {reason}."
        notes.append(note)
        skipped.append({"code": "metric_skipped", "metric": name, "message": note})
    for note in notes:
        log.warning(note)
    return keep


def _check_annotation_sizes(run_cfg: config.RunConfig, metrics: list[str], eval_set) -> None:
    """``tolerance_at=annotation`` needs each mask's resolution: refuse before training."""
    uses_tolerance = any(METRICS[m].uses_tolerance for m in metrics)
    if not uses_tolerance or run_cfg.metric.tolerance_at != "annotation":
        return
    if not getattr(eval_set, "has_masks", False) or not len(eval_set):
        return
    if annotation_sizes(eval_set, [eval_set[0]]) is None:
        raise FamBenchError(
            f"metric.tolerance_at=annotation needs the resolution each mask was drawn at, "
            f"which dataset {run_cfg.data.name!r} does not give; use "
            "metric.tolerance_at=input (metric.tolerance at metric.tolerance_image_size, "
            "scaled to the input)."
        )


def run(
    cfg: DictConfig | dict,
    output_dir: str | os.PathLike,
    *,
    after_unit: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run one experiment into ``output_dir`` (module docstring); resumes what is there.

    ``after_unit(u)`` is called after unit ``u`` was written (single-process runs only;
    tests use it to interrupt a run). Returns the merged frames and the output paths.
    """
    run_cfg = config.load(cfg)
    family = family_for(run_cfg.task)
    run_cfg.task = plain(family.config)  # with the family's defaults filled in
    # the run's device and autocast, decided once: every later step receives them
    device = builders.device_for(run_cfg.trainer.accelerator)
    autocast = identity.resolve_amp(run_cfg.metric.amp, device)
    methods = builders.build_methods(run_cfg.methods, run_cfg.method, autocast)
    metrics = check_metrics(list(run_cfg.metrics))
    # the seed before the datasets: their building draws from the global stream that the
    # model's initialisation then continues (the published numbers depend on this order)
    torch.manual_seed(run_cfg.seed)
    progress("data", "building the %s datasets", run_cfg.data.name)
    train_set, eval_set = builders.build_datasets(run_cfg.data, run_cfg.name)
    family.check_data(run_cfg, train_set, eval_set)
    content = builders.data_content(run_cfg.data.root, run_cfg.cache_dir, train_set, eval_set)
    fingerprint, fingerprinted = identity.fingerprint_of(
        run_cfg, family, {name: m.options for name, m in methods.items()}, autocast, content
    )
    out = Path(output_dir)
    with OutputStore(out) as store:
        store.claim(fingerprint, fingerprinted)
        logger = build_logger(run_cfg.logger, out, run_cfg.name)
        _check_annotation_sizes(run_cfg, metrics, eval_set)
        notes: list[str] = []
        if run_cfg.model.checkpoint is not None:
            progress("model", "loading model.checkpoint=%s", run_cfg.model.checkpoint)
        else:
            label = builders.model_label(run_cfg.model)
            progress("model", "training %s, or loading it from the cache", label)
        model = build_run_model(
            run_cfg, family, train_set, device, out, logger.logger, notes, content
        )
        evaluation = family.evaluation(run_cfg, train_set, eval_set, model, device)
        skipped: list[dict[str, str]] = []
        metrics = applicable_metrics(
            metrics, eval_set, evaluation, run_cfg.data.name, notes, skipped
        )
        settings = identity.metric_settings(run_cfg, family, evaluation, autocast)
        job = _job(
            run_cfg,
            family,
            evaluation,
            model,
            methods,
            metrics,
            settings,
            autocast,
            fingerprint,
            out,
            eval_set,
            content,
        )
        job.notes = notes
        job.skipped_metrics = skipped
        job.setting_warnings = settings_warnings(settings, metrics)

        task_path = out / "task_metrics.csv"
        if not task_path.is_file():
            values = evaluation.task_metrics(model)
            frame = pd.DataFrame([{"metric": k, "value": v} for k, v in values.items()])
            if run_cfg.eval.untrained_baseline and evaluation.untrained_baseline:
                baseline = untrained_task_metrics(evaluation, model, run_cfg.seed, notes)
                frame["untrained"] = [baseline.get(k, float("nan")) for k in values]
            for col, value in job.constants.items():
                frame[col] = value
            store.write_frame("task_metrics.csv", frame)

        done = store.done_units() & set(range(evaluation.num_units))
        todo = [u for u in range(evaluation.num_units) if u not in done]
        progress(
            "evaluate",
            "%d methods x %d metrics on %d units (%d already done)",
            len(methods),
            len(metrics),
            evaluation.num_units,
            len(done),
        )
        if todo:
            t = run_cfg.trainer
            launch(job, todo, t.devices, t.num_nodes, t.strategy, after_unit)
        return _finish(run_cfg, job, store, evaluation, eval_set, device, logger, task_path)


def build_run_model(
    run: config.RunConfig,
    family: TaskFamily,
    train_set: Any,
    device: torch.device,
    out: Path,
    logger: Any,
    notes: list[str],
    content: dict[str, str] | None = None,
) -> torch.nn.Module:
    """The run's model (:func:`builders.build_model`): ``run.model`` loaded, reused from
    the cache under :func:`identity.training_key` (``content``: the data's content ids),
    or trained with ``run.trainer``; ``out``: the run folder, where a model the cache
    cannot take is kept."""
    return builders.build_model(
        run.model,
        run.data.image_size,
        family,
        train_set,
        device,
        trainer=run.trainer,
        cache_dir=run.cache_dir,
        key=identity.training_key(run, family, content),
        seed=run.seed,
        out=out,
        logger=logger,
        notes=notes,
        progress=run.eval.progress,
    )


def untrained_task_metrics(
    evaluation: Any, model: torch.nn.Module, seed: int, notes: list[str]
) -> dict[str, float]:
    """The task metrics of the same network re-initialised (``reset_parameters`` of every
    module, under ``seed``; the trained model is left as it was): the floor a trained
    encoder must clear. On the embedded contrastive data colour alone separates much of
    the classes, so chance (0.1) is no floor there; a random Conv-4 reaches kNN 0.62.
    ``{}`` (and a note) when a module cannot be re-initialised."""
    try:
        untrained = reinitialised(model, seed)
    except FamBenchError as err:
        note = f"no untrained baseline in task_metrics.csv: {err}"
        log.warning(note)
        notes.append(note)
        return {}
    return evaluation.task_metrics(untrained)


def _job(
    run_cfg: config.RunConfig,
    family: TaskFamily,
    evaluation: Any,
    model: torch.nn.Module,
    methods: dict[str, builders.Method],
    metrics: list[str],
    settings: dict[str, Any],
    autocast: bool,
    fingerprint: str,
    out: Path,
    eval_set: Any,
    content: dict[str, str] | None = None,
) -> Job:
    model_id = identity.model_id(run_cfg, family, content, getattr(model, "weights_id", None))
    data_stats = (getattr(eval_set, "mean", None), getattr(eval_set, "std", None))
    table_id = identity.table_id(
        run_cfg.data, content and content["eval"], model_id, run_cfg.task, settings
    )
    constants = {
        "experiment": run_cfg.name,
        "dataset": run_cfg.data.name,
        "model": builders.model_label(run_cfg.model),
        "task": family.name,
        "seed": run_cfg.seed,
        "model_id": model_id,
        "table_id": table_id,
    }
    method_columns = {
        name: {
            "settings_id": identity.settings_id(settings, m.options),
            "method_options": json.dumps(m.options, sort_keys=True, default=str),
        }
        for name, m in methods.items()
    }
    return Job(
        evaluation=evaluation,
        model=model,
        methods=methods,
        metrics=metrics,
        settings=settings,
        autocast=autocast,
        fingerprint=fingerprint,
        out=out,
        seed=run_cfg.seed,
        target_layer=run_cfg.model.target_layer,
        constants=constants,
        method_columns=method_columns,
        explain_batch=run_cfg.eval.batch_size,
        metric_batch=run_cfg.metric.batch_size,
        figure_samples=run_cfg.eval.figure_samples,
        progress=run_cfg.eval.progress,
        accelerator=run_cfg.trainer.accelerator,
        data_stats=data_stats,
        annotation_size=getattr(eval_set, "annotation_size", None),
    )


def _finish(run_cfg, job, store, evaluation, eval_set, device, logger, task_path) -> dict:
    progress("report", "merging results; writing the summary, figures and report")
    columns = metric_columns(job.metrics, other=True)
    merged = store.merge(
        job.fingerprint, evaluation.num_units, list(job.methods), FRONT_COLUMNS, columns
    )
    summary = summarise(merged["results"], merged["sanity"])
    store.write_frame("summary.csv", summary)
    if "correct" in merged["results"].columns:
        # the same summary over correctly and wrongly decided samples (issue 25)
        store.write_frame("summary_by_correct.csv", summarise(merged["results"], split="correct"))
    warnings = run_warnings(
        merged["results"],
        pd.read_csv(task_path),
        evaluation.chance(),
        getattr(job.model, "target_shape", None),
    )
    # the heads replaced by identity (model.strip_head) change what is explained
    strips = [strip.warning for strip in getattr(job.model, "head_strips", [])]
    warnings = [
        *job.skipped_metrics,
        *job.setting_warnings,
        *strips,
        *conservation_warnings(merged["not_conserved"]),
        *warnings,
    ]
    store.write_json("warnings.json", warnings)
    figures = write_figures(job, merged, summary, eval_set, evaluation)
    settings_ids = {name: cols["settings_id"] for name, cols in job.method_columns.items()}
    store.write_json(
        "settings.json",
        {
            "settings": job.settings,
            "methods": {name: m.options for name, m in job.methods.items()},
            "settings_ids": settings_ids,
            "table_id": job.constants["table_id"],
            "model_id": job.constants["model_id"],
            "notes": job.notes,
        },
    )
    write_environment(
        store.out / "environment.json",
        cfg_dict={
            "config": plain(run_cfg),
            "model": job.constants["model"],
            "model_id": job.constants["model_id"],
            "checkpoint_load": getattr(job.model, "load_report", None),
            "metric_settings": job.settings,
            "settings_ids": settings_ids,
            "notes": job.notes,
        },
        device=device,
        seed=run_cfg.seed,
    )
    logger.log_run(plain(run_cfg), summary, pd.read_csv(task_path), figures)
    report = write_run_report(store.out)
    table = summary.pivot(index="method", columns="metric", values="mean")
    log.info("mean per method and metric:\n%s", table.round(3).to_string())
    log.info("results in %s (report: %s)", store.out.resolve(), report.name)
    return {
        **merged,
        "summary": summary,
        "out": store.out,
        "figures": figures,
        "notes": job.notes,
        "settings_ids": settings_ids,
        "warnings": warnings,
    }


def write_figures(
    job: Job, merged: dict[str, Any], summary: pd.DataFrame, eval_set: Any, evaluation: Any
) -> list[Path]:
    """``maps.png`` (images x methods, ground truth outlined, the reference image beside
    retrieval and contrastive queries), ``curves.png``, ``summary.png``, ``sanity.png``."""
    paths = []
    figure = merged["figure"]
    out = job.out
    if figure is not None:
        classes = list(getattr(eval_set, "classes", []) or [])
        labels = [classes[int(c)] if int(c) < len(classes) else str(c) for c in figure["labels"]]
        maps = {name: figure["maps"][k] for k, name in enumerate(job.methods)}
        paths.append(
            plot_map_grid(
                figure["images"],
                maps,
                figure["masks"],
                out / "maps.png",
                eval_set.mean,
                eval_set.std,
                labels=labels,
                references=figure.get("references"),
            )
        )
    paths += plot_run_figures(
        out,
        merged["results"],
        summary,
        merged["sanity"],
        merged["curves"],
        score_label=evaluation.score_label,
        reference="fam" if "fam" in job.methods else None,
    )
    return [Path(p) for p in paths]
