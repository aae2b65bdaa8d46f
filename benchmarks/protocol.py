"""The full miniImageNet protocol in a time budget, with ours or torchcam's deletion/insertion.

``python -m benchmarks.protocol --device cuda --budget-s S --deletion-insertion ours|torchcam
--out DIR`` runs the protocol of ``bench_e2e`` (b) (synthetic data, 84 px, Conv-4 pooled
after all four blocks, 5-way 5-shot, 15 queries a class, 600 images a class, every method
and metric, a fixed random initialisation as the checkpoint, ``metric.amp=auto``: bf16 +
channels_last on CUDA) for ``--episodes`` episodes (600) or as many as fit in ``S``
seconds: after each episode it stops when the next one would not fit. The task-accuracy
pass before the evaluation runs once; the re-initialised baseline's pass is off (it is no
part of the explanation protocol).

Each run adds its row to ``DIR/protocol-<device>.json`` and rewrites
``DIR/protocol-<device>.md`` from every row there:

- the time of the episodes run and each episode's time; the full protocol's time, which
  is *measured* when every episode ran and otherwise *extrapolated* (the first episode,
  which pays for warm-up, plus the mean of the others times the episodes not run), and
  the table says which;
- efficiency against the bare forward passes (``bench_e2e``: the run's model calls
  replayed on random images, same batch sizes and precision);
- the seconds spent in deletion/insertion (``evaluation.causal.deletion_insertion``
  timed between device syncs). With ``--deletion-insertion torchcam`` every such call goes
  to torchcam's ``DeletionInsertionMetric`` instead (:func:`torchcam_deletion_insertion`:
  its protocol, zeros for both curves, stable ties; under the run's autocast, so both
  rows use the same precision); the ratio row divides torchcam's deletion/insertion
  seconds per episode by ours;
- ``--throughput``: bare forward passes of the protocol's model at ``metric.batch_size``
  in fp32 and in bf16 (+ channels_last on CUDA), images per second.

``--smoke``: 32 px and one query a class, for a CPU check of the same code path.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import evaluation.registry as registry
from benchmarks import device_name, sync
from benchmarks.bench_e2e import (
    EnoughUnits,
    _random_checkpoint,
    _Recorder,
    _run,
    protocol_overrides,
)
from benchmarks.bench_metrics import _FixedCams
from evaluation.causal import DeletionInsertionResult
from experiments.config import compose_config
from fam.layers import eval_mode

RESERVE_S = 15.0  # kept for the bare replay and the tables after the last episode


class _BudgetRecorder(_Recorder):
    """Also times each unit, and ends the run when the next unit would not fit."""

    def __init__(self, device: torch.device, deadline: float, planned: int) -> None:
        super().__init__(device)
        self.deadline = deadline  # time.monotonic()
        self.budget_s = deadline - time.monotonic()
        self.planned = planned
        self.marks: list[float] = []  # clock() after each unit

    def after_unit(self, unit: int) -> None:
        super().after_unit(unit)
        self.marks.append(self.clock())
        durations = self.unit_seconds()
        if len(self.marks) < self.planned:
            expected = durations[-1] if len(durations) == 1 else max(durations[1:])
            reserve = min(RESERVE_S, 0.2 * self.budget_s)
            if time.monotonic() + expected + reserve > self.deadline:
                raise EnoughUnits

    def unit_seconds(self) -> list[float]:
        starts = [self.eval_started, *self.marks[:-1]]
        return [end - start for start, end in zip(starts, self.marks, strict=True)]


class _JobScores(nn.Module):
    """torchcam's "model": the suite's ``score_fn`` as a one-column logit.

    torchcam scores the unperturbed inputs in one call, then its jobs in order, sample
    after sample (``2 * n_steps - 1`` jobs each: the all-baseline image, then deletion and
    insertion at each interior point); the row's map is its job's sample, and the score is
    the one of that map's image. :func:`torchcam_deletion_insertion`'s test against
    ``deletion_insertion`` fails if torchcam ever orders its jobs otherwise.
    """

    def __init__(self, score_fn, image_index: Tensor, jobs_per_map: int) -> None:
        super().__init__()
        self.score_fn = score_fn
        self.image_index = image_index
        self.jobs_per_map = jobs_per_map
        self.originals_done = False
        self.offset = 0

    def forward(self, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        if not self.originals_done:
            self.originals_done = True
            maps = rows
        else:
            maps = (rows + self.offset) // self.jobs_per_map
            self.offset += x.shape[0]
        return self.score_fn(x, self.image_index[maps])[:, None]


def _deletion_insertion_metric():
    from torchcam.metrics import DeletionInsertionMetric

    if not hasattr(DeletionInsertionMetric, "_compute_curves"):
        raise RuntimeError(
            "torchcam's DeletionInsertionMetric has no _compute_curves: this adapter reads "
            "the per-sample curves from it (torchcam 0.5.0); pin that version."
        )

    class CurvesKept(DeletionInsertionMetric):
        """torchcam's metric unchanged, keeping the per-sample curves it computes."""

        def _compute_curves(self, *args, **kwargs):
            self.curves = super()._compute_curves(*args, **kwargs)
            return self.curves

    return CurvesKept


