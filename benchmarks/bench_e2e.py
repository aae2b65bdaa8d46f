"""End to end: a whole run's evaluation against the bare forward passes it needs.

Two runs through :func:`experiments.pipeline.run`, exactly as ``run.py`` makes them:

- (a) the default experiment (``synthetic_5way``; its model trained once and cached under
  ``cache_dir``, as for a user);
- (b) the miniImageNet protocol on synthetic data: 84 px, Conv-4 pooled after all four
  blocks, 5-way 5-shot, ``--e2e-queries`` queries per class (15 in the protocol),
  600 images per class, all 11 methods and all metrics, ``--e2e-episodes`` episodes.
  The weights are a fixed random initialisation saved as a checkpoint: training does
  not change what an evaluation costs.

For each run the table reports:

- evaluation time: the evaluation of all units (every explainer and metric, the units'
  own prototype and prediction passes, shard writes), without data building, training,
  the task-accuracy pass, the merge and the figures;
- forward passes: every call of the model during the evaluation is counted (a forward
  pre-hook records its batch size); "images" is their total;
- bare time: the same calls (same batch sizes, same precision) replayed on random
  images under ``torch.no_grad`` in the same process: the limit the run cannot beat.
  Gradient CAMs also run a backward pass that the limit leaves out;
- efficiency = bare time / evaluation time (1.0 = the run costs its forward passes);
- peak memory (the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on
  CUDA) after the first unit and after the last: equal when memory does not grow with
  the number of episodes.

On CPU times are process CPU time (all threads), which other jobs on a shared machine
inflate less than wall time; on CUDA wall time between device syncs.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

import experiments.models as models
from benchmarks import sync
from experiments import builders, pipeline
from experiments.builders import device_for
from experiments.config import compose_config, load
from experiments.identity import resolve_amp

#: (episodes, queries per class) of (b) when the flags are not given
DEFAULTS = {
    ("cpu", False): (2, 1),
    ("cpu", True): (2, 1),
    ("cuda", False): (20, 15),
    ("cuda", True): (2, 2),
}
REPEATS = 10  # timed replays per distinct batch size, at most (median)


class EnoughUnits(Exception):
    """Raised by a recorder's ``after_unit`` to end a run early (the units done so far
    stay counted and timed); :func:`_run` reports what ran."""


class _Recorder:
    """Counts the model's forward calls while ``active``; times the evaluation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = False
        self.batches: list[int] = []
        self.model: nn.Module | None = None
        self.eval_seconds = 0.0
        self.eval_started = 0.0  # clock() when the evaluation began
        self.eval_started_wall = 0.0  # time.monotonic() then
        self.peaks: list[float] = []

    def hook(self, module: nn.Module, args) -> None:
        if self.active:
            self.batches.append(int(args[0].shape[0]))

    def clock(self) -> float:
        sync(self.device)
        return time.perf_counter() if self.device.type == "cuda" else time.process_time()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def after_unit(self, unit: int) -> None:
        self.peaks.append(self.peak_mib())


@contextmanager
def _instrumented(recorder: _Recorder):
    """Patch the pipeline so the run reports its model, forward calls and evaluation time."""
    build_model, launch = builders.build_model, pipeline.launch

    def counted_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(recorder.hook)
        recorder.model = model
        return model

    def timed_launch(*args, **kwargs):
        if recorder.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(recorder.device)
        recorder.active = True
        start = recorder.eval_started = recorder.clock()
        recorder.eval_started_wall = time.monotonic()
        try:
            return launch(*args, **kwargs)
        finally:
            recorder.eval_seconds = recorder.clock() - start
            recorder.active = False

    builders.build_model, pipeline.launch = counted_model, timed_launch
    try:
        yield
    finally:
        builders.build_model, pipeline.launch = build_model, launch


def _bare_seconds(recorder: _Recorder, image_size: int, amp: bool) -> float:
    """Time of the recorded forward calls replayed bare (median of REPEATS per size)."""
    model, device = recorder.model, recorder.device
    channels_last = amp and device.type == "cuda"
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()
    )
    total = 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    model.eval()
    for batch, count in sorted(Counter(recorder.batches).items()):
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast:
            model(x)  # warm-up
            times = []
            for _ in range(min(count, REPEATS)):
                start = recorder.clock()
                model(x)
                times.append(recorder.clock() - start)
        total += statistics.median(times) * count
    return total


