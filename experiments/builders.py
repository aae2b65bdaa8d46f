"""Builders: the run's datasets, model (trained or loaded), task family and methods.

Each builder takes the typed :class:`~experiments.config.RunConfig` and either returns
exactly what was asked for or raises :class:`~fam.errors.FamBenchError` naming the key to
change; nothing falls back to something else.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.registry import explained_classes
from experiments.config import (
    CONF_DIR,
    RunConfig,
    check_keys,
    plain,
    short_hash,
    signature_options,
)
from fam.errors import FamBenchError, out_of_memory_message

log = logging.getLogger(__name__)

#: method options that change how fast a method runs, never its maps
METHOD_EXECUTION_OPTIONS = frozenset({"batch_size", "ablation_batch"})
#: trainer keys that change where and how fast training runs, never the weights (training
#: runs in one process whatever ``devices``; see :func:`run_identity_trainer_keys` for
#: ``num_workers``)
TRAINER_EXECUTION_KEYS = frozenset(
    {"accelerator", "devices", "num_nodes", "strategy", "num_workers", "log_every_n_steps"}
)


def run_identity_trainer_keys(run: RunConfig) -> dict[str, Any]:
    """Execution keys that do change this run's weights: the contrastive views are drawn
    in the data-loader workers, one random stream per worker, so ``num_workers > 0``
    trains other weights than ``0`` (and than another worker count). They join the model
    cache key and the run fingerprint."""
    if run.task.get("name") == "contrastive" and int(run.trainer.num_workers) > 0:
        return {"num_workers": int(run.trainer.num_workers)}
    return {}


def to_absolute_path(path: str) -> str:
    from hydra.utils import to_absolute_path as absolute

    return absolute(path)


def device_for(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise FamBenchError(
            "trainer.accelerator asks for a GPU but CUDA is not available; use "
            "trainer.accelerator=cpu (or auto)."
        )
    return torch.device("cpu")


# -- data ---------------------------------------------------------------------------------
def build_datasets(run: RunConfig) -> tuple[Any, Any]:
    """``(train_set, eval_set)`` of ``run.data`` (FamBenchError when missing/malformed)."""
    from experiments.data import build_dataset

    d = run.data
    if d.root == "???":
        raise FamBenchError(
            f"Dataset {d.name!r} is read from disk: set data.root=<folder> on the command line "
            f"(conf/data/ describes each layout; `{run.name}` cannot run without it)."
        )
    root = to_absolute_path(d.root) if d.root is not None else None
    try:
        train = build_dataset(d.name, root, d.train_split, d.image_size, **d.options)
        test = build_dataset(d.name, root, d.eval_split, d.image_size, **d.options)
    except TypeError as err:
        raise FamBenchError(
            f"data.options do not fit dataset {d.name!r} ({err}); see conf/data/{d.name}.yaml."
        ) from None
    return train, test


def data_content(run: RunConfig, train_set: Any, eval_set: Any) -> dict[str, str]:
    """``{"train": id, "eval": id}`` of a dataset read from ``data.root``, ``{}`` for the
    generated ones (their options fix their content).

    ``data.root`` itself is an execution key (the same copy of a dataset may sit at another
    path on another machine), so what identifies the data in the model cache, the run
    fingerprint and ``table_id`` is this content id instead: the class names, labels,
    boxes, and each file's path below the root and the sha256 of its bytes (an array
    dataset: its shape and every pixel; :mod:`experiments.data.content`, cached in
    ``cache_dir``). Pointing ``data.root`` at another folder is another dataset:
    another model, another table, and a refused resume."""
    from experiments.data.content import DIGEST_CACHE, DigestCache

    if run.data.root is None:
        return {}
    root = Path(to_absolute_path(run.data.root))
    cache = DigestCache(Path(to_absolute_path(run.cache_dir)) / DIGEST_CACHE)
    try:
        return {
            "train": dataset_content_id(train_set, root, cache),
            "eval": dataset_content_id(eval_set, root, cache),
        }
    finally:
        cache.close()


def located_data(run: RunConfig, content_id: str | None) -> dict[str, Any]:
    """``run.data`` as an identity: ``data.root`` (where the files lie) replaced by the
    split's :func:`data_content` id (which files they are), for on-disk datasets."""
    data = plain(run.data)
    data.pop("root", None)
    if content_id:
        data["content"] = content_id
    return data


