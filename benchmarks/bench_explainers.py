"""Explainer speed: every method against one plain forward pass and against pytorch-grad-cam.

One run, random weights, eval mode, the same images and per-sample reference embeddings
for every method (cosine similarity): a Conv-4 at 84 px (target ``encoder.3``, 5x5 map)
and a torchvision ResNet-18 without ``fc`` at 224 px (target ``layer4``, 7x7 map), batch
64. For each method the table gives the time per image of the full call (maps upsampled
and scaled, as a user gets them), its ratio to one plain forward pass of the same batch
under the same precision (``x forward``) and, for the methods pytorch-grad-cam has, the
ratio of its time (full call with one target callable per sample) to ours.

Every time is the median of a few repeats after a warm-up (on CUDA one call of each
timed function, on CPU one forward pass per model), with ``torch.cuda.synchronize``
around each on CUDA. The forward pass, our method and pytorch-grad-cam are timed in
interleaved rounds, so that load changes on a shared machine hit all three alike. On
CUDA the methods that take ``amp`` run under bf16 autocast with channels_last inputs
(column ``amp``); pytorch-grad-cam runs in fp32.

Score-CAM costs ``K`` forward passes per image (``K`` = 64 / 512 channels), so it is
timed on fewer images (column ``images``; its per-image time scales linearly with the
number of images) and, on CPU, timed once.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator

import pytorch_grad_cam as pgc
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

import baselines as bl
from benchmarks import sync
from experiments.models.conv4 import Conv4
from fam import FAM, resolve_target_layer
from fam.similarity import cosine

# (batch, conv4 px, resnet px, repeats, Score-CAM images: conv4, resnet)
SETTINGS = {
    ("cpu", False): (64, 84, 224, 3, 4, 1),
    ("cpu", True): (8, 32, 64, 3, 2, 1),
    ("cuda", False): (64, 84, 224, 5, 64, 8),
    ("cuda", True): (8, 32, 64, 2, 2, 1),
}
#: our methods: (name, factory(model, layer, amp), pytorch-grad-cam class or None)
METHODS: list[tuple[str, Callable, type | None]] = [
    ("fam", lambda m, layer, amp: FAM(m, layer, amp=amp), None),
    (
        "fam_ablation",
        lambda m, layer, amp: FAM(m, layer, contribution="ablation", weights="abs_sum", amp=amp),
        None,
    ),
    ("gradcam", lambda m, layer, amp: bl.GradCAM(m, layer, amp=amp), pgc.GradCAM),
    ("gradcampp", lambda m, layer, amp: bl.GradCAMPlusPlus(m, layer, amp=amp), pgc.GradCAMPlusPlus),
    ("xgradcam", lambda m, layer, amp: bl.XGradCAM(m, layer, amp=amp), pgc.XGradCAM),
    ("layercam", lambda m, layer, amp: bl.LayerCAM(m, layer, amp=amp), pgc.LayerCAM),
    (
        "scorecam",
        lambda m, layer, amp: bl.ScoreCAM(m, layer, score="similarity", batch_size=64, amp=amp),
        pgc.ScoreCAM,
    ),
    ("relevancecam", lambda m, layer, amp: bl.RelevanceCAM(m, layer), None),
    ("eigencam", lambda m, layer, amp: bl.EigenCAM(m, layer, amp=amp), pgc.EigenCAM),
    ("random", lambda m, layer, amp: bl.RandomMap(m, layer), None),
    ("center", lambda m, layer, amp: bl.CenterMap(m, layer), None),
]
#: methods without an ``amp`` option (run in fp32 everywhere)
FP32_ONLY = {"relevancecam", "random", "center"}


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: bool = True
) -> dict[str, float]:
    """Median seconds per function, timed in interleaved rounds.

    Each round times every function once, back to back, so a change in machine load
    hits all of them alike and the ratios stay meaningful on a shared machine.
    """
    if warmup:
        for fn in fns.values():
            fn()  # kernels, allocator, cudnn autotuning
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _models(conv4_px: int, resnet_px: int) -> list[tuple[str, nn.Module, str, int]]:
    torch.manual_seed(0)
    resnet = resnet18(weights=None)
    resnet.fc = nn.Identity()
    return [("Conv-4", Conv4(), "encoder.3", conv4_px), ("ResNet-18", resnet, "layer4", resnet_px)]


def _forward(model: nn.Module, images: Tensor, amp: bool) -> Callable[[], Tensor]:
    def run() -> Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        x = images.contiguous(memory_format=torch.channels_last) if amp else images
        with torch.no_grad(), autocast:
            return model(x)

    return run


@contextlib.contextmanager
def _grad_cam(
    cam_cls: type | None, model: nn.Module, layer: str, images: Tensor, reference: Tensor
) -> Iterator[Callable[[], object] | None]:
    """pytorch-grad-cam's full call with one cosine target per sample (hooks released)."""
    if cam_cls is None:
        yield None
        return
    targets = [lambda row, r=r: cosine(row[None], r[None])[0] for r in reference]
    cam = cam_cls(model=model, target_layers=[resolve_target_layer(model, layer)])
    cam.batch_size = 64

    def run() -> object:
        # Score-CAM prints a tqdm bar per image; keep the benchmark's output clean.
        with contextlib.redirect_stderr(io.StringIO()):
            return cam(images, targets)

    try:
        yield run
    finally:
        cam.activations_and_grads.release()