def _run(
    name: str,
    overrides: list[str],
    device: torch.device,
    out: Path,
    recorder: _Recorder | None = None,
) -> dict:
    """One run through the pipeline, instrumented; its row of the table. A ``recorder``
    whose ``after_unit`` raises :class:`EnoughUnits` ends the run after that unit:
    ``units_done`` then says how many of the ``episodes`` ran."""
    cfg = compose_config(overrides)
    run_cfg = load(cfg)
    recorder = recorder or _Recorder(device)
    with _instrumented(recorder):
        try:
            pipeline.run(cfg, out / name, after_unit=recorder.after_unit)
        except EnoughUnits:
            pass
    amp = resolve_amp(run_cfg.metric.amp, device_for(run_cfg.trainer.accelerator))
    bare = _bare_seconds(recorder, run_cfg.data.image_size, amp)
    n_queries = run_cfg.eval.n_way * run_cfg.eval.n_query
    return {
        "run": name,
        "episodes": run_cfg.eval.num_episodes,
        "units_done": len(recorder.peaks),
        "explained": len(recorder.peaks) * n_queries,
        "methods": len(run_cfg.methods),
        "px": run_cfg.data.image_size,
        "amp": "bf16" if amp else "fp32",
        "eval_s": recorder.eval_seconds,
        "calls": len(recorder.batches),
        "images": sum(recorder.batches),
        "bare_s": bare,
        "peaks": recorder.peaks,
    }


def _random_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = models.build_model("conv4", hidden=64, pools=[True, True, True, True], pooling="gap")
    torch.save(net.state_dict(), path)
    return path


def protocol_overrides(
    checkpoint: Path, episodes: int, queries: int, image_size: int = 84
) -> list[str]:
    """The miniImageNet protocol on synthetic data (module docstring, run (b))."""
    return [
        "name=miniimagenet_protocol_synthetic",
        "data=synthetic",
        f"data.image_size={image_size}",
        "data.options.images_per_class=600",
        "model=conv4",
        f"model.checkpoint={checkpoint}",
        "task=fewshot",
        "eval.n_way=5",
        "eval.n_shot=5",
        f"eval.n_query={queries}",
        f"eval.num_episodes={episodes}",
    ]


def _child(name: str, overrides: list[str], device: str) -> dict:
    """Run one configuration in a fresh process, so that its peak RSS is its own."""
    command = [sys.executable, "-m", "benchmarks.bench_e2e", name, device, json.dumps(overrides)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_e2e {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> str:
    """Run (a) and (b), each in its own process, and return the Markdown table."""
    device = torch.device(args.device)
    episodes, queries = DEFAULTS[(device.type, bool(args.quick))]
    episodes = getattr(args, "e2e_episodes", None) or episodes
    queries = getattr(args, "e2e_queries", None) or queries
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    common = ["eval.progress=false", f"trainer.accelerator={accelerator}"]
    default = [*common, *(["eval.num_episodes=2"] if args.quick else [])]
    with tempfile.TemporaryDirectory(prefix="bench_e2e-") as tmp:
        checkpoint = _random_checkpoint(Path(tmp) / "conv4_84.pt")
        protocol = [*common, *protocol_overrides(checkpoint, episodes, queries)]
        rows = [
            _child("(a) default", default, args.device),
            _child("(b) miniImageNet", protocol, args.device),
        ]
    return _table(rows, device, queries)


def _table(rows: list[dict], device: torch.device, queries: int) -> str:
    memory = "peak RSS" if device.type == "cpu" else "peak allocated"
    lines = [
        f"| run | episodes | samples x methods | px | precision | evaluation s | forward calls "
        f"| images through the model | bare forwards s | efficiency | {memory} MiB after "
        f"unit 1 | {memory} MiB after the last unit |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['episodes']} | {r['explained']} x {r['methods']} | {r['px']} "
            f"| {r['amp']} | {r['eval_s']:.1f} | {r['calls']} | {r['images']} "
            f"| {r['bare_s']:.1f} | **{r['bare_s'] / r['eval_s']:.3f}** "
            f"| {r['peaks'][0]:.0f} | {r['peaks'][-1]:.0f} |"
        )
    b = rows[-1]
    lines += [
        "",
        f"- (b) is 5-way 5-shot with {queries} queries per class "
        f"({'the protocol' if queries == 15 else 'the protocol has 15'}); "
        f"{b['images'] / max(b['explained'], 1):.0f} images through the model per explained "
        "query (11 methods, deletion + insertion at step = image width, Average Drop).",
        "- efficiency = bare forwards / evaluation: the share of the run spent in the forward "
        "passes the protocol needs.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # one child run: NAME DEVICE OVERRIDES_JSON -> a JSON row
    name, device, overrides = sys.argv[1], torch.device(sys.argv[2]), json.loads(sys.argv[3])
    with tempfile.TemporaryDirectory(prefix="bench_e2e-run-") as tmp:
        print(json.dumps(_run(name, overrides, device, Path(tmp))))