def torchcam_deletion_insertion(
    score_fn,
    images: Tensor,
    maps: Tensor,
    *,
    step: int = 224,
    batch_size: int = 256,
    model: nn.Module | None = None,
    amp: bool = False,
    image_index: Tensor | None = None,
    **ignored,
):
    """:func:`evaluation.deletion_insertion`'s call, computed by torchcam's metric.

    torchcam's protocol: one baseline (zeros) for both curves, stable ties, the
    unperturbed images scored in a separate pass, no sharing of map-independent points
    between maps of one image; the substrate, tie and seed arguments are ignored. Its
    point spacing ``ceil(H*W / steps)`` must equal ``step``. Maps with a nan or inf get
    nan curves, as in ours. Returns a :class:`evaluation.causal.DeletionInsertionResult`.
    """
    n, _, h, w = images.shape
    hw = h * w
    n_steps = math.ceil(hw / step)
    if math.ceil(hw / n_steps) != step:
        raise ValueError(f"torchcam cannot space points {step} pixels apart on {h}x{w}")
    if image_index is None:
        image_index = torch.arange(n, device=images.device)
    image_index = image_index.to(images.device)
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    maps = torch.where(finite[:, None, None], maps, 0.0)  # torchcam would drop the row
    scorer = _JobScores(score_fn, image_index, 2 * n_steps - 1)
    metric = _deletion_insertion_metric()(
        _FixedCams(scorer, maps), steps=n_steps, batch_size=batch_size
    )
    autocast = (
        torch.autocast(device_type=images.device.type, dtype=torch.bfloat16)
        if amp
        else nullcontext()
    )
    with eval_mode(model) if model is not None else nullcontext(), torch.no_grad(), autocast:
        metric.update(images[image_index], class_idx=0)
    fractions, deletion, insertion = (t.float() for t in metric.curves)
    deletion = torch.where(finite[:, None], deletion, torch.nan)
    insertion = torch.where(finite[:, None], insertion, torch.nan)
    return DeletionInsertionResult(
        deletion_auc=torch.trapezoid(deletion, fractions, dim=1),
        insertion_auc=torch.trapezoid(insertion, fractions, dim=1),
        deletion_curve=deletion,
        insertion_curve=insertion,
        fractions=fractions,
        step=step,
        n_steps=n_steps,
    )


class _Timed:
    """Seconds spent inside deletion/insertion calls, between device syncs."""

    def __init__(self, fn, device: torch.device) -> None:
        self.fn, self.device = fn, device
        self.each: list[float] = []  # seconds of each call (one per episode)

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            sync(self.device)
            self.each.append(time.perf_counter() - start)


