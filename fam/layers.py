"""Target-layer resolution and activation capture with hooks that always clean up."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.tokens import FeatureLayout, token_default_layer


def resolve_target_layer(model: nn.Module, target_layer: str | nn.Module | None) -> nn.Module:
    """Return the module named by ``target_layer`` (dotted name or the module itself).

    ``None`` uses ``model.default_target_layer`` (the suite's models name theirs), or for
    a ViT its last block (:func:`fam.tokens.token_default_layer`).
    """
    if target_layer is None:
        target_layer = getattr(model, "default_target_layer", None) or token_default_layer(model)
        if target_layer is None:
            raise FamBenchError(
                f"No target layer given and {type(model).__name__} has no "
                "`default_target_layer`. Pass target_layer='<dotted module name>' "
                "(for a torchvision ResNet, 'layer4')."
            )
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in model.modules()):
            raise FamBenchError(
                f"The target layer module ({type(target_layer).__name__}) is not part of the "
                "model; pass a module of this model or its dotted name."
            )
        return target_layer
    if not isinstance(target_layer, str):
        raise FamBenchError(
            f"target_layer must be a dotted module name or an nn.Module, got "
            f"{type(target_layer).__name__}."
        )
    names = dict(model.named_modules())
    if target_layer not in names or target_layer == "":
        close = difflib.get_close_matches(target_layer, [n for n in names if n], n=5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise FamBenchError(
            f"Target layer {target_layer!r} is not a module of {type(model).__name__}.{hint} "
            "Names are dotted paths as in model.named_modules(), e.g. 'layer4' or 'encoder.3'."
        )
    return names[target_layer]


@dataclass
class Capture:
    """What one hooked forward pass saw at the target layer.

    ``activations``: ``(N, K, h, w)`` output of the target layer read through ``layout``
    (a leaf that requires grad when gradients were asked for; a token layer's patch
    tokens). ``replace``: optional function applied to that feature map before the rest
    of the network sees it (used by ablation paths).
    """

    gradients_wanted: bool = False
    replace: object = None
    keep_activations: bool = True
    layout: FeatureLayout | None = None
    ran: bool = False
    activations: Tensor | None = None
    handles: list = field(default_factory=list)


def _hook(capture: Capture):
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise FamBenchError(
                f"The target layer ({type(module).__name__}) returns "
                f"{type(output).__name__}, not a tensor; choose a layer whose output is a "
                "feature map (N, K, h, w) or tokens (N, T, C)."
            )
        capture.ran = True
        layout = capture.layout
        if not capture.gradients_wanted and capture.replace is None:
            if capture.keep_activations:
                # A copy: an in-place op after the layer (ReLU(inplace=True) after a
                # BatchNorm) would otherwise overwrite the captured activations.
                acts = output if layout is None else layout.to_map(output)
                capture.activations = acts.detach().clone()
            return None
        base = output
        if capture.gradients_wanted:
            # A fresh leaf: gradients stop here, so parameters' .grad are never touched
            # and in-place ops downstream act on the clone, not on the captured values.
            # Recording resumes here if the layers before ran without a graph.
            torch.set_grad_enabled(True)
            base = output.detach()
            acts = base if layout is None else layout.to_map(base)
            leaf = acts.detach().requires_grad_(True)
            capture.activations = leaf
            new = leaf.clone()
        else:
            new = output if layout is None else layout.to_map(output)
            if capture.keep_activations:
                capture.activations = new.detach().clone()
        if capture.replace is not None:
            new = capture.replace(new)
        out = new if layout is None else layout.to_output(new, base)
        return out if (out is not output) else None

    return hook


@contextmanager
def capture_layer(
    layer: nn.Module,
    gradients: bool = False,
    replace=None,
    model: nn.Module | None = None,
    keep_activations: bool = True,
    layout: FeatureLayout | None = None,
) -> Iterator[Capture]:
    """Hook ``layer`` for the duration of the block; the hooks are removed on exit.

    ``keep_activations=False`` (only without gradients) records that the layer ran but
    keeps no copy of its output, for passes that only need the model's output.

    ``layout`` reads the layer's output as a feature map (:class:`fam.tokens.FeatureLayout`:
    a token layer's patch tokens on the model's grid); by default the model's own when
    ``model`` is given, else the output as it is.

    With ``gradients=True`` and the enclosing ``model`` given, the layers before the target
    layer run without recording an autograd graph (gradients stop at the target layer
    anyway), which saves their activation memory and the recording time.
    """
    if layout is None and model is not None:
        layout = FeatureLayout(model)
    capture = Capture(
        gradients_wanted=gradients,
        replace=replace,
        keep_activations=keep_activations,
        layout=layout,
    )
    handles = [layer.register_forward_hook(_hook(capture))]
    grad_enabled = torch.is_grad_enabled()
    if gradients and model is not None and model is not layer:
        handles.append(model.register_forward_pre_hook(_no_grad_until_layer))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_enabled)


def _no_grad_until_layer(module: nn.Module, inputs: tuple) -> None:
    torch.set_grad_enabled(False)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None