def main(args) -> str:
    """Run the benchmark and return a Markdown table (see the module docstring)."""
    device = torch.device(args.device)
    batch, conv4_px, resnet_px, repeats, score_conv4, score_resnet = SETTINGS[
        (device.type, bool(args.quick))
    ]
    use_amp = device.type == "cuda"
    rows = [
        "| model | method | images | amp | ms / image | forward ms / image | x forward "
        "| grad-cam ms / image | grad-cam / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for model_name, model, layer, px in _models(conv4_px, resnet_px):
        model = model.to(device).eval()
        gen = torch.Generator(device="cpu").manual_seed(0)
        all_images = torch.randn(batch, 3, px, px, generator=gen).to(device)
        with torch.no_grad():
            all_reference = model(torch.randn(batch, 3, px, px, generator=gen).to(device))
        # On CPU one warm-up forward per model is enough (no autotuning); on CUDA every
        # method is warmed up (kernels, cudnn autotuning, bf16 casts).
        _forward(model, all_images, False)()
        warmup = device.type == "cuda"
        for name, build, ref_cls in METHODS:
            n, reps = batch, repeats
            if name == "scorecam":
                n = min(batch, score_conv4 if model_name == "Conv-4" else score_resnet)
                if device.type == "cpu":
                    reps = 1  # K batched forwards per image already
            images, reference = all_images[:n], all_reference[:n]
            amp = use_amp and name not in FP32_ONLY
            explainer = build(model, layer, amp)
            fns = {
                # One forward of the full batch under the same precision as the method.
                "forward": _forward(model, all_images, amp),
                "ours": lambda e=explainer, x=images, r=reference: e(x, r, "cosine"),
            }
            with _grad_cam(ref_cls, model, layer, images, reference) as theirs_fn:
                if theirs_fn is not None:
                    fns["theirs"] = theirs_fn
                t = _interleaved_medians(fns, device, reps, warmup)
            ratio = (t["ours"] / n) / (t["forward"] / batch)
            theirs = speedup = ""
            if "theirs" in t:
                theirs = f"{1e3 * t['theirs'] / n:.2f}"
                speedup = f"{t['theirs'] / t['ours']:.1f}x"
                if name == "gradcam" and device.type == "cpu":
                    notes.append(
                        f"{model_name}: Grad-CAM {t['theirs'] / t['ours']:.1f}x "
                        "faster than pytorch-grad-cam (target >= 2x)."
                    )
            if name == "fam":
                notes.append(f"{model_name}: FAM costs {ratio:.2f} forward passes (target <= 1.3).")
            rows.append(
                f"| {model_name} {px}px | {name} | {n} | {'bf16' if amp else 'no'} | "
                f"{1e3 * t['ours'] / n:.2f} | {1e3 * t['forward'] / batch:.2f} | "
                f"{ratio:.2f} | {theirs} | {speedup} |"
            )
        model.cpu()
    return "\n".join(rows + [""] + [f"- {note}" for note in notes])
