"""Model-parameter randomisation test (Adebayo et al., Sanity Checks for Saliency Maps,
NeurIPS 2018), cascading from the top layer down.

A deep copy of the model is re-initialised one layer at a time from the output towards
the input (``reset_parameters`` of the layer and all its submodules, under a fixed seed;
the caller's model is never modified). After each step the images are explained again
with a fresh explainer from ``make_explainer(randomised_model)`` and each map is compared
with the trained model's map by Spearman rank correlation (ties get average ranks, as in
``scipy.stats.spearmanr``), of the maps and of their absolute values. A method whose
correlation stays near 1 explains the input, not the model.

The reference: pass a tensor to keep the reference embeddings fixed across the
cascade, or a callable ``model -> (N, D)`` to recompute them with each randomised model.
Recompute when the reference is itself an output of the model (a ProtoNet prototype from
support images, the other SimCLR view, a retrieved gallery image): it plays the role of
the class in Adebayo et al., whose logit is read from the randomised network too, and a
fixed reference from the trained model would compare embeddings from two different
networks. Keep it fixed only when it is external to the model.

Default cascade (``layers=None``): starting at the model, descend while a module has a
single child holding parameters; then take the parameterised children of that module,
expanding ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` containers one level
(Conv-4: ``encoder.3 ... encoder.0``; torchvision ResNet: ``fc``, ``layer4.1``,
``layer4.0``, ..., ``bn1``, ``conv1``), in reverse registration order, which is taken to
be the forward order. Pass ``layers`` (names, output first) for any other order.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from fam.errors import FamBenchError
from fam.layers import eval_mode, model_device
from fam.similarity import SimilarityLike

ExplainerFactory = Callable[[nn.Module], Callable[..., Tensor]]
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class SanityResult:
    """Rank correlations with the trained model's maps after each cascade step.

    Attributes:
        layers: the layer re-initialised at each step, output first; step ``l`` has layers
            ``0..l`` randomised.
        spearman: ``(L, N)`` Spearman correlation of the maps (``nan`` for a constant map).
        spearman_abs: ``(L, N)`` the same for absolute values (differs for signed maps).
    """

    layers: list[str]
    spearman: Tensor
    spearman_abs: Tensor

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (step, sample) with columns ``step, layer, sample,
        spearman, spearman_abs``."""
        n_layers, n = self.spearman.shape
        return pd.DataFrame(
            {
                "step": [s + 1 for s in range(n_layers) for _ in range(n)],
                "layer": [name for name in self.layers for _ in range(n)],
                "sample": list(range(n)) * n_layers,
                "spearman": self.spearman.flatten().cpu().double().numpy(),
                "spearman_abs": self.spearman_abs.flatten().cpu().double().numpy(),
            }
        )


