"""The worker: evaluate units (every method, every metric) and write their shards.

A unit is evaluated the same way in any process: torch's RNG and the methods' own
generators are seeded from ``(seed, stream, unit)``, so a run sharded over processes
(Lightning Fabric, ``trainer.devices * trainer.num_nodes > 1``, units round-robin)
equals a one-process run. All methods explain the same samples; their maps go through
each metric together (one deletion/insertion pass packs every method's perturbed images
into full batches).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn
from tqdm.auto import tqdm

from baselines.random_map import smooth_tie_field
from evaluation.registry import METRICS, MetricInputs, compute_all
from evaluation.sanity import randomisation_sanity
from experiments.data.seeding import Stream, derive_seed
from experiments.store import OutputStore
from experiments.tasks.base import TaskEvaluation, Unit
from fam.errors import FamBenchError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a (possibly spawned) worker needs to evaluate units; picklable."""

    evaluation: TaskEvaluation
    model: nn.Module
    methods: dict[str, Any]  # name -> builders.Method
    metrics: list[str]
    settings: dict[str, Any]
    #: the run's resolved ``metric.amp`` (decided once, by the pipeline): bf16 autocast for
    #: every explainer that offers it; the metrics read the same value from ``settings``
    autocast: bool
    fingerprint: str
    out: Any  # the run folder (a Path)
    seed: int
    target_layer: str | None
    constants: dict[str, Any]
    method_columns: dict[str, dict[str, Any]]
    explain_batch: int
    metric_batch: int
    figure_samples: int
    progress: bool
    accelerator: str
    data_stats: tuple[Any, Any] = (None, None)
    annotation_size: tuple[int, int] | None = None  # the dataset's, for units without one
    notes: list[str] = field(default_factory=list)
    #: ``metric_skipped`` warnings (metrics the data or the score cannot support)
    skipped_metrics: list[dict[str, str]] = field(default_factory=list)
    setting_warnings: list[dict[str, str]] = field(default_factory=list)


_FALLBACK_NOTED: set[str] = set()


def _note_fallback(name: str, explainer: Any) -> None:
    """One line when FAM takes the forward-ablation path (K passes per image)."""
    if getattr(explainer, "last_path", None) == "forward_ablation" and name not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(name)
        log.info(
            "%s: the embedding is not a plain pooling of the target layer, so FAM uses exact "
            "forward ablation (one forward pass per channel and image)",
            name,
        )


def takes_amp(explainer: Any) -> bool:
    """Whether an explainer offers bf16 autocast (its constructor takes ``amp``); the
    others (LRP rules, the map floors) always run in fp32."""
    try:
        return "amp" in inspect.signature(type(explainer).__init__).parameters
    except (TypeError, ValueError):
        return False


def make_explainer(job: Job, method: Any, model: nn.Module, seed: int) -> Any:
    """The method's explainer, under the run's autocast when it offers it."""
    explainer = method.make(model, job.target_layer, seed)
    if job.autocast and takes_amp(explainer):
        explainer.amp = True
    return explainer


def unit_inputs(
    explainer: Any, unit: Unit, start: int, size: int, sample_seeds: torch.Tensor | None = None
) -> dict[str, Any]:
    """Keyword inputs an explainer declares it needs, for unit samples ``start:start+size``:
    ``masks`` (``needs_masks``; ``None`` without ground truth), ``task_score``
    (``needs_task_score``: the unit's ``embedding_score`` with indices of the call) and
    ``sample_seeds`` (``needs_sample_seeds``: the samples' tie seeds, so the ``random``
    floor draws the field that orders tied pixels under ``metric.ties=smooth``)."""
    extra: dict[str, Any] = {}
    if getattr(explainer, "needs_sample_seeds", False) and sample_seeds is not None:
        extra["sample_seeds"] = sample_seeds[start : start + size]
    if getattr(explainer, "needs_masks", False):
        extra["masks"] = None if unit.masks is None else unit.masks[start : start + size]
    if getattr(explainer, "needs_task_score", False):
        if unit.embedding_score is None:
            raise FamBenchError(
                f"{type(explainer).__name__} explains the task's probability, which this task "
                "does not provide (Unit.embedding_score); choose its similarity option."
            )
        score = unit.embedding_score
        extra["task_score"] = lambda emb, index: score(emb, index + start)
    return extra


