"""The run's config schema: one set of defaults, typed overrides, typo errors.

The dataclasses below are the schema of ``conf/config.yaml`` (stored in Hydra's
ConfigStore as ``fam_bench_schema``, the first entry of its defaults list): Hydra checks
every override against them when it composes, so ``eval.num_episode=1`` or
``+eval.num_episode=1`` (a typo) and ``eval.n_way=five`` fail before anything runs. They
are also the one place defaults live; the YAML files only set what an experiment
changes. Nodes whose keys depend on a choice are checked when the run starts, against
the schema of that choice: ``task`` against its task family's ``Config`` dataclass,
``method.<name>`` against the explainer's signature, ``data.options`` / ``model.options``
against the dataset's / model's keyword arguments.

:func:`load` turns a composed config into a typed :class:`RunConfig` once, at the entry;
everything downstream reads typed objects.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from dataclasses import dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.config_errors import explain_error, type_error, unknown_key_message
from experiments.own_data import with_own_data
from experiments.unread_keys import check_unread_keys
from fam.errors import FamBenchError


def _conf_dir() -> Path:
    """``conf/`` of the checkout, or the ``fam_bench_conf`` data package of an install."""
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    spec = find_spec("fam_bench_conf")  # a namespace package: its one search location
    return Path(next(iter(spec.submodule_search_locations))).resolve()


CONF_DIR = _conf_dir()
SUBSTRATES = ("zeros", "blur", "mean")
MISSING_TARGET = (
    "model=custom needs model.target=<dotted path to a class or factory function>, e.g. "
    "model.target=torchvision.models.resnet50 (its keyword arguments as "
    "+model.kwargs.<name>=<value>)."
)
AMP_CHOICES = ("auto", "true", "false")


def _choice(path: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise FamBenchError(f"{path} must be one of {list(options)}, got {value!r}.")


def _at_least(path: str, value: Any, minimum: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < minimum:
        raise FamBenchError(
            f"{path} must be >= {minimum}{' or null' if optional else ''}, got {value!r}. "
            f"Example: {path}={max(minimum, 1)}."
        )


@dataclass
class DataConfig:
    """``conf/data/<name>.yaml``: which dataset, where, at what size."""

    name: str = "synthetic"
    root: str | None = None
    image_size: int = 32
    train_split: str = "train"
    eval_split: str = "test"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _at_least("data.image_size", self.image_size, 1)


@dataclass
class ModelConfig:
    """``conf/model/<name>.yaml``: a built-in model (``name`` + ``options``) or, with
    ``model=custom``, any class or factory (``target`` + ``kwargs``). ``label`` names the
    model in results when the config name differs from the architecture (``conv4_32``)."""

    name: str = "conv4"
    label: str | None = None
    checkpoint: str | None = None
    target_layer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``auto``: strip a head only when its outputs are a named class count; ``true`` /
    #: ``false``: always / never (:mod:`experiments.models.custom`)
    strip_head: str = "auto"
    checkpoint_key: str | None = None
    checkpoint_prefix: str | None = None
    input_size: int | None = None
    reshape: str | None = None

    def __post_init__(self) -> None:
        self.strip_head = str(self.strip_head).lower()  # YAML/CLI booleans arrive as "True"
        _choice("model.strip_head", self.strip_head, ("auto", "true", "false"))


@dataclass
class MetricConfig:
    """``conf/metric/default.yaml``; every value goes into ``settings_id``."""

    step: int | None = None
    deletion_substrate: str = "zeros"
    insertion_substrate: str = "blur"
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    tolerance: float = 15.0
    tolerance_at: str = "annotation"
    tolerance_image_size: int = 224
    energy_region: str = "box"
    confidence_space: str = "image"
    ties: str = "smooth"
    #: null: each metric's source (MetricSpec.explain_class); "predicted" | "true": all
    explain_class: str | None = None
    score: str = "probability"
    distractors: int = 10
    distractor_classes: str = "other"
    temperature: float | None = None
    sanity_samples: int = 8
    batch_size: int = 256
    #: ``auto``: bf16 autocast + channels_last when the run's device is CUDA, fp32 on CPU
    amp: str = "auto"

    def __post_init__(self) -> None:
        self.amp = str(self.amp).lower()  # YAML/CLI booleans arrive as "True"/"False"
        _choice("metric.amp", self.amp, AMP_CHOICES)
        _at_least("metric.step", self.step, 1, optional=True)
        _choice("metric.deletion_substrate", self.deletion_substrate, SUBSTRATES)
        _choice("metric.insertion_substrate", self.insertion_substrate, SUBSTRATES)
        _at_least("metric.blur_kernel", self.blur_kernel, 1)
        if self.blur_sigma <= 0:
            raise FamBenchError(f"metric.blur_sigma must be > 0, got {self.blur_sigma}.")
        _at_least("metric.tolerance", self.tolerance, 0)
        _at_least("metric.tolerance_image_size", self.tolerance_image_size, 1)
        _choice("metric.tolerance_at", self.tolerance_at, ("annotation", "input"))
        _choice("metric.energy_region", self.energy_region, ("box", "mask"))
        _choice("metric.confidence_space", self.confidence_space, ("image", "normalised"))
        _choice("metric.ties", self.ties, ("smooth", "pixel", "stable"))
        if self.explain_class is not None:
            # YAML/CLI read `true` as a boolean: the class name is its text
            self.explain_class = str(self.explain_class).lower()
            _choice("metric.explain_class", self.explain_class, ("predicted", "true"))
        _choice("metric.score", self.score, ("probability", "similarity"))
        _at_least("metric.distractors", self.distractors, 1)
        _choice("metric.distractor_classes", self.distractor_classes, ("other", "any"))
        if self.temperature is not None and self.temperature <= 0:
            raise FamBenchError(f"metric.temperature must be > 0 or null, got {self.temperature}.")
        _at_least("metric.sanity_samples", self.sanity_samples, 1)
        _at_least("metric.batch_size", self.batch_size, 1)


@dataclass
class TrainerConfig:
    """``conf/trainer/default.yaml``: training (Lightning) and evaluation devices."""

    max_steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    batch_size: int = 128
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "ddp_spawn"
    precision: str = "32-true"
    num_workers: int = 0
    deterministic: bool = False
    channels_last: bool = True
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        _at_least("trainer.max_steps", self.max_steps, 1)
        if self.lr <= 0:
            raise FamBenchError(f"trainer.lr must be > 0, got {self.lr}.")
        _choice("trainer.optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _at_least("trainer.batch_size", self.batch_size, 1)
        _choice("trainer.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda"))
        _at_least("trainer.devices", self.devices, 1)
        _at_least("trainer.num_nodes", self.num_nodes, 1)
        _at_least("trainer.num_workers", self.num_workers, 0)
        _at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class EvalConfig:
    """What is explained: few-shot episodes or blocks of test queries (see tasks)."""

    num_episodes: int = 100
    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15
    num_queries: int | None = 500
    unit_size: int = 32
    batch_size: int = 128
    figure_samples: int = 6
    progress: bool = True
    untrained_baseline: bool = True

    def __post_init__(self) -> None:
        for key in ("num_episodes", "n_way", "n_shot", "n_query", "unit_size", "batch_size"):
            _at_least(f"eval.{key}", getattr(self, key), 1)
        _at_least("eval.num_queries", self.num_queries, 1, optional=True)
        _at_least("eval.figure_samples", self.figure_samples, 0)


@dataclass
class RunConfig:
    """The whole run (``conf/config.yaml``)."""

    name: str = "custom"
    seed: int = 0
    methods: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    cache_dir: str = ".cache/fam-bench"
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: dict[str, Any] = field(default_factory=dict)
    metric: MetricConfig = field(default_factory=MetricConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: dict[str, Any] = field(default_factory=lambda: {"name": "csv"})
    method: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _at_least("seed", self.seed, 0)
        # an empty path is the current directory: the model would land wherever run.py runs
        if not str(self.cache_dir).strip():
            raise FamBenchError(
                "cache_dir is empty; give the folder for trained models, e.g. "
                "cache_dir=.cache/fam-bench (or leave it unset)."
            )
        if self.output_dir is not None and not str(self.output_dir).strip():
            raise FamBenchError("output_dir is empty; give a folder or leave it unset (null).")
        for key in ("methods", "metrics"):
            names = list(getattr(self, key))
            if not names:
                raise FamBenchError(f"`{key}` is empty; name at least one, e.g. {key}=[a,b].")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise FamBenchError(f"`{key}` names {twice} more than once.")


def _register_schema() -> None:
    ConfigStore.instance().store(name="fam_bench_schema", node=RunConfig)


_register_schema()


# -- methods as config --------------------------------------------------------------------
def method_dirs(overrides: list[str]) -> list[Path]:
    """Folders holding ``method/<name>.yaml``: ``conf/`` and every ``file://`` entry of a
    ``hydra.searchpath=[...]`` override (a user's own config directory)."""
    dirs = [CONF_DIR]
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "hydra.searchpath":
            continue
        for entry in value.strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if entry.startswith("file://"):
                dirs.append(Path(entry.removeprefix("file://")).expanduser().resolve())
    return dirs


def available_methods(overrides: list[str] | None = None) -> list[str]:
    names = {p.stem for d in method_dirs(overrides or []) for p in (d / "method").glob("*.yaml")}
    return sorted(names)


def with_method_defaults(overrides: list[str]) -> list[str]:
    """``overrides`` plus ``+method@method.<name>=<name>`` for every method config found,
    so that ``method.<name>.<option>=<value>`` overrides an existing key (Hydra rejects
    unknown keys) and the run reads each listed method's options from ``cfg.method``."""
    present = {a.split("=", 1)[0].lstrip("+~") for a in overrides}
    extra = [
        f"+method@method.{name}={name}"
        for name in available_methods(overrides)
        if f"method@method.{name}" not in present
    ]
    return [*overrides, *extra]


def compose_config(
    overrides: list[str] | None = None,
    config_dir: Path | None = None,
    return_hydra_config: bool = False,
):
    """Compose ``conf/config.yaml`` with ``overrides`` as ``run.py`` does (tests, notebooks).
    Errors are :class:`FamBenchError` with the nearest valid key
    (:func:`experiments.config_errors.explain_error`)."""
    overrides = with_method_defaults(list(overrides or []))
    overrides, notes = with_own_data(overrides, method_dirs(overrides))
    print_notes(notes)
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    except Exception as err:  # noqa: BLE001 - rewritten as a user error or re-raised
        message = explain_error(err, overrides, config_dir or CONF_DIR, RunConfig)
        if message is None:
            raise
        raise FamBenchError(message) from None
    # `+key=value` bypasses Hydra's key check: the schema catches it; a key that exists but
    # that this experiment, data, task and model never read is refused too
    check_unread_keys(load(cfg, overrides), overrides)
    return cfg


def print_notes(notes: list[str]) -> None:
    """Notes on how the command line was completed (:mod:`experiments.own_data`), on stderr."""
    for note in notes:
        print(f"fam-bench: note: {note}", file=sys.stderr)


# -- typed conversion ---------------------------------------------------------------------
def load(cfg: DictConfig | dict, overrides: list[str] | None = None) -> RunConfig:
    """The composed config as a typed :class:`RunConfig` (checked; ``hydra`` dropped).
    ``overrides``: the command line it was composed from (for the error messages)."""
    if isinstance(cfg, dict):
        container = {k: v for k, v in cfg.items() if k != "hydra"}
    else:  # children resolve against the root; `hydra` (run-time values) is left out
        try:
            container = {
                k: OmegaConf.to_container(cfg[k], resolve=True)
                if OmegaConf.is_config(cfg[k])
                else cfg[k]
                for k in cfg
                if k != "hydra"
            }
        except OmegaConfBaseException as err:
            text = " ".join(str(err).split())
            if "${.target}" in text and OmegaConf.select(cfg, "model.target") is None:
                raise FamBenchError(MISSING_TARGET) from None  # model=custom's name is its target
            raise FamBenchError(type_error(text, RunConfig)) from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), container)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        text = " ".join(str(err).split())
        if key and ("not in" in text or "not found" in text):
            given = list(overrides or [])
            if key == "model._target_" and isinstance(container.get("model"), dict):
                given.append(f"model._target_={container['model'].get('_target_')}")
            raise FamBenchError(unknown_key_message(key, given, CONF_DIR)) from None
        raise FamBenchError(type_error(text, RunConfig)) from None
    return typed


def check_keys(path: str, given: dict[str, Any], valid: list[str]) -> None:
    """Refuse keys of ``given`` that are not in ``valid``, naming the nearest one."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.6)
        hint = f" Did you mean `{path}.{close[0]}`?" if close else ""
        raise FamBenchError(
            f"Unknown option `{path}.{unknown[0]}`.{hint} Valid options of `{path}`: "
            f"{', '.join(sorted(valid)) or '(none)'}."
        )


def typed_node(path: str, schema: type, node: dict[str, Any]) -> Any:
    """``node`` checked against the dataclass ``schema`` (unknown keys and wrong types are
    errors naming ``path.<key>``), as an instance of ``schema``."""
    check_keys(path, node, [f.name for f in fields(schema)])
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        text = " ".join(str(err).split()).replace("full_key: ", f"key: {path}.")
        raise FamBenchError(type_error(text, RunConfig)) from None


def signature_options(target: Any, skip: tuple[str, ...]) -> list[str] | None:
    """Keyword arguments ``target`` accepts (``None``: it takes ``**kwargs``)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in skip and p.kind is not p.VAR_POSITIONAL]
