"""Token models: a ViT's (N, T, C) tokens are explained as (N, C, h, w) patch maps.

The ViT here is defined in the test with timm's attribute names (``patch_embed.grid_size``,
``cls_token``, ``reg_token``, ``num_prefix_tokens``, ``blocks``, ``norm``, ``global_pool``),
so nothing is downloaded and timm is not needed.
"""

from __future__ import annotations

import pytest
import torch
from test_explainer_contract import METHODS
from torch import nn

from baselines import GradCAM
from fam import FAM, resolve_target_layer
from fam.errors import FamBenchError
from fam.similarity import SimilarityTarget
from fam.tokens import FeatureLayout

SIZE, PATCH, DIM, REGISTERS = 24, 4, 16, 2
GRID = SIZE // PATCH


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.grid_size = (GRID, GRID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention: one input, ``qkv`` and ``proj`` linear layers, 2 heads."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's VisionTransformer layout: class token, registers, blocks, final norm, pooling."""

    def __init__(self, global_pool: str = "avg", depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.5)
        self.reg_token = nn.Parameter(torch.randn(1, REGISTERS, DIM) * 0.5)
        self.num_prefix_tokens = 1 + REGISTERS
        self.pos_embed = nn.Parameter(torch.randn(1, GRID * GRID, DIM) * 0.5)
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
        self.norm = nn.LayerNorm(DIM)
        self.global_pool = global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        n = x.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), self.reg_token.expand(n, -1, -1), x], 1)
        x = self.norm(self.blocks(x))
        if self.global_pool == "token":
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(1)


def _vit(global_pool: str = "avg") -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(global_pool).eval()