@contextmanager
def _deletion_insertion(kind: str, device: torch.device):
    """Route the metric registry's deletion/insertion to ``kind``, timed (the registry
    holds the function it calls: that name is the one replaced)."""
    original = registry.deletion_insertion
    timed = _Timed(original if kind == "ours" else torchcam_deletion_insertion, device)
    registry.deletion_insertion = timed
    try:
        yield timed
    finally:
        registry.deletion_insertion = original


def _throughput(model: nn.Module, device: torch.device, size: int, batch: int, iters: int):
    """Bare forward images/s in fp32 and bf16 (channels_last on CUDA) at ``batch``."""
    from copy import deepcopy

    out = {}
    x = torch.randn(batch, 3, size, size, device=device)
    for precision in ("fp32", "bf16"):
        net, inputs = deepcopy(model).eval().to(memory_format=torch.contiguous_format), x
        if precision == "bf16" and device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else nullcontext()
        )
        with torch.no_grad(), autocast:
            for _ in range(3):
                net(inputs)
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                net(inputs)
            sync(device)
        out[precision] = batch * iters / (time.perf_counter() - start)
    return out


def run(args) -> dict:
    started = time.monotonic()
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    size, queries = (32, 1) if args.smoke else (84, args.queries)
    with tempfile.TemporaryDirectory(prefix="protocol-") as tmp:
        checkpoint = _random_checkpoint(Path(tmp) / "conv4.pt")
        overrides = [
            "eval.progress=false",
            f"trainer.accelerator={accelerator}",
            "eval.untrained_baseline=false",
            *protocol_overrides(checkpoint, args.episodes, queries, image_size=size),
        ]
        recorder = _BudgetRecorder(device, started + args.budget_s, args.episodes)
        with _deletion_insertion(args.deletion_insertion, device) as timed:
            row = _run(args.deletion_insertion, overrides, device, Path(tmp), recorder)
    units = recorder.unit_seconds()
    done, target = len(units), args.extrapolate_to or args.episodes
    if done == target:
        full, how = row["eval_s"], "measured"
    elif done >= 2:
        full = units[0] + statistics.fmean(units[1:]) * (target - 1)
        how = f"extrapolated from {done} episodes"
    else:
        full = units[0] * target
        how = "extrapolated from 1 episode"
    if done and not timed.each:
        raise RuntimeError(
            f"{done} episodes ran but no deletion/insertion call went through the "
            f"{args.deletion_insertion!r} route: the numbers would not be the ones named."
        )
    row.update(
        deletion_insertion=args.deletion_insertion,
        device_name=_device_name(device),
        torch=torch.__version__,
        queries=queries,
        unit_seconds=units,
        full_s=full,
        full_how=how,
        full_episodes=target,
        setup_s=recorder.eval_started_wall - started,
        di_s=sum(timed.each),
        di_each=timed.each,
        wall_s=time.monotonic() - started,
    )
    if args.throughput:
        batch = OmegaConf.select(compose_config([]), "metric.batch_size")
        row["throughput"] = _throughput(
            recorder.model, device, size, batch, iters=3 if args.smoke else 20
        )
    return row


def _device_name(device: torch.device) -> str:
    return device_name(device.type)


