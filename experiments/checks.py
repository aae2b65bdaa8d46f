"""Loud warnings about runs whose numbers mean little (``warnings.json``, exit code kept).

A run that finishes is not necessarily a run worth reading. These checks look at what
it produced and warn, at the end of the run and in ``<run>/warnings.json`` (the
leaderboard shows them beside the table), when:

- ``degenerate_maps``: a method's maps are degenerate (constant or non-finite) for more
  than half of the samples;
- ``small_target_layer``: the target layer's map is smaller than 3x3, so every map is a
  blurred blob of at most four values;
- ``not_above_untrained``: a task metric is no more than 2 points above the same network
  re-initialised (``task_metrics.csv`` column ``untrained``, retrieval and contrastive);
- ``near_chance``: the task accuracy is within 2 points of chance (an untrained or
  diverged model: its explanations explain noise);
- ``excluded_samples``: a metric excluded more than 10% of a method's samples (empty
  masks, zero maps, undefined scores), so its mean is over a subset;
- ``relevance_not_conserved``: Relevance-CAM's relevance at the target layer is more than
  5% off the seed under a conserving composite (a block its rules do not see), for the
  samples listed.
- ``centre_prior``: the ``center`` floor's pointing game is within 5 points of the best
  method's or above it: ``metric.tolerance`` is too large for the image size
  (:func:`evaluation.summary.centre_prior_warning`; the leaderboard checks each table).

Before the run, :func:`settings_warnings` warns about settings that make a metric
degenerate whatever the model (recorded in the same file):

- ``few_curve_points``: a deletion/insertion curve of fewer than 8 points (its area is a
  coarse trapezoid: at ``metric.step=100000`` FAM and random both score 0.3932);
- ``coarse_step``: ``metric.step`` changes more than a tenth of the image's pixels at once.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from evaluation.registry import METRICS, is_metric_column
from evaluation.summary import centre_prior_warning

log = logging.getLogger(__name__)

DEGENERATE_SHARE = 0.5
MIN_MAP_SIDE = 3
CHANCE_MARGIN = 0.02
EXCLUDED_SHARE = 0.10


MIN_CURVE_POINTS = 8
MAX_STEP_SHARE = 0.1


def settings_warnings(settings: dict[str, Any], metrics: list[str]) -> list[dict[str, Any]]:
    """Warnings about resolved metric ``settings`` (``step`` and ``image_size`` in pixels)
    that make the curve metrics among ``metrics`` degenerate (module docstring)."""
    curves = [m for m in metrics if METRICS[m].curves]
    if not curves:
        return []
    pixels = int(settings["image_size"]) ** 2
    step = int(settings["step"])
    points = math.ceil(pixels / step) + 1
    out = []
    finer = max(1, pixels // 100)
    fix = (
        f"lower metric.step (metric.step={finer} gives {math.ceil(pixels / finer) + 1} points; "
        f"unset, it is one image row, {settings['image_size']} pixels)"
    )
    if points < MIN_CURVE_POINTS:
        out.append(
            {
                "code": "few_curve_points",
                "message": (
                    f"{', '.join(curves)}: each curve has {points} points (metric.step={step} "
                    f"of {pixels} pixels), fewer than {MIN_CURVE_POINTS}: the area under it "
                    f"cannot tell a good map from a random one; {fix}."
                ),
            }
        )
    if step > MAX_STEP_SHARE * pixels:
        out.append(
            {
                "code": "coarse_step",
                "message": (
                    f"{', '.join(curves)}: metric.step={step} changes "
                    f"{min(step, pixels) / pixels:.0%} of the image's {pixels} pixels at "
                    f"once (more than {MAX_STEP_SHARE:.0%}); {fix}."
                ),
            }
        )
    for warning in out:
        log.warning("WARNING: %s", warning["message"])
    return out


def run_warnings(
    results: pd.DataFrame,
    task_metrics: pd.DataFrame,
    chance: float | None,
    target_shape: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """The warnings of a finished run: ``[{"code", "message", ...}]``."""
    out: list[dict[str, Any]] = []
    if target_shape is not None and min(target_shape) < MIN_MAP_SIDE:
        h, w = target_shape
        out.append(
            {
                "code": "small_target_layer",
                "message": (
                    f"the target layer's map is {h}x{w} (< {MIN_MAP_SIDE}x{MIN_MAP_SIDE}): every "
                    "map is an upsampled blob of a few values; choose an earlier layer "
                    "(model.target_layer) or pool less."
                ),
            }
        )
    if chance is not None and len(task_metrics):
        first = task_metrics.iloc[0]
        value = float(first["value"])
        if math.isfinite(value) and value <= chance + CHANCE_MARGIN:
            out.append(
                {
                    "code": "near_chance",
                    "message": (
                        f"the task accuracy {first['metric']} = {value:.3f} is within "
                        f"{CHANCE_MARGIN * 100:.0f} points of chance ({chance:.3f}): the model "
                        "has not learned the task (train longer, lower the learning rate), so "
                        "its explanations explain noise."
                    ),
                }
            )
    if "untrained" in task_metrics:
        worse = [
            f"{r.metric} {float(r.value):.3f} (untrained {float(r.untrained):.3f})"
            for r in task_metrics.itertuples()
            if math.isfinite(float(r.untrained))
            and float(r.value) <= float(r.untrained) + CHANCE_MARGIN
        ]
        if worse:
            out.append(
                {
                    "code": "not_above_untrained",
                    "message": (
                        f"training did not beat the same network re-initialised: "
                        f"{', '.join(worse)} (within {CHANCE_MARGIN * 100:.0f} points or "
                        "below). The encoder may have collapsed (SimSiam does on the "
                        "embedded data without task.background_swap) or not trained long "
                        "enough, so its explanations explain an encoder no better than "
                        "random weights."
                    ),
                }
            )
    for method, group in results.groupby("method", sort=False):
        share = float(group["degenerate"].astype(bool).mean())
        if share > DEGENERATE_SHARE:
            reasons = group.loc[group["degenerate"].astype(bool), "degenerate_reason"]
            out.append(
                {
                    "code": "degenerate_maps",
                    "method": method,
                    "message": (
                        f"{method}: {share:.0%} of its maps are degenerate "
                        f"({', '.join(sorted(set(map(str, reasons)) - {''})) or 'constant'}); "
                        "its metric values are those of an uninformative map."
                    ),
                }
            )
        for column in (c for c in results.columns if is_metric_column(c)):
            values = group[column]
            excluded = float(values.isna().mean())
            if excluded > EXCLUDED_SHARE:
                out.append(
                    {
                        "code": "excluded_samples",
                        "method": method,
                        "metric": column,
                        "message": (
                            f"{method} / {column}: {excluded:.0%} of the samples are excluded "
                            "(undefined values); the mean is over the rest."
                        ),
                    }
                )
    centre = centre_prior_warning(results)
    if centre is not None:
        out.append(centre)
    for warning in out:
        log.warning("WARNING: %s", warning["message"])
    return out


def conservation_warnings(flagged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``relevance_not_conserved`` warning per method from the worker's flagged
    samples (``experiments.worker.not_conserved``), naming the model and the layer."""
    out: list[dict[str, Any]] = []
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in flagged:
        by_method.setdefault(entry["method"], []).append(entry)
    for method, entries in by_method.items():
        first = entries[0]
        ratios = [float(e["ratio"]) for e in entries]
        finite = [r for r in ratios if math.isfinite(r)]
        span = f"{min(finite):.3g} to {max(finite):.3g}" if finite else "undefined"
        warning = {
            "code": "relevance_not_conserved",
            "method": method,
            "model": first["model"],
            "layer": first["layer"],
            "samples": [e["sample_id"] for e in entries],
            "ratios": ratios,
            "message": (
                f"{method}: relevance is not conserved on model {first['model']} at layer "
                f"{first['layer']!r} for {len(entries)} samples (relevance / seed {span}, "
                "more than 5% off under a conserving composite): an operation the LRP rules do "
                "not see (a residual '+' that no canonizer turns into a Sum, attention, a "
                "norm layer) passes relevance on "
                "wrongly, so these maps are not LRP's. Choose another target layer or "
                "canonize the model's blocks (method.relevancecam.canonizers)."
            ),
        }
        log.warning("WARNING: %s", warning["message"])
        out.append(warning)
    return out