def dataset_content_id(dataset: Any, root: Path, cache: Any = None) -> str:
    """The content id of one split (:func:`data_content`); ``cache``: a
    :class:`~experiments.data.content.DigestCache` of file digests."""
    from experiments.data.content import array_digest, file_digests

    digest = hashlib.sha256()

    def add(value: Any) -> None:
        digest.update(repr(value).encode())
        digest.update(b"\0")

    add(type(dataset).__name__)
    add(len(dataset))
    add(list(getattr(dataset, "classes", [])))
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        digest.update(labels.cpu().numpy().tobytes())
    elif labels is not None:
        add(list(labels))
    root = root.resolve()
    for name in ("paths", "mask_paths"):
        paths = [
            None if p is None else Path(p).resolve() for p in getattr(dataset, name, None) or []
        ]
        hashes = file_digests([p for p in paths if p is not None], cache)
        found = iter(hashes)
        for path in paths:
            if path is None:
                add(None)
                continue
            where = path.relative_to(root) if path.is_relative_to(root) else path
            add((str(where), next(found)))
    boxes = getattr(dataset, "boxes", None)
    if isinstance(boxes, torch.Tensor):
        digest.update(boxes.cpu().numpy().tobytes())
    images = getattr(dataset, "images", None)
    if images is not None and hasattr(images, "shape") and len(images):
        add(array_digest(images))
    return digest.hexdigest()[:16]


# -- model --------------------------------------------------------------------------------
def model_label(run: RunConfig) -> str:
    """The model's name in results: its config name, or a custom target's dotted path."""
    m = run.model
    return m.target or m.label or m.name


#: the keys of a model config that reach the model builder, per kind
_BUILTIN_KEYS = (
    "name",
    "checkpoint",
    "checkpoint_key",
    "checkpoint_prefix",
    "target_layer",
    "options",
    "input_size",
)
_CUSTOM_KEYS = (
    "name",
    "checkpoint",
    "checkpoint_key",
    "checkpoint_prefix",
    "target_layer",
    "target",
    "kwargs",
    "strip_head",
    "input_size",
    "reshape",
)


def build_network(run: RunConfig, checkpoint: Any = None) -> nn.Module:
    """The untrained embedding network ``run.model`` describes: a built-in model, or with
    ``model=custom`` exactly ``model.target`` (never another model). ``checkpoint``: the
    content of ``model.checkpoint`` (:func:`read_checkpoint`), whose head shapes and named
    class counts decide ``model.strip_head=auto``."""
    from experiments.models import build_model_from_config
    from experiments.models.custom import named_class_counts

    model = plain(run.model)
    custom = bool(model.get("target"))
    # a key of the other kind would be dropped below while it still names the cache entry
    # and the leaderboard table: refuse it instead of building another model than asked
    if custom and model.get("options"):
        raise FamBenchError(
            f"model.options {sorted(model['options'])} are options of a built-in model; "
            f"model=custom builds {model['target']} with model.kwargs: pass them as "
            "+model.kwargs.<name>=<value>."
        )
    if not custom and model.get("kwargs"):
        raise FamBenchError(
            f"model.kwargs {sorted(model['kwargs'])} are keyword arguments of model=custom's "
            f"target; the built-in model {model.get('name')!r} takes model.options.<name>=... "
            f"(see conf/model/ for its options)."
        )
    if not custom and model.get("strip_head", "auto") != "auto":
        raise FamBenchError(
            f"model.strip_head applies to model=custom only; the built-in model "
            f"{model.get('name')!r} has no classifier head (drop model.strip_head)."
        )
    if not custom and model.get("reshape"):
        raise FamBenchError(
            f"model.reshape applies to model=custom only; the built-in model "
            f"{model.get('name')!r} returns feature maps (drop model.reshape)."
        )
    keys = _CUSTOM_KEYS if custom else _BUILTIN_KEYS
    state = None
    if custom and checkpoint is not None:
        from experiments.training.checkpoints import find_state_dict

        _, state = find_state_dict(checkpoint, model.get("checkpoint_key"), model["checkpoint"])
    network, _ = build_model_from_config(
        {k: model[k] for k in keys if k in model},
        class_counts=named_class_counts(checkpoint) if checkpoint is not None else None,
        checkpoint_state=state,
    )
    return network