def explain(
    job: Job,
    unit: Unit,
    u: int,
    sample_seeds: torch.Tensor | None = None,
    conservation: list[dict[str, Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Maps ``(M*N, H, W)``, degenerate flags ``(M*N,)`` and reasons of every method
    (``sample_seeds (N,)``: each sample's tie seed, for methods that draw from it).

    Nothing in the batch loop reads a value back to the host; the flags become reason
    strings once, after every method ran. ``conservation`` (when given) receives one entry
    per method whose explainer checks relevance conservation (Relevance-CAM under a
    conserving composite): ``{"method", "layer", "ratio" (N,), "flagged" (N,)}``."""
    n = len(unit.images)
    maps, flags, given = [], [], []
    for name, method in job.methods.items():
        explainer = make_explainer(
            job, method, job.model, derive_seed(job.seed, Stream.EXPLAINER, u)
        )
        ratios, flagged = [], []
        for i in range(0, n, job.explain_batch):
            batch = explainer(
                unit.images[i : i + job.explain_batch],
                unit.reference[i : i + job.explain_batch],
                unit.similarity,
                **unit_inputs(explainer, unit, i, job.explain_batch, sample_seeds),
            ).detach()
            maps.append(batch)
            flag = getattr(explainer, "degenerate", None)
            flag = (
                flag.bool().to(batch.device)
                if flag is not None
                else torch.zeros(len(batch), dtype=torch.bool, device=batch.device)
            )
            flags.append(flag)
            given.append(getattr(explainer, "degenerate_reason", None))
            if getattr(explainer, "not_conserved", None) is not None:
                ratios.append(explainer.conservation)
                flagged.append(explainer.not_conserved)
        _note_fallback(name, explainer)
        if conservation is not None and flagged:
            conservation.append(
                {
                    "method": name,
                    "layer": explainer.layer_name,
                    "ratio": torch.cat(ratios),
                    "flagged": torch.cat(flagged),
                }
            )
    all_flags = torch.cat(flags)
    host_flags = iter(all_flags.tolist())
    reasons: list[str] = []
    for flag, reason in zip(flags, given, strict=True):
        batch_flags = [next(host_flags) for _ in range(len(flag))]
        reasons.extend(
            reason if reason is not None else ["constant" if f else "" for f in batch_flags]
        )
    return torch.cat(maps).float(), all_flags, reasons


def evaluate_unit(job: Job, u: int, device: torch.device) -> dict:
    """All methods and metrics on unit ``u``: the shard's content (CPU tensors)."""
    torch.manual_seed(derive_seed(job.seed, Stream.UNIT, u))
    unit = job.evaluation.unit(u, job.model, device)
    if not bool(torch.isfinite(unit.reference).all()):
        raise FamBenchError(
            f"The model outputs non-finite embeddings (nan or inf) on the clean images of "
            f"unit {u}, so nothing can be explained; check its weights (model.checkpoint), "
            "its training (trainer.lr, trainer.precision) and its forward pass."
        )
    n = len(unit.images)
    if unit.annotation_sizes is None and job.annotation_size is not None:
        unit.annotation_sizes = torch.tensor([list(job.annotation_size)] * n, dtype=torch.float64)
    names = list(job.methods)
    conservation: list[dict[str, Any]] = []
    sample_seeds = torch.tensor(
        [derive_seed(job.seed, Stream.TIES, int(i)) for i in unit.columns["sample_id"]],
        dtype=torch.int64,
        device=device,
    )
    all_maps, degenerate, reasons = explain(job, unit, u, sample_seeds, conservation)
    tie_field = None
    if job.settings.get("ties") == "smooth" and any(
        METRICS[name].ranks_pixels for name in job.metrics
    ):
        tie_field = smooth_tie_field(job.model, job.target_layer, unit.images, sample_seeds)
    kinds = {m: job.settings.get("explain_class", {}).get(m, unit.explains) for m in job.metrics}
    other = [m for m in job.metrics if kinds[m] != unit.explains]
    own = [m for m in job.metrics if kinds[m] == unit.explains]
    m_count = len(names)
    values, curves = score_samples(job, unit, all_maps, own, None, sample_seeds, tie_field)
    if other:
        if unit.predicted_unit is None or unit.explains != "true":
            raise FamBenchError(
                f"metrics {other} explain the {kinds[other[0]]} class, which this task's "
                "units do not provide; set metric.explain_class to the class it explains."
            )
        # The model's prediction differs from the label only on misclassified samples:
        # only they need a second map (of the predicted class) and its scores.
        correct = torch.tensor([bool(c) for c in unit.columns["correct"]], device=device)
        same = torch.nonzero(correct)[:, 0]
        differ = torch.nonzero(~correct)[:, 0]
        predicted = unit.predicted_unit
        alt_maps = all_maps.view(m_count, n, *all_maps.shape[1:])
        parts = [(same, alt_maps[:, same].reshape(-1, *all_maps.shape[1:]), unit)]
        if len(differ):
            sub = subset_unit(predicted, differ)
            maps_of_prediction, _, _ = explain(job, sub, u, sample_seeds[differ])
            parts.append((differ, maps_of_prediction, predicted))
        for idx, maps, source in parts:
            if not len(idx):
                continue
            got, got_curves = score_samples(job, source, maps, other, idx, sample_seeds, tie_field)
            for target, found in ((values, got), (curves, got_curves)):
                for key, value in found.items():
                    full = target.get(key)
                    if full is None:
                        shape = (m_count * n, *value.shape[1:])
                        full = target[key] = value.new_full(shape, float("nan"))
                    view = full.view(m_count, n, *value.shape[1:])
                    view[:, idx] = value.view(m_count, len(idx), *value.shape[1:])
    values = {k: v.double().cpu().view(len(names), n) for k, v in values.items()}
    degenerate_flags = degenerate.cpu().view(len(names), n)
    explained = json.dumps(kinds, sort_keys=True)

    rows = []
    for k, name in enumerate(names):
        for j in range(n):
            row = {col: unit.columns[col][j] for col in ("sample_id", "episode", "index", "label")}
            row["method"] = name
            row.update(job.constants)
            row.update(job.method_columns[name])
            row.update({metric: float(v[k, j]) for metric, v in values.items()})
            row["degenerate"] = bool(degenerate_flags[k, j])
            row["degenerate_reason"] = reasons[k * n + j]
            row["explained_class"] = explained
            row.update({col: vals[j] for col, vals in unit.columns.items() if col not in row})
            rows.append(row)
    shard: dict[str, Any] = {
        "fingerprint": job.fingerprint,
        "unit": u,
        "rows": rows,
        "curves": {kind: c.float().cpu().view(len(names), n, -1) for kind, c in curves.items()},
        "sample_ids": list(unit.columns["sample_id"]),
    }
    shard["not_conserved"] = not_conserved(job, unit, conservation)
    if u == 0 and job.figure_samples > 0:
        k = min(job.figure_samples, n)
        shard["figure"] = {
            "images": unit.images[:k].cpu(),
            "masks": unit.masks[:k].cpu() if unit.masks is not None else None,
            "maps": all_maps.view(len(names), n, *all_maps.shape[1:])[:, :k].cpu(),
            "labels": list(unit.columns["label"][:k]),
            "references": (
                unit.reference_images[:k].cpu() if unit.reference_images is not None else None
            ),
        }
    if u == 0 and "sanity" in job.metrics:
        as_asked = unit.predicted_unit if "sanity" in other else unit
        shard["sanity"] = sanity_rows(job, as_asked)
    return shard


def not_conserved(job: Job, unit: Unit, conservation: list[dict[str, Any]]) -> list[dict]:
    """The samples whose Relevance-CAM relevance is off the seed by more than 5% under a
    conserving composite: ``{"method", "model", "layer", "sample_id", "ratio"}`` each."""
    out = []
    for entry in conservation:
        flags = entry["flagged"].tolist()
        ratios = entry["ratio"].tolist()
        out.extend(
            {
                "method": entry["method"],
                "model": job.constants["model"],
                "layer": entry["layer"],
                "sample_id": unit.columns["sample_id"][j],
                "ratio": ratios[j],
            }
            for j, flag in enumerate(flags)
            if flag
        )
    return out


def score_samples(
    job: Job,
    unit: Unit,
    maps: torch.Tensor,
    metrics: list[str],
    idx: torch.Tensor | None,
    sample_seeds: torch.Tensor,
    tie_field: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``metrics`` of ``maps`` ``(M*K, H, W)`` on the unit's samples ``idx (K,)`` (all
    when ``None``), scored as ``unit`` explains them: values ``{column: (M*K,)}`` and
    curves ``{kind: (M*K, T)}``."""
    if not metrics:
        return {}, {}
    if idx is not None:
        unit = subset_unit(unit, idx)
        sample_seeds = sample_seeds[idx]
        tie_field = None if tie_field is None else tie_field[idx]
    mean, std = job.data_stats
    inputs = MetricInputs(
        images=unit.images,
        maps=maps,
        score_fn=unit.score_fn,
        confidence_fn=unit.confidence_fn,
        masks=unit.masks,
        other_masks=unit.other_masks,
        boxes=unit.boxes,
        annotation_sizes=unit.annotation_sizes,
        sample_seeds=sample_seeds,
        tie_field=tie_field,
        settings=job.settings,
        model=job.model,
        batch_size=job.metric_batch,
        mean=mean,
        std=std,
    )
    return compute_all(metrics, inputs)


def subset_unit(unit: Unit, idx: torch.Tensor) -> Unit:
    """The unit's samples ``idx (K,)`` as a unit of their own (scores re-indexed)."""
    host = idx.tolist()

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[idx.to(t.device)]

    def reindexed(fn):
        return None if fn is None else (lambda x, index: fn(x, idx[index.to(idx.device)]))

    return Unit(
        unit=unit.unit,
        images=unit.images[idx],
        reference=unit.reference[idx],
        score_fn=reindexed(unit.score_fn),
        confidence_fn=reindexed(unit.confidence_fn),
        reference_fn=lambda net: unit.reference_fn(net)[idx],
        similarity=unit.similarity,
        masks=take(unit.masks),
        other_masks=take(unit.other_masks),
        boxes=take(unit.boxes),
        annotation_sizes=take(unit.annotation_sizes),
        reference_images=take(unit.reference_images),
        embedding_score=reindexed(unit.embedding_score),
        columns={key: [values[j] for j in host] for key, values in unit.columns.items()},
        explains=unit.explains,
    )


def sanity_rows(job: Job, unit: Unit) -> list[dict]:
    """Model-randomisation cascade on the first samples of unit 0, per method."""
    k = min(job.settings["sanity_samples"], len(unit.images))
    rows = []
    for name, method in job.methods.items():

        def make(net: nn.Module, method=method):
            explainer = make_explainer(job, method, net, derive_seed(job.seed, Stream.EXPLAINER, 0))
            # the first k samples of the unit, with the inputs the explainer declares
            return functools.partial(explainer, **unit_inputs(explainer, unit, 0, k))

        result = randomisation_sanity(
            job.model,
            make,
            unit.images[:k],
            lambda net: unit.reference_fn(net)[:k],
            unit.similarity,
            seed=job.seed,
        )
        frame = result.to_frame()
        frame.insert(0, "method", name)
        frame["sample_id"] = [unit.columns["sample_id"][i] for i in frame["sample"]]
        rows.extend(frame.to_dict("records"))
    return rows


def _worker(fabric, job: Job, todo: list[int], after_unit: Callable[[int], None] | None) -> None:
    """Evaluate this rank's share of ``todo`` (round-robin) and write each shard."""
    world, rank = fabric.world_size, fabric.global_rank
    device = fabric.device
    if device.type == "cpu" and world > 1:
        # Processes share the CPU cores instead of each spawning a full thread pool.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    job.model.to(device).eval()
    if device.type == "cpu" or job.autocast:
        # NHWC weights: bf16 convolutions on CUDA are fastest so (explainers and metrics feed
        # NHWC inputs there), and on CPU oneDNN runs fp32 convolutions in NHWC about twice as
        # fast (Conv-4 at 32 and 84 px; BENCHMARKS.md) with contiguous inputs: a layout,
        # not a precision, so the numbers move by float rounding only (~1e-7).
        job.model.to(memory_format=torch.channels_last)
    store = OutputStore(job.out)  # the parent process holds the folder's lock
    mine = todo[rank::world]
    bar = tqdm(mine, desc="explain+score", unit="unit", disable=not job.progress or rank != 0)
    for u in bar:
        shard = evaluate_unit(job, u, device)
        store.write_shard(u, shard)
        if after_unit is not None:
            after_unit(u)


def launch(
    job: Job,
    todo: list[int],
    devices: int,
    num_nodes: int,
    strategy: str,
    after_unit: Callable[[int], None] | None = None,
) -> None:
    """Run :func:`_worker` in this process, or on ``devices x num_nodes`` processes."""
    world = devices * num_nodes
    if world > 1:
        if after_unit is not None:
            raise FamBenchError("after_unit hooks run only in single-process evaluation.")
        job.model.cpu()  # workers receive a pickled copy and move it to their own device
        fabric = Fabric(
            accelerator=job.accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy
        )
        fabric.launch(_worker, job, todo, None)
    else:
        fabric = Fabric(accelerator=job.accelerator, devices=1, strategy="auto")
        fabric.launch(_worker, job, todo, after_unit)
