"""Builders: the run's datasets, model (trained or loaded) and methods.

Each builder takes the parts of the typed :class:`~experiments.config.RunConfig` it reads
(``run.data``, ``run.model``, the trainer, the seed, ...) and either returns exactly what
was asked for or raises :class:`~fam.errors.FamBenchError` naming the key to change;
nothing falls back to something else. The ids made of the config live in
:mod:`experiments.identity`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from hydra.utils import to_absolute_path as absolute
from omegaconf import OmegaConf
from torch import nn

from evaluation.plain import plain
from experiments.config import (
    CONF_DIR,
    DataConfig,
    ModelConfig,
    TrainerConfig,
    check_keys,
    signature_options,
)
from experiments.data import build_dataset
from experiments.data.content import DIGEST_CACHE, DigestCache, array_digest, file_digests
from experiments.identity import method_options
from experiments.models import build_model_from_config
from experiments.models.custom import named_class_counts
from experiments.tasks.base import TaskFamily
from experiments.training import load_weights, train_or_load
from experiments.training.checkpoint_files import find_state_dict, read_checkpoint
from experiments.training.train import load_checkpoint_task_state
from fam.errors import FamBenchError, out_of_memory_message
from fam.layers import eval_mode, resolve_target_layer
from fam.tokens import FeatureLayout

log = logging.getLogger(__name__)


def to_absolute_path(path: str) -> str:
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
def build_datasets(d: DataConfig, experiment: str) -> tuple[Any, Any]:
    """``(train_set, eval_set)`` of the data config ``d`` (FamBenchError when missing or
    malformed); ``experiment``: the run's name, for the message."""
    if d.root == "???":
        raise FamBenchError(
            f"Dataset {d.name!r} is read from disk: set data.root=<folder> on the command line "
            f"(conf/data/ describes each layout; `{experiment}` cannot run without it)."
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


def data_content(root: str | None, cache_dir: str, train_set: Any, eval_set: Any) -> dict[str, str]:
    """``{"train": id, "eval": id}`` of a dataset read from ``data.root``, ``{}`` for the
    generated ones (their options fix their content).

    ``data.root`` itself is an execution key (the same copy of a dataset may sit at another
    path on another machine), so what identifies the data in the model cache, the run
    fingerprint and ``table_id`` is this content id instead: the class names, labels,
    boxes, and each file's path below the root and the sha256 of its bytes (an array
    dataset: its shape and every pixel; :mod:`experiments.data.content`, cached in
    ``cache_dir``). Pointing ``data.root`` at another folder is another dataset:
    another model, another table, and a refused resume. ``root``: ``data.root``;
    ``cache_dir``: the run's ``cache_dir``."""
    if root is None:
        return {}
    folder = Path(to_absolute_path(root))
    cache = DigestCache(Path(to_absolute_path(cache_dir)) / DIGEST_CACHE)
    try:
        return {
            "train": dataset_content_id(train_set, folder, cache),
            "eval": dataset_content_id(eval_set, folder, cache),
        }
    finally:
        cache.close()


def dataset_content_id(dataset: Any, root: Path, cache: Any = None) -> str:
    """The content id of one split (:func:`data_content`); ``cache``: a
    :class:`~experiments.data.content.DigestCache` of file digests."""
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
def model_label(m: ModelConfig) -> str:
    """The model's name in results: its config name, or a custom target's dotted path."""
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


def build_network(model_cfg: ModelConfig, checkpoint: Any = None) -> nn.Module:
    """The untrained embedding network ``model_cfg`` (``run.model``) describes: a built-in
    model, or with ``model=custom`` exactly ``model.target`` (never another model).
    ``checkpoint``: the content of ``model.checkpoint`` (:func:`read_checkpoint`), whose
    head shapes and named class counts decide ``model.strip_head=auto``."""
    model = plain(model_cfg)
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
        _, state = find_state_dict(checkpoint, model.get("checkpoint_key"), model["checkpoint"])
    network, _ = build_model_from_config(
        {k: model[k] for k in keys if k in model},
        class_counts=named_class_counts(checkpoint) if checkpoint is not None else None,
        checkpoint_state=state,
    )
    return network


def probe(
    model: nn.Module, model_cfg: ModelConfig, size: int, device: torch.device
) -> tuple[int, int] | None:
    """Check that the model maps a batch of ``size`` x ``size`` images (``data.image_size``)
    to ``(N, D)``; returns the target layer's spatial shape ``(h, w)`` (``None`` if it is
    not a 4-D map)."""
    x = torch.zeros(2, 3, size, size, device=device)
    layer = resolve_target_layer(model, model_cfg.target_layer)
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
            f"Model {model_label(model_cfg)!r} cannot take {size}x{size} images ({first}). The "
            "image is too small for the model's pooling: raise data.image_size, or pool less (e.g. "
            "model.options.pools=[true,true,false,false] for Conv-4)."
        ) from None
    finally:
        handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FamBenchError(
            f"Model {model_label(model_cfg)!r} returns {shape} for a batch of 2 images; the suite "
            "explains embeddings of shape (N, D). End the model with global pooling and "
            "flatten (or model.strip_head=true for a classifier), or wrap it so that forward "
            "returns the embedding."
        )
    if not bool(torch.isfinite(out).all()):
        raise FamBenchError(
            f"Model {model_label(model_cfg)!r} returns non-finite embeddings (nan or inf) for a "
            "blank batch; check its weights (model.checkpoint) and its forward pass."
        )
    return tuple(seen[0][-2:]) if seen and len(seen[0]) == 4 else None