def average_ranks(values: Tensor) -> Tensor:
    """Ranks along the last dim, ties averaged (0-based): ``(N, P) -> (N, P)`` float64."""
    sorted_values, order = torch.sort(values.double(), dim=-1)
    p = values.shape[-1]
    positions = torch.arange(p, device=values.device).expand_as(order)
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    end_run = torch.ones_like(new_run)
    end_run[:, :-1] = new_run[:, 1:]
    # First position of each element's run (running max of run starts) and its last
    # position (running min of run ends, from the right).
    first = torch.where(new_run, positions, 0).cummax(dim=-1).values
    last = torch.where(end_run, positions, p).flip(-1).cummin(dim=-1).values.flip(-1)
    mean_rank = (first + last).double() / 2
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman correlation of ``(N, ...)`` tensors: ``(N,)`` (``nan`` if constant,
    or if either row has a nan or inf: a sort would otherwise rank nan as a value)."""
    a, b = a.flatten(1), b.flatten(1)
    finite = torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1)
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(finite, (ra * rb).sum(1) / denom, torch.nan).float()


def default_cascade(model: nn.Module) -> list[str]:
    """Layer names for the cascade, output first (module docstring)."""

    def parameterised(module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (name, child)
            for name, child in module.named_children()
            if any(True for _ in child.parameters())
        ]

    prefix, node = "", model
    children = parameterised(node)
    while len(children) == 1 and not isinstance(children[0][1], _CONTAINERS):
        name, node = children[0]
        prefix = f"{prefix}{name}."
        children = parameterised(node)
    layers: list[str] = []
    for name, child in children:
        if isinstance(child, _CONTAINERS):
            layers += [f"{prefix}{name}.{sub}" for sub, _ in parameterised(child)]
        else:
            layers.append(f"{prefix}{name}")
    if not layers:
        raise FamBenchError(
            f"{type(model).__name__} has no parameters to randomise; the sanity check needs "
            "a model with learned parameters."
        )
    return layers[::-1]


@contextlib.contextmanager
def seeded_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """The global RNG (and the model's CUDA device's) seeded with ``seed`` inside, restored
    after: a re-initialisation that neither depends on nor moves the caller's stream."""
    device = model_device(model)
    fork_devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        yield


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every module re-initialised under ``seed`` (the same
    architecture with random weights); ``model`` is left as it was."""
    copy_ = copy.deepcopy(model)
    with seeded_rng(model, seed), torch.no_grad():
        reinitialise(copy_, "model")
    return copy_


def reinitialise(layer: nn.Module, name: str) -> None:
    """``reset_parameters()`` of ``layer`` and every submodule (in place, from the global
    RNG); an error naming the first parameterised module that has none."""
    for sub_name, module in layer.named_modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        elif any(True for _ in module.parameters(recurse=False)):
            full = f"{name}.{sub_name}" if sub_name else name
            raise FamBenchError(
                f"Module {full!r} ({type(module).__name__}) has parameters but no "
                "reset_parameters(), so it cannot be re-initialised; give it one or pass "
                "layers=[...] that exclude it."
            )


def randomisation_sanity(
    model: nn.Module,
    make_explainer: ExplainerFactory,
    images: Tensor,
    reference: Tensor | Callable[[nn.Module], Tensor],
    similarity: SimilarityLike = "cosine",
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> SanityResult:
    """Cascading model-parameter randomisation (module docstring).

    Args:
        model: the trained model; left untouched (a deep copy is randomised).
        make_explainer: ``model -> explainer``, e.g. ``functools.partial(FAM,
            target_layer="encoder.3")``; the explainer is called as
            ``explainer(images, reference, similarity)`` and returns maps ``(N, H, W)``.
            Name the target layer by string so it resolves in the copy.
        images: ``(N, C, H, W)`` on the model's device.
        reference: ``(N, D)`` fixed reference embeddings, or ``model -> (N, D)`` to
            recompute them with each randomised model.
        similarity: passed to the explainer.
        layers: module names to re-initialise, output first (default: module docstring).
        seed: seed of the re-initialisation (the caller's RNG state is left as it was).
    """
    names = dict(model.named_modules())
    layers = list(layers) if layers is not None else default_cascade(model)
    unknown = [name for name in layers if name not in names or name == ""]
    if unknown:
        raise FamBenchError(
            f"Unknown layers {unknown} for the randomisation cascade; use dotted names from "
            "model.named_modules(), output layer first."
        )

    def explain(net: nn.Module) -> Tensor:
        # Eval mode: a BatchNorm in train mode would update the caller's running statistics.
        with torch.no_grad(), eval_mode(net):
            ref = reference(net) if callable(reference) else reference
        return make_explainer(net)(images, ref, similarity).detach()

    trained_maps = explain(model)
    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    correlations, abs_correlations = [], []
    with seeded_rng(model, seed):
        for name in layers:
            with torch.no_grad():
                reinitialise(modules[name], name)
            maps = explain(randomised)
            correlations.append(spearman(trained_maps, maps))
            abs_correlations.append(spearman(trained_maps.abs(), maps.abs()))
    return SanityResult(
        layers=layers,
        spearman=torch.stack(correlations),
        spearman_abs=torch.stack(abs_correlations),
    )
