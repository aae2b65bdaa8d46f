"""Token models (ViT and the like): a target layer's ``(N, T, C)`` tokens as a feature map.

CAM-style methods need a feature map ``A (N, K, h, w)``. A transformer block returns
tokens ``(N, T, C)``: ``p`` prefix tokens (the class token and any register tokens) and
``h*w`` patch tokens in row-major order. :class:`FeatureLayout` turns the layer's output
into ``A`` (prefix tokens dropped, ``K = C``) and a possibly modified ``A`` back into the
layer's output (prefix tokens untouched), so gradients, LRP relevance and channel
ablation all act on the patch tokens while the rest of the network runs as usual.

- ``p`` is the model's ``num_prefix_tokens`` (timm's ``VisionTransformer``: class token
  plus registers), else ``1`` when the model has a ``cls_token`` and ``0`` otherwise;
- ``h x w`` is the model's patch grid: ``patch_embed.grid_size`` (timm), or ``patch_grid``
  set on the model; a square ``sqrt(T - p)`` when neither fits the token count (another
  input size);
- a 4-D output is read as ``(N, K, h, w)``, or as ``(N, h, w, K)`` when the model says
  ``output_fmt == "NHWC"`` (timm's Swin);
- anything else (a model with another token order or layout) takes a
  callable ``reshape(output) -> (N, K, h, w)`` (``model.reshape`` in a run config,
  ``model.reshape_transform`` on the module in Python), as pytorch-grad-cam's
  ``reshape_transform``. It must rearrange entries (select, permute, reshape), never mix
  them: the way back is its adjoint (``reshape``'s vector-Jacobian product), checked to
  invert it on the first call.

This is pytorch-grad-cam's ViT ``reshape_transform`` (drop the class token, reshape to the
grid, channels first), with the grid and prefix read from the model instead of fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fam.errors import FamBenchError

Reshape = Callable[[Tensor], Tensor]

#: the attribute a module carries its reshape callable under
RESHAPE_ATTRIBUTE = "reshape_transform"


def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` looks like a ViT: a ``patch_embed`` and a ``blocks`` sequence."""
    blocks = getattr(model, "blocks", None)
    return (
        isinstance(getattr(model, "patch_embed", None), nn.Module)
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
    )


def token_default_layer(model: nn.Module) -> str | None:
    """The default target layer of a ViT (``None`` for other models).

    The last block's output, ``blocks.<L-1>``, when the embedding pools the patch tokens.
    When it is the class token (timm's ``global_pool="token"``), the patch tokens of the
    last block's output never reach it (only a per-token norm follows), so every map
    there would be zero: the default is then the last block's first norm,
    ``blocks.<L-1>.norm1`` (the input its attention mixes into the class token; the layer
    pytorch-grad-cam's ViT tutorial explains).
    """
    if not is_token_model(model):
        return None
    last = f"blocks.{len(model.blocks) - 1}"
    class_token = getattr(model, "global_pool", None) == "token"
    if class_token and isinstance(getattr(model.blocks[-1], "norm1", None), nn.Module):
        return f"{last}.norm1"
    return last


def prefix_tokens(model: nn.Module) -> int:
    """Class and register tokens before the patch tokens."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    return 1 if getattr(model, "cls_token", None) is not None else 0


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The model's patch grid ``(h, w)``, if it names one."""
    grid = getattr(model, "patch_grid", None)
    if grid is None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return None
    h, w = (int(g) for g in grid)
    return h, w