def probe(model: nn.Module, run: RunConfig, device: torch.device) -> tuple[int, int] | None:
    """Check that the model maps a batch of data-size images to ``(N, D)``; returns the
    target layer's spatial shape ``(h, w)`` (``None`` if it is not a 4-D map)."""
    from fam.layers import eval_mode, resolve_target_layer
    from fam.tokens import FeatureLayout

    size = run.data.image_size
    x = torch.zeros(2, 3, size, size, device=device)
    layer = resolve_target_layer(model, run.model.target_layer)
    seen: list[tuple[int, ...]] = []
    layout = FeatureLayout(model)  # a ViT's tokens are read on its patch grid
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(layout.to_map(o).shape)))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except RuntimeError as err:
        memory = out_of_memory_message(err)
        if memory is not None:
            raise FamBenchError(memory) from None
        first = str(err).strip().splitlines()[0]
        raise FamBenchError(
            f"Model {model_label(run)!r} cannot take {size}x{size} images ({first}). The image "
            "is too small for the model's pooling: raise data.image_size, or pool less (e.g. "
            "model.options.pools=[true,true,false,false] for Conv-4)."
        ) from None
    finally:
        handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FamBenchError(
            f"Model {model_label(run)!r} returns {shape} for a batch of 2 images; the suite "
            "explains embeddings of shape (N, D). End the model with global pooling and "
            "flatten (or model.strip_head=true for a classifier), or wrap it so that forward "
            "returns the embedding."
        )
    if not bool(torch.isfinite(out).all()):
        raise FamBenchError(
            f"Model {model_label(run)!r} returns non-finite embeddings (nan or inf) for a "
            "blank batch; check its weights (model.checkpoint) and its forward pass."
        )
    return tuple(seen[0][-2:]) if seen and len(seen[0]) == 4 else None


def training_key(run: RunConfig, content: dict[str, str] | None = None) -> dict[str, Any]:
    """The plain dict the model cache is keyed on (model + data + task + training);
    ``content`` is :func:`data_content` (the training split's id replaces ``data.root``)."""
    data = located_data(run, content and content["train"])
    data.get("options", {}).pop("mode", None)  # pairs only change the evaluation queries
    data.pop("eval_split", None)
    model = plain(run.model)
    for key in ("checkpoint", "target_layer", "label"):
        model.pop(key, None)
    trainer = {k: v for k, v in plain(run.trainer).items() if k not in TRAINER_EXECUTION_KEYS}
    trainer.update(run_identity_trainer_keys(run))
    from experiments.tasks import family_class

    task = dict(run.task)
    family = family_class(str(task.get("name", "")), task.get("family"))
    for key in family.evaluation_keys:
        task.pop(key, None)
    return {"model": model, "data": data, "task": task, "trainer": trainer}


def model_id(
    run: RunConfig, content: dict[str, str] | None = None, weights: str | None = None
) -> str:
    """Identifies the weights: with ``model.checkpoint``, the content of the tensors loaded
    (``weights``: :func:`~experiments.training.checkpoints.weights_id`, whatever the file
    format, its entry or its key prefix) and the model config; otherwise the training key."""
    if run.model.checkpoint:
        if not weights:
            raise ValueError("model_id of a checkpoint run needs the loaded weights' id")
        model = plain(run.model)
        for key in ("checkpoint", "checkpoint_key", "checkpoint_prefix"):
            model.pop(key, None)
        return short_hash({"weights": weights, "model": model}, 12)
    return short_hash(training_key(run, content), 12)


def build_model(
    run: RunConfig,
    family: Any,
    train_set: Any,
    device: torch.device,
    out: Path,
    logger: Any,
    notes: list[str],
    content: dict[str, str] | None = None,
) -> nn.Module:
    """The embedding network with weights: loaded from ``model.checkpoint``, reused from
    the cache (keyed on :func:`training_key` with the data ``content`` id), or trained (and
    cached; kept in the run folder if the cache is read-only)."""
    from experiments.training import train_or_load

    if int(getattr(family.config, "monitor_every", 0) or 0) > 0:
        # the runner passes no validation split: the key would be ignored
        raise FamBenchError(
            "task.monitor_every is read only by the Python API "
            "(experiments.training.train_or_load(..., val_set=...)); the runner trains "
            "without a validation monitor. Drop the override."
        )
    payload = None
    if run.model.checkpoint is not None and run.model.target:
        from experiments.training.checkpoints import read_checkpoint

        payload = read_checkpoint(to_absolute_path(run.model.checkpoint))
    network = build_network(run, payload).to(device)
    notes.extend(getattr(network, "head_notes", []))
    network.target_shape = probe(network, run, device)
    if run.model.checkpoint is not None:
        # a given checkpoint is loaded, never trained on (any layout: see load_weights)
        from experiments.training import load_weights
        from experiments.training.train import load_checkpoint_task_state

        checkpoint = to_absolute_path(run.model.checkpoint)
        report = load_weights(
            network,
            checkpoint,
            key=run.model.checkpoint_key,
            prefix=run.model.checkpoint_prefix,
            payload=payload,
        )
        network.weights_id = report.weights_id
        load_checkpoint_task_state(family, checkpoint)  # the sidecar of learned task state
        notes.extend(f"checkpoint: {line}" for line in report.notes)
        network.load_report = report.summary()
        return network.to(device).eval()
    model = train_or_load(
        network,
        train_set,
        family,
        None,
        run.trainer,
        None,
        to_absolute_path(run.cache_dir),
        training_key(run, content),
        run.seed,
        fallback_dir=out,
        logger=logger,
        progress=run.eval.progress,
        notes=notes,
    )
    return model.to(device).eval()