def table(rows: dict[str, dict]) -> str:
    """The Markdown table of the rows there are, with the torchcam ratio when both are."""
    lines = [
        "| deletion/insertion | device | precision | px | queries a class | episodes run "
        "| of | setup s | seconds run | seconds per episode (first, median of the rest) "
        "| full protocol episodes | full protocol evaluation s | how | deletion/insertion s "
        "| images through the model | bare forwards s | efficiency |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for kind in ("ours", "torchcam"):
        if kind not in rows:
            continue
        r = rows[kind]
        units = r["unit_seconds"]
        rest = f"{statistics.median(units[1:]):.2f}" if len(units) > 1 else "-"
        lines.append(
            f"| {kind} | {r['device_name']} | {r['amp']} | {r['px']} | {r['queries']} "
            f"| {r['units_done']} | {r['episodes']} | {r['setup_s']:.0f} | {r['eval_s']:.1f} "
            f"| {units[0]:.2f}, {rest} | {r['full_episodes']} | {r['full_s']:.0f} "
            f"| {r['full_how']} "
            f"| {r['di_s']:.1f} | {r['images']} | {r['bare_s']:.1f} "
            f"| **{r['bare_s'] / r['eval_s']:.3f}** |"
        )
    lines.append("")
    if "ours" in rows and "torchcam" in rows:
        lines += _ratio(rows["ours"], rows["torchcam"])
    for kind, r in rows.items():
        if "throughput" in r:
            t = r["throughput"]
            lines.append(
                f"- bare forward throughput ({kind} run's model, {r['px']} px, batch "
                f"metric.batch_size): fp32 {t['fp32']:.0f} images/s, bf16 {t['bf16']:.0f} "
                f"images/s ({t['bf16'] / t['fp32']:.2f}x)"
                + (
                    "; fp32 with PyTorch's defaults (cuDNN convolutions in TF32), bf16 "
                    "with channels_last"
                    if r.get("amp") == "bf16"
                    else ""
                )
            )
    lines += [
        "- setup s: from the start of the run to its first episode (the synthetic data, "
        "the model, the task-accuracy pass over every episode of the run), wall time.",
        "- full protocol evaluation s: measured only when every episode ran; otherwise the "
        "first episode plus the mean of the others times the episodes not run (say so "
        "when quoting); the setup is not in it.",
        "- efficiency = bare forwards / seconds run (1.0 = the run costs its forward passes).",
    ]
    return "\n".join(lines)


def _ratio(ours: dict, cam: dict) -> list[str]:
    """torchcam / ours on the episodes both runs reached (the first left out when more
    than one: it pays for warm-up)."""
    k = min(len(ours["di_each"]), len(cam["di_each"]), ours["units_done"], cam["units_done"])
    if k == 0:  # a run out of its budget before its first timed call (a loaded machine)
        return [
            "- torchcam / ours: no ratio, the two runs share no timed episode (raise --budget-s)"
        ]
    first = 1 if k > 1 else 0
    episodes = f"episodes {first + 1}-{k}" if k - first > 1 else f"episode {first + 1}"

    def mean(values: list[float]) -> float:
        return statistics.fmean(values[first:k])

    di = mean(cam["di_each"]) / mean(ours["di_each"])
    whole = mean(cam["unit_seconds"]) / mean(ours["unit_seconds"])
    return [
        f"- deletion/insertion, torchcam / ours: **{di:.2f}x** ({mean(cam['di_each']):.2f} s vs "
        f"{mean(ours['di_each']):.2f} s a call, one call an episode; {episodes}; "
        f"{ours['amp']} both)",
        f"- whole episode with torchcam's deletion/insertion / with ours: **{whole:.2f}x** "
        f"({episodes})",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--episodes", type=int, default=600, help="episodes of the run")
    parser.add_argument(
        "--extrapolate-to",
        type=int,
        help="episodes of the full protocol whose time is reported (default: --episodes)",
    )
    parser.add_argument("--queries", type=int, default=15, help="queries a class (protocol: 15)")
    parser.add_argument("--budget-s", type=float, required=True, help="wall seconds in all")
    parser.add_argument("--deletion-insertion", choices=["ours", "torchcam"], default="ours")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="32 px, one query a class")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device.", file=sys.stderr)
        return 2
    row = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"protocol-{args.device}.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[args.deletion_insertion] = row
    path.write_text(json.dumps(rows, indent=1))
    text = f"## protocol\n\n{table(rows)}\n"
    (args.out / f"protocol-{args.device}.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
