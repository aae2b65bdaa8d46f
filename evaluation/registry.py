"""The one metric registry: each metric's name, direction, needs and function.

The runner (which metrics a task can compute, how to compute them, which need the tie
field or each mask's resolution), the summary (which interval a metric gets, which get a
per-class mean), the leaderboard (ranking direction, which paired test) and the figures
(curve legends, forest-plot directions) all read :data:`METRICS`. A new metric costs its
module and one :func:`register` call here (or in the user's own module, imported before
the run). Two metrics are still named outside this module, for what is theirs alone:
``sanity``, the run-level randomisation check (its own pass in
:mod:`experiments.worker`, its own ``sanity.csv`` and its rows named ``sanity`` and
``sanity@<layer>`` in :mod:`evaluation.summary` and the leaderboard), and
``pointing_game``, whose ``center`` floor :func:`evaluation.summary.centre_prior_warning`
compares with the best method.

A metric's ``compute(inputs) -> {column: (M*N,) tensor}`` receives :class:`MetricInputs`:
every method's maps of one evaluation unit stacked method-major, so one call scores all
methods of a unit together. Metrics that share work (deletion and insertion come from
one streamed pass) share it through :meth:`MetricInputs.cached`.

Ground-truth metrics on a two-object image (synthetic ``pairs`` mode) also produce an
``<name>_other`` column, scored against the *other* object's mask: landing there is the
failure being measured, so its direction is the opposite of the metric's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from evaluation.causal import deletion_insertion
from evaluation.confidence import confidence_change
from evaluation.pointing import annotation_tolerance, energy_pointing_game, pointing_game
from fam.errors import FamBenchError

OTHER_SUFFIX = "_other"


@dataclass
class MetricInputs:
    """What a metric sees for one unit: ``M`` methods x ``N`` samples, method-major.

    ``images (N, 3, H, W)`` (the unit's images, not repeated per method); ``maps
    (M*N, H, W)``; ``score_fn(x (B,3,H,W), index (B,) into N) -> (B,)``; ``confidence_fn``
    the non-negative score (``None``: not available); ``masks``/``other_masks`` ``(N, H, W)``
    bool or ``None``; ``boxes (N, 4)`` or ``None``; ``annotation_sizes (N, 2)`` the
    resolution each mask was drawn at; ``sample_seeds (N,)`` int64, one per sample (the
    random tie order of deletion/insertion depends on a sample's seed alone, so shards and
    resumed runs agree); ``tie_field (N, H, W)`` the ``random`` method's map of each
    sample, the order of tied pixels under ``ties="smooth"``; ``mean``/``std`` the data's
    normalisation; ``settings`` the run's resolved metric settings; ``model`` whose mode
    the metric restores.
    """

    images: Tensor
    maps: Tensor
    score_fn: Callable[[Tensor, Tensor], Tensor]
    confidence_fn: Callable[[Tensor, Tensor], Tensor] | None
    masks: Tensor | None
    other_masks: Tensor | None
    settings: dict[str, Any]
    model: nn.Module | None
    batch_size: int
    boxes: Tensor | None = None
    annotation_sizes: Tensor | None = None
    sample_seeds: Tensor | None = None
    tie_field: Tensor | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def m(self) -> int:
        return len(self.maps) // self.n

    @property
    def image_index(self) -> Tensor:
        """``(M*N,)`` the unit image each map explains (method-major)."""
        return torch.arange(self.m * self.n, device=self.images.device) % self.n

    def repeated(self, t: Tensor | None) -> Tensor | None:
        """A per-sample tensor ``(N, ...)`` repeated for every method ``(M*N, ...)``."""
        return None if t is None else t.repeat(self.m, *([1] * (t.dim() - 1)))

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


@dataclass(frozen=True)
class MetricSpec:
    """A metric's metadata and function (module docstring).

    ``direction``: ``"lower"`` or ``"higher"`` is better. ``binary``: per-sample values are
    0/1 hits (Wilson intervals, exact McNemar tests) scaled by ``scale`` (1 or 100).
    ``needs_masks``: needs ground truth (skipped with a note on data without masks).
    ``needs_confidence``: needs a non-negative score. ``has_other``: also scored against
    the other object of a pairs image. ``curves``: the curve kinds it leaves in
    ``curves.npz``. ``per_sample``: ``False`` for run-level checks (``sanity``).
    ``bounds``: the range every value lies in, in displayed units (intervals are clipped
    to it, with a note); ``None`` when it depends on the score (the curve metrics: [0, 1]
    for ``metric.score=probability``, see :func:`value_bounds`).
    ``explain_class``: the class its source explains by default, ``"predicted"`` (the
    model's decision: RISE's deletion/insertion, Grad-CAM++'s Average Drop, the sanity
    check) or ``"true"`` (the ground truth: TorchRay's pointing game);
    ``metric.explain_class`` overrides it for every metric.
    ``identical_tolerance``: per-sample difference (in the column's units) under which two
    entries count as identical on this metric; ``None``: a share of the metric's range
    over the table (:func:`evaluation.summary.identity_tolerance`).
    ``ranks_pixels``: orders the pixels by the map, so tied pixels need an order
    (``metric.ties``; the worker draws the tie field for it). ``uses_tolerance``: reads
    the pointing tolerance (``metric.tolerance_at=annotation`` then needs each mask's
    resolution, checked before training). ``class_mean``: ``summary.csv`` adds a
    ``<name>_class_mean`` row, the mean over classes of each class's value (TorchRay's
    second number, t interval over classes).
    """

    name: str
    direction: Literal["lower", "higher"]
    description: str
    compute: Callable[[MetricInputs], dict[str, Tensor]] | None = None
    binary: bool = False
    scale: float = 1.0
    needs_masks: bool = False
    needs_confidence: bool = False
    has_other: bool = False
    per_sample: bool = True
    curves: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None
    explain_class: Literal["predicted", "true"] = "predicted"
    identical_tolerance: float | None = None
    ranks_pixels: bool = False
    uses_tolerance: bool = False
    class_mean: bool = False


METRICS: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add ``spec`` to :data:`METRICS` (a name may be registered once)."""
    if spec.name in METRICS:
        raise FamBenchError(f"metric {spec.name!r} is registered twice.")
    if spec.direction not in ("lower", "higher"):
        raise FamBenchError(f"metric {spec.name!r}: direction must be 'lower' or 'higher'.")
    METRICS[spec.name] = spec
    return spec


def value_bounds(column: str, score: str | None = None) -> tuple[float, float] | None:
    """The range every value of ``column`` lies in (displayed units), or ``None``: the
    spec's ``bounds``, or [0, 1] for a curve metric whose runs scored probabilities
    (``score``: their ``metric.score``)."""
    spec = spec_of(column)
    if spec.bounds is not None:
        return spec.bounds
    if spec.curves and score == "probability":
        return (0.0, 1.0)
    return None


def spec_of(column: str) -> MetricSpec:
    """The spec behind a result column (``pointing_game`` or ``pointing_game_other``)."""
    if column in METRICS:
        return METRICS[column]
    base = column.removesuffix(OTHER_SUFFIX)
    if base != column and base in METRICS and METRICS[base].has_other:
        return METRICS[base]
    raise KeyError(column)


def is_metric_column(column: str) -> bool:
    try:
        return spec_of(column).per_sample
    except KeyError:
        return False


def direction(column: str) -> Literal["lower", "higher"]:
    """Better direction of a result column; ``*_other`` columns are reversed."""
    spec = spec_of(column)
    if column.endswith(OTHER_SUFFIX) and column != spec.name:
        return "higher" if spec.direction == "lower" else "lower"
    return spec.direction


def is_binary(column: str) -> bool:
    return spec_of(column).binary


def metric_columns(names: list[str], other: bool) -> list[str]:
    """Result columns of the per-sample metrics ``names`` in registry order."""
    cols = []
    for name, spec in METRICS.items():
        if name in names and spec.per_sample:
            cols.append(name)
    if other:
        cols += [f"{n}{OTHER_SUFFIX}" for n in list(cols) if METRICS[n].has_other]
    return cols


def available() -> list[str]:
    return list(METRICS)


EXPLAIN_CLASSES = ("predicted", "true")


def explained_classes(
    names: list[str], forced: str | None, available: tuple[str, ...]
) -> dict[str, str]:
    """The class each metric of ``names`` explains: ``forced`` (``metric.explain_class``)
    or the metric's own default (:attr:`MetricSpec.explain_class`).

    ``available``: the classes the task can explain. Few-shot explains either; retrieval
    and contrastive tasks explain their reference, which is the model's decision (the
    retrieved neighbour, the kNN class), so every metric explains ``"predicted"`` there
    and forcing ``"true"`` is an error.
    """
    if forced is not None and forced not in available:
        raise FamBenchError(
            f"metric.explain_class={forced} is not available for this task, which explains "
            f"only {list(available)} (its reference is the model's decision); use "
            f"metric.explain_class={available[0]} or null (each metric's default)."
        )
    out = {}
    for name in names:
        want = forced or METRICS[name].explain_class
        out[name] = want if want in available else available[0]
    return out


# -- the suite's metrics ------------------------------------------------------------------
def _causal(inputs: MetricInputs) -> Any:
    s = inputs.settings

    def run():
        return deletion_insertion(
            inputs.score_fn,
            inputs.images,
            inputs.maps,
            step=s["step"],
            deletion_substrate=s["deletion_substrate"],
            insertion_substrate=s["insertion_substrate"],
            batch_size=inputs.batch_size,
            blur_kernel_size=s["blur_kernel"],
            blur_sigma=s["blur_sigma"],
            model=inputs.model,
            amp=s["amp"],
            ties=s["ties"],
            seed=inputs.repeated(inputs.sample_seeds) if inputs.sample_seeds is not None else 0,
            tie_field=inputs.tie_field,
            # every method's maps share the unit's images: the map-independent points
            # (unperturbed, fully deleted, substrate) are scored once per image
            image_index=inputs.image_index,
        )

    return inputs.cached("causal", run)


def _deletion(inputs: MetricInputs) -> dict[str, Tensor]:
    result = _causal(inputs)
    return {"deletion_auc": result.deletion_auc, "curve:deletion": result.deletion_curve}


def _insertion(inputs: MetricInputs) -> dict[str, Tensor]:
    result = _causal(inputs)
    return {"insertion_auc": result.insertion_auc, "curve:insertion": result.insertion_curve}


def _ground_truth(
    inputs: MetricInputs, name: str, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]
) -> dict[str, Tensor]:
    """``fn(maps, masks, boxes)`` against the object, and the other object in pairs."""
    out = {name: fn(inputs.maps, inputs.repeated(inputs.masks), inputs.repeated(inputs.boxes))}
    if inputs.other_masks is not None:
        out[f"{name}{OTHER_SUFFIX}"] = fn(inputs.maps, inputs.repeated(inputs.other_masks), None)
    return out


def tolerance_of(inputs: MetricInputs) -> float | Tensor:
    """The pointing tolerance in input pixels: per sample at each annotation's resolution
    (``tolerance_at=annotation``, TorchRay) or scaled from ``tolerance_image_size``."""
    s = inputs.settings
    if s["tolerance_at"] == "input":
        return s["tolerance_px"]
    if inputs.annotation_sizes is None:
        raise FamBenchError(
            "metric.tolerance_at=annotation needs the resolution each mask was drawn at, "
            "which this dataset does not give; use metric.tolerance_at=input (the tolerance "
            "is then metric.tolerance at metric.tolerance_image_size, scaled to the input)."
        )
    tol = annotation_tolerance(s["tolerance"], inputs.annotation_sizes, inputs.images.shape[-2:])
    return inputs.repeated(tol.float().to(inputs.images.device))


def _pointing(inputs: MetricInputs) -> dict[str, Tensor]:
    tol = tolerance_of(inputs)
    return _ground_truth(inputs, "pointing_game", lambda m, t, b: pointing_game(m, t, tol))


def _energy(inputs: MetricInputs) -> dict[str, Tensor]:
    region = inputs.settings["energy_region"]
    return _ground_truth(
        inputs,
        "energy_pointing_game",
        lambda m, t, b: energy_pointing_game(m, t, region=region, boxes=b),
    )


def _confidence(inputs: MetricInputs) -> Any:
    def run():
        return confidence_change(
            inputs.confidence_fn,
            inputs.images,
            inputs.maps,
            batch_size=inputs.batch_size,
            model=inputs.model,
            amp=inputs.settings["amp"],
            space=inputs.settings["confidence_space"],
            mean=inputs.mean,
            std=inputs.std,
            image_index=inputs.image_index,  # the unperturbed score once per image
        )

    return inputs.cached("confidence", run)


def _drop(inputs: MetricInputs) -> dict[str, Tensor]:
    return {"average_drop": _confidence(inputs).drop}


def _increase(inputs: MetricInputs) -> dict[str, Tensor]:
    return {"increase_in_confidence": _confidence(inputs).increase}


register(
    MetricSpec(
        "deletion_auc",
        "lower",
        "RISE deletion: AUC of the score as pixels are removed in map order",
        _deletion,
        curves=("deletion",),
        ranks_pixels=True,
    )
)
register(
    MetricSpec(
        "insertion_auc",
        "higher",
        "RISE insertion: AUC of the score as pixels are restored in map order",
        _insertion,
        curves=("insertion",),
        ranks_pixels=True,
    )
)
register(
    MetricSpec(
        "pointing_game",
        "higher",
        "TorchRay pointing game: the map's maximum lies within tolerance of the object",
        _pointing,
        binary=True,
        explain_class="true",
        needs_masks=True,
        has_other=True,
        bounds=(0.0, 1.0),
        uses_tolerance=True,
        class_mean=True,
    )
)
register(
    MetricSpec(
        "energy_pointing_game",
        "higher",
        "Score-CAM energy pointing game: share of map mass on the object",
        _energy,
        explain_class="true",
        needs_masks=True,
        has_other=True,
        bounds=(0.0, 1.0),
    )
)
register(
    MetricSpec(
        "average_drop",
        "lower",
        "Grad-CAM++ Average Drop (%): relative score drop on image x map",
        _drop,
        needs_confidence=True,
        bounds=(0.0, 100.0),
    )
)
register(
    MetricSpec(
        "increase_in_confidence",
        "higher",
        "Grad-CAM++ Increase in Confidence (%): share of image x map scoring higher",
        _increase,
        binary=True,
        scale=100.0,
        needs_confidence=True,
        bounds=(0.0, 100.0),
    )
)
register(
    MetricSpec(
        "sanity",
        "lower",
        "Adebayo et al. model randomisation: rank correlation of maps, trained vs randomised",
        None,
        needs_masks=False,
        per_sample=False,
    )
)


def compute_all(names: list[str], inputs: MetricInputs) -> tuple[dict[str, Tensor], dict]:
    """Per-sample values ``{column: (M*N,)}`` and curves ``{kind: (M*N, T)}`` of ``names``."""
    values, curves = {}, {}
    for name in names:
        spec = METRICS[name]
        if spec.compute is None:
            continue
        with torch.no_grad():
            out = spec.compute(inputs)
        for key, value in out.items():
            if key.startswith("curve:"):
                curves[key.removeprefix("curve:")] = value
            else:
                values[key] = value
    return values, curves