# -- methods ------------------------------------------------------------------------------
@dataclass
class Method:
    """A listed method: its explainer factory ``(model, target_layer) -> explainer`` and
    the options that define its maps (written into results and ``settings_id``)."""

    name: str
    factory: Callable[..., Any]
    options: dict[str, Any]
    takes_seed: bool

    def make(self, model: nn.Module, target_layer: str | None, seed: int):
        if self.takes_seed:
            return self.factory(model, target_layer, seed=seed)
        return self.factory(model, target_layer)


def method_node(name: str, run: RunConfig, searched: list[str]) -> dict[str, Any]:
    if name in run.method:
        return dict(run.method[name])
    path = CONF_DIR / "method" / f"{name}.yaml"
    if path.is_file():  # composed without run.py's method defaults: the same file
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    raise FamBenchError(
        f"Unknown method {name!r}. Valid methods: {searched}. A method is one module in "
        "baselines/ and one conf/method/<name>.yaml (or a method/<name>.yaml in your own "
        "config directory, hydra.searchpath=[file://DIR])."
    )


def build_methods(run: RunConfig) -> dict[str, Method]:
    """``name -> Method`` for ``run.methods``; unknown methods and options are errors."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    searched = sorted(set(run.method) | {p.stem for p in (CONF_DIR / "method").glob("*.yaml")})
    run_amp = resolve_amp(run.metric.amp, device_for(run.trainer.accelerator))
    methods = {}
    for name in run.methods:
        node = method_node(name, run, searched)
        target = node.get("_target_")
        if not target:
            raise FamBenchError(
                f"method {name!r} has no `_target_` (the dotted path of its explainer class)."
            )
        try:
            cls = get_object(target)
        except Exception as err:  # noqa: BLE001 - any import failure is the user's path
            raise FamBenchError(
                f"method.{name}._target_={target!r} cannot be imported ({err})."
            ) from None
        options = {k: v for k, v in node.items() if not k.startswith("_")}
        valid = signature_options(cls, skip=("self", "model", "target_layer", "seed"))
        if valid is not None:
            check_keys(f"method.{name}", options, valid)
        try:
            factory = instantiate(node, _partial_=True)
        except InstantiationException as err:
            raise FamBenchError(
                f"method {name!r}: cannot build {target!r} ({' '.join(str(err).split())})."
            ) from None
        takes_seed = "seed" in (signature_options(cls, skip=()) or [])
        shown = {k: v for k, v in options.items() if k not in METHOD_EXECUTION_OPTIONS}
        if "amp" in shown:
            # metric.amp turns autocast on for every method that offers it (the worker's
            # make_explainer); a method's own amp can only add it: record what runs
            shown["amp"] = bool(shown["amp"]) or run_amp
        methods[name] = Method(name, factory, {"_target_": target, **shown}, takes_seed)
    return methods


# -- metric settings ----------------------------------------------------------------------
def resolve_amp(amp: str, device: torch.device) -> bool:
    """``metric.amp``: ``auto`` is bf16 autocast + channels_last on CUDA and fp32 elsewhere
    (so CPU numbers never depend on it); ``true`` forces autocast (bf16 on CPU too)."""
    return amp == "true" or (amp == "auto" and device.type == "cuda")


def metric_settings(run: RunConfig, family: Any, evaluation: Any) -> dict[str, Any]:
    """The resolved settings every number depends on (step and tolerance in pixels) and
    the evaluation protocol (``protocol``): they make up ``settings_id``."""
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
        "amp": resolve_amp(m.amp, device_for(run.trainer.accelerator)),
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


def settings_id(settings: dict[str, Any], method: Method | None = None) -> str:
    """Short hash of the metric settings and protocol, plus one method's options."""
    value = settings if method is None else {**settings, "method": method.options}
    return short_hash(value, 8)