class FeatureLayout:
    """How a target layer's output becomes ``A (N, K, h, w)`` and back (module docstring).

    Args:
        model: the explained model (its patch grid, prefix tokens and
            ``reshape_transform`` are read from it).
        reshape: a callable for layouts the model does not describe; ``None`` uses the
            model's ``reshape_transform`` attribute, else the automatic rule.
    """

    def __init__(self, model: nn.Module, reshape: Reshape | None = None) -> None:
        if reshape is None:
            reshape = getattr(model, RESHAPE_ATTRIBUTE, None)
        if reshape is not None and not callable(reshape):
            raise FamBenchError(
                f"model.reshape must name a callable (N, T, C) -> (N, K, h, w), got "
                f"{type(reshape).__name__}."
            )
        self.reshape = reshape
        self.model_name = type(model).__name__
        self.prefix = prefix_tokens(model)
        self.grid = patch_grid(model)
        # timm's Swin and other hierarchical token models say so: (N, h, w, C) stages
        self.channels_last = getattr(model, "output_fmt", None) == "NHWC"
        self._adjoint_checked = False

    def to_map(self, output: Tensor) -> Tensor:
        """The layer's output as ``(N, K, h, w)`` (a view or a new tensor)."""
        if self.reshape is not None:
            return self._checked_map(self.reshape(output), output)
        if output.dim() == 4:
            return output.permute(0, 3, 1, 2) if self.channels_last else output
        if output.dim() != 3:
            raise FamBenchError(self._unknown(output, "it is neither a feature map nor tokens"))
        h, w = self._grid(output)
        patches = output[:, self.prefix :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)

    def to_output(self, new_map: Tensor, output: Tensor) -> Tensor:
        """``output`` with its feature map replaced by ``new_map`` (differentiable in it)."""
        if self.reshape is not None:
            return output + self._adjoint(new_map - self.reshape(output), output)
        if output.dim() == 4:
            return new_map.permute(0, 2, 3, 1) if self.channels_last else new_map
        tokens = new_map.flatten(2).transpose(1, 2).to(output.dtype)
        return torch.cat([output[:, : self.prefix], tokens], dim=1)

    def _grid(self, output: Tensor) -> tuple[int, int]:
        patches = output.shape[1] - self.prefix
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            return side, side
        grid = f"its patch grid {self.grid}" if self.grid else "no patch grid"
        raise FamBenchError(
            self._unknown(
                output,
                f"{output.shape[1]} tokens less {self.prefix} prefix token(s) are not "
                f"{grid} nor a square",
            )
        )

    def _unknown(self, output: Tensor, why: str) -> str:
        return (
            f"The target layer of {self.model_name} returns {tuple(output.shape)}; {why}, so "
            "it cannot be read as a feature map (N, K, h, w). Choose a convolutional layer or "
            "a transformer block (model.target_layer), or name a callable that reshapes the "
            "output: model.reshape=<dotted path> (Python: model.reshape_transform = fn)."
        )

    def _checked_map(self, acts: Tensor, output: Tensor) -> Tensor:
        if not isinstance(acts, Tensor) or acts.dim() != 4 or acts.shape[0] != output.shape[0]:
            shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise FamBenchError(
                f"model.reshape returned {shape} for a layer output {tuple(output.shape)}; it "
                "must return a feature map (N, K, h, w)."
            )
        return acts

    def _adjoint(self, delta: Tensor, output: Tensor) -> Tensor:
        """``reshape``'s adjoint applied to ``delta`` (differentiable in ``delta``)."""
        with torch.enable_grad():
            probe = output.detach().requires_grad_(True)
            image = self.reshape(probe)
            (back,) = torch.autograd.grad(image, probe, grad_outputs=delta, create_graph=True)
            if not self._adjoint_checked:
                # A rearrangement maps back what it selected: reshape(adjoint(a)) == a.
                acts = image.detach()
                again = self.reshape(
                    torch.autograd.grad(image, probe, grad_outputs=acts, retain_graph=True)[0]
                )
                if not torch.allclose(again.float(), acts.float(), rtol=1e-4, atol=1e-6):
                    raise FamBenchError(
                        "model.reshape must only rearrange the layer's output (select, "
                        "permute, reshape entries), not combine them: the suite maps a "
                        "changed feature map back through it, which is exact only then."
                    )
                self._adjoint_checked = True
        return back