def build_model(
    model_cfg: ModelConfig,
    image_size: int,
    family: TaskFamily,
    train_set: Any,
    device: torch.device,
    *,
    trainer: TrainerConfig,
    cache_dir: str,
    key: dict[str, Any],
    seed: int,
    out: Path,
    logger: Any,
    notes: list[str],
    progress: bool = False,
) -> nn.Module:
    """The embedding network ``model_cfg`` describes, with weights: loaded from
    ``model.checkpoint``, reused from the ``cache_dir`` cache (keyed on ``key``, the
    :func:`~experiments.identity.training_key`, and ``seed``), or trained with ``trainer``
    (and cached; kept in the run folder ``out`` if the cache is read-only)."""
    if int(getattr(family.config, "monitor_every", 0) or 0) > 0:
        # the runner passes no validation split: the key would be ignored
        raise FamBenchError(
            "task.monitor_every is read only by the Python API "
            "(experiments.training.train_or_load(..., val_set=...)); the runner trains "
            "without a validation monitor. Drop the override."
        )
    payload = None
    if model_cfg.checkpoint is not None and model_cfg.target:
        payload = read_checkpoint(to_absolute_path(model_cfg.checkpoint))
    network = build_network(model_cfg, payload).to(device)
    notes.extend(getattr(network, "head_notes", []))
    network.target_shape = probe(network, model_cfg, image_size, device)
    if model_cfg.checkpoint is not None:
        # a given checkpoint is loaded, never trained on (any layout: see load_weights)
        checkpoint = to_absolute_path(model_cfg.checkpoint)
        report = load_weights(
            network,
            checkpoint,
            key=model_cfg.checkpoint_key,
            prefix=model_cfg.checkpoint_prefix,
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
        trainer,
        None,
        to_absolute_path(cache_dir),
        key,
        seed,
        fallback_dir=out,
        logger=logger,
        progress=progress,
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


def method_node(name: str, nodes: dict[str, Any], searched: list[str]) -> dict[str, Any]:
    """The config of method ``name``: ``nodes[name]`` (``run.method``), else
    ``conf/method/<name>.yaml``."""
    if name in nodes:
        return dict(nodes[name])
    path = CONF_DIR / "method" / f"{name}.yaml"
    if path.is_file():  # composed without run.py's method defaults: the same file
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    raise FamBenchError(
        f"Unknown method {name!r}. Valid methods: {searched}. A method is one module in "
        "baselines/ and one conf/method/<name>.yaml (or a method/<name>.yaml in your own "
        "config directory, hydra.searchpath=[file://DIR])."
    )


def build_methods(names: list[str], nodes: dict[str, Any], autocast: bool) -> dict[str, Method]:
    """``name -> Method`` for the listed ``names`` (``run.methods``), configured by
    ``nodes`` (``run.method``); unknown methods and options are errors. ``autocast``: the
    run's resolved ``metric.amp`` (recorded in a method's own ``amp`` option)."""
    searched = sorted(set(nodes) | {p.stem for p in (CONF_DIR / "method").glob("*.yaml")})
    methods = {}
    for name in names:
        node = method_node(name, nodes, searched)
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
        options = method_options(target, options, autocast)
        methods[name] = Method(name, factory, options, takes_seed)
    return methods