def _inputs(model: nn.Module, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    with torch.no_grad():
        reference = model(torch.randn(n, 3, SIZE, SIZE, generator=gen))
    return images, reference


@pytest.mark.parametrize("global_pool", ["avg", "token"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_maps_the_patch_grid_of_a_vit(method, global_pool):
    model = _vit(global_pool)
    images, reference = _inputs(model)
    layer = None
    if method == "fam_product":
        # the product split needs the embedding to pool the layer: the mean-token norm
        if global_pool == "token":
            with pytest.raises(FamBenchError, match="contribution='ablation'"):
                METHODS[method](model, None)(images, reference)
            return
        layer = "norm"
    explainer = METHODS[method](model, layer)
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[:, 4:12, 8:20] = True
    extra = {"masks": masks} if method == "mask" else {}
    raw = explainer(images, reference, "cosine", upsample=False, **extra)
    assert raw.shape == (3, GRID, GRID)
    maps = explainer(images, reference, "cosine", **extra)
    assert maps.shape == (3, SIZE, SIZE)
    assert bool(torch.isfinite(maps).all())
    if method not in ("random", "center", "mask", "constant"):  # constant: by design
        # the maps depend on the image: not constant (every patch token reaches the score)
        assert not bool(explainer.degenerate.any()), method


def test_default_target_layer_of_a_vit_is_its_last_block():
    model = _vit("avg")
    assert resolve_target_layer(model, None) is model.blocks[1]
    # a class-token embedding never sees the last block's patch tokens: its first norm
    token = _vit("token")
    assert resolve_target_layer(token, None) is token.blocks[1].norm1


def test_layout_drops_class_and_register_tokens_in_grid_order():
    model = _vit()
    tokens = torch.arange(2 * (3 + GRID * GRID) * DIM, dtype=torch.float32).view(2, -1, DIM)
    layout = FeatureLayout(model)
    acts = layout.to_map(tokens)
    assert acts.shape == (2, DIM, GRID, GRID)
    # patch (row i, column j) is token 3 + i * GRID + j, channel c its last index
    i, j, c = 2, 5, 7
    assert acts[1, c, i, j] == tokens[1, 3 + i * GRID + j, c]
    assert torch.equal(layout.to_output(acts, tokens), tokens)


def _brute_force_drops(model, layer, images, reference) -> torch.Tensor:
    """s(e, r) - s(e with channel k of every patch token zeroed at ``layer``), (N, K)."""
    cos = nn.functional.cosine_similarity
    with torch.no_grad():
        base = cos(model(images), reference, dim=1)
        drops = []
        for k in range(DIM):

            def zero(module, inputs, out, k=k):
                out = out.clone()
                out[:, model.num_prefix_tokens :, k] = 0
                return out

            handle = layer.register_forward_hook(zero)
            try:
                drops.append(base - cos(model(images), reference, dim=1))
            finally:
                handle.remove()
    return torch.stack(drops, 1)


def test_fam_closed_form_on_mean_token_equals_brute_force_ablation():
    model = _vit("avg")
    images, reference = _inputs(model)
    # the embedding is the mean of the final norm's patch tokens: FAM's closed form applies
    fam = FAM(model, "norm", contribution="ablation")
    closed = fam(images, reference, "cosine", upsample=False)
    assert fam.last_path == "gap"
    with torch.no_grad():
        emb, acts = fam.forward(images)
        contributions = fam.contributions(images, emb, acts, SimilarityTarget(reference))
    brute = _brute_force_drops(model, model.norm, images, reference)
    torch.testing.assert_close(contributions, brute, rtol=1e-4, atol=1e-6)
    ablated = FAM(model, "norm", contribution="ablation", path="forward_ablation")
    torch.testing.assert_close(
        ablated(images, reference, "cosine", upsample=False), closed, rtol=1e-4, atol=1e-6
    )


def test_fam_takes_forward_ablation_inside_a_vit():
    model = _vit("avg")
    images, reference = _inputs(model)
    fam = FAM(model, "blocks.0", contribution="ablation")
    fam(images, reference, "cosine", upsample=False)
    assert fam.last_path == "forward_ablation"
    with torch.no_grad():
        emb, acts = fam.forward(images)
        contributions = fam.contributions(images, emb, acts, SimilarityTarget(reference))
    brute = _brute_force_drops(model, model.blocks[0], images, reference)
    torch.testing.assert_close(contributions, brute, rtol=1e-4, atol=1e-6)


def test_gradcam_on_tokens_equals_gradients_of_the_patch_tokens():
    model = _vit("avg")
    images, reference = _inputs(model)
    layer = model.blocks[1]
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["tokens"] = out

    handle = layer.register_forward_hook(keep)
    try:
        score = nn.functional.cosine_similarity(model(images), reference, dim=1)
        score.sum().backward()
    finally:
        handle.remove()
    tokens = seen["tokens"][:, 3:]
    grads = seen["tokens"].grad[:, 3:]
    weights = grads.mean(1)  # alpha_k = mean over positions of ds/dA_k
    expected = torch.relu((tokens * weights[:, None]).sum(-1)).view(3, GRID, GRID)
    got = GradCAM(model, "blocks.1")(images, reference, "cosine", upsample=False)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-6)


def swin_like_reshape(output: torch.Tensor) -> torch.Tensor:
    """(N, h, w, C) -> (N, C, h, w): a layout the model does not describe."""
    return output.permute(0, 3, 1, 2)


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)  # (N, h, w, C), as Swin's stages
        return self.mix(x).mean((1, 2))


def test_reshape_callable_explains_another_layout_and_must_rearrange():
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    reference = torch.randn(2, 8)
    model.reshape_transform = swin_like_reshape
    # the ablation form has both paths (the product share has no forward-ablation twin)
    fam = FAM(model, "mix", contribution="ablation", path="forward_ablation")
    raw = fam(images, reference, "cosine", upsample=False)
    assert raw.shape == (2, GRID, GRID)
    # timm's Swin declares its layout instead: the same maps without a callable
    del model.reshape_transform
    model.output_fmt = "NHWC"
    declared = FAM(model, "mix", contribution="ablation", path="forward_ablation")
    torch.testing.assert_close(declared(images, reference, "cosine", upsample=False), raw)
    del model.output_fmt
    model.reshape_transform = swin_like_reshape
    # the closed form of the same GAP embedding: the reshape maps the ablation back exactly
    closed = FAM(model, "mix", contribution="ablation")
    torch.testing.assert_close(closed(images, reference, "cosine", upsample=False), raw)
    assert closed.last_path == "gap"
    model.reshape_transform = lambda out: out.permute(0, 3, 1, 2) * 2.0
    with pytest.raises(FamBenchError, match="only rearrange"):
        FAM(model, "mix", path="forward_ablation")(images, reference)


def test_tokens_off_the_grid_are_a_clear_error():
    model = _vit()
    model.num_prefix_tokens = 2  # 2 + 36 + 1 tokens: neither the grid nor a square
    images, reference = _inputs(_vit())
    with pytest.raises(FamBenchError, match="model.reshape"):
        GradCAM(model, "blocks.1")(images, reference)


@pytest.mark.parametrize("method", ["fam", "gradcam", "layercam", "eigencam_signed"])
def test_vit_amp_maps_agree_with_fp32(method):
    """bf16 autocast on tokens: the reshaped map is cast back to the tokens' dtype."""
    model = _vit("avg")
    images, reference = _inputs(model)
    fp32 = METHODS[method](model, None)(images, reference, "cosine")
    explainer = METHODS[method](model, None)
    explainer.amp = True
    bf16 = explainer(images, reference, "cosine")
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.15


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_vit_maps_stay_on_cuda_and_match_cpu(method):
    model = _vit("avg")
    images, reference = _inputs(model)
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    masks[:, 4:12, 8:20] = True
    extra = {"masks": masks} if method == "mask" else {}
    layer = "norm" if method == "fam_product" else None
    cpu = METHODS[method](model, layer)(images, reference, "cosine", **extra)
    model.cuda()
    extra = {"masks": masks.cuda()} if method == "mask" else {}
    # TF32 convolutions (the patch embedding) would differ from the CPU by ~1e-3.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        maps = METHODS[method](model, layer)(images.cuda(), reference.cuda(), "cosine", **extra)
    assert maps.device.type == "cuda"
    if method != "random":
        torch.testing.assert_close(maps.cpu(), cpu, rtol=1e-3, atol=1e-3)
    # bf16 autocast with channels_last inputs on the device: maps still come back
    explainer = METHODS[method](model, layer)
    explainer.amp = True
    amp = explainer(images.cuda(), reference.cuda(), "cosine", **extra)
    assert amp.device.type == "cuda" and bool(torch.isfinite(amp).all())


@pytest.mark.parametrize("global_pool, layer", [("avg", "blocks.1"), ("token", "blocks.1.norm1")])
def test_a_custom_timm_vit_defaults_to_its_last_block(global_pool, layer):
    pytest.importorskip("timm")
    from experiments.models import build_model_from_config

    kwargs = {
        "img_size": SIZE,
        "patch_size": PATCH,
        "embed_dim": DIM,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
        "global_pool": global_pool,
    }
    target = "timm.models.vision_transformer.VisionTransformer"
    model, _ = build_model_from_config({"target": target, "kwargs": kwargs, "input_size": SIZE})
    assert model.default_target_layer == layer
    images, reference = _inputs(model.eval())
    raw = GradCAM(model, None)(images, reference, upsample=False)
    assert raw.shape == (3, GRID, GRID) and not bool(model.training)


def test_model_reshape_names_a_callable_for_custom_models_only():
    from experiments import builders, config
    from experiments.models import build_model_from_config

    target = "test_token_models.ChannelsLast"
    model, _ = build_model_from_config(
        {"target": target, "reshape": "test_token_models.swin_like_reshape", "target_layer": "mix"}
    )
    assert model.reshape_transform is swin_like_reshape
    with pytest.raises(FamBenchError, match="not a callable"):
        build_model_from_config({"target": target, "reshape": "test_token_models.SIZE"})
    run = config.load(config.compose_config(["model.reshape=test_token_models.swin_like_reshape"]))
    with pytest.raises(FamBenchError, match="model=custom only"):
        builders.build_network(run.model)


class ConvStem(nn.Module):
    """Two Conv-4 blocks: (N, 3, 32, 32) -> (N, 8*8, C) patch tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(3, dim), block(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).transpose(1, 2)


class HybridViT(nn.Module):
    """A small hybrid ViT (a convolutional stem, as timm's ``vit_*_r*`` models): a class
    token, transformer blocks, and the mean of the last block's patch tokens as the
    embedding. Its grid is named by ``patch_grid`` (not timm's ``patch_embed.grid_size``)."""

    def __init__(self, dim: int = 64, depth: int = 2, size: int = 32) -> None:
        super().__init__()
        self.patch_embed = ConvStem(dim)
        self.patch_grid = (size // 4, size // 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // 4) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return self.blocks(x)[:, 1:].mean(1)


@pytest.mark.slow
def test_a_trained_hybrid_vit_fam_beats_random_on_the_pointing_game(tmp_path, monkeypatch):
    """The embedded few-shot data, a small hybrid ViT trained briefly (80 ProtoNet steps):
    every method explains its last block's patch tokens, and FAM points at the object
    more often than the random map (its closed form: the embedding is the mean token).
    Measured: FAM 0.81, random 0.14 (n = 100)."""
    import pandas as pd

    from experiments import builders, config, pipeline

    def network(run, checkpoint=None):
        torch.manual_seed(0)
        return HybridViT()

    monkeypatch.setattr(builders, "build_network", network)
    methods = sorted(set(METHODS) - {"fam_product", "eigencam_signed"})
    cfg = config.compose_config(
        [
            "experiment=synthetic_5way",
            "task.train_way=5",
            "trainer.max_steps=80",
            "eval.num_episodes=4",
            "eval.n_query=5",
            f"methods=[{','.join(methods)}]",
            "metrics=[pointing_game]",
            f"cache_dir={tmp_path / 'cache'}",
            "eval.progress=false",
            "trainer.accelerator=cpu",
        ]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["method"].unique()) == methods
    hits = results.groupby("method")["pointing_game"].mean()
    assert len(results) == len(methods) * 100
    # (Grad-CAM and XGrad-CAM give all-negative sums, zero maps, for about a third of the
    # queries of this briefly trained model: their definition, not the token reading)
    assert not results.loc[results["method"] == "fam", "degenerate"].any()
    assert hits["fam"] >= hits["random"] + 0.2, hits.to_dict()
