"""Embedding networks: shapes, target layers, pooling flags, torchvision agreement."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from experiments.models import Conv4, ResNet12, ResNetEncoder, build_model
from fam.errors import FamBenchError
from fam.layers import capture_layer, resolve_target_layer


def _target_map(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, activations of the default target layer) in eval mode."""
    model.eval()
    with torch.no_grad(), capture_layer(resolve_target_layer(model, None)) as cap:
        emb = model(images)
    return emb, cap.activations


@pytest.mark.parametrize(
    ("name", "options", "size", "dim", "hw"),
    [
        ("conv4", {"pools": [True, True, False, False]}, 32, 64, 8),
        ("conv4", {}, 32, 64, 2),
        ("conv4", {}, 84, 64, 5),
        ("resnet12", {"pools": [True, True, False, False], "channels": [8, 16, 24, 32]}, 32, 32, 8),
        ("resnet12", {"channels": [8, 16, 24, 32]}, 84, 32, 5),
        ("resnet18", {}, 64, 512, 2),
        ("resnet18", {"cifar_stem": True}, 32, 512, 4),
        ("resnet50", {"cifar_stem": True}, 16, 2048, 2),
    ],
)
def test_embedding_is_gap_of_default_target_layer(name, options, size, dim, hw):
    torch.manual_seed(0)
    model = build_model(name, **options)
    emb, acts = _target_map(model, torch.randn(2, 3, size, size))
    assert emb.shape == (2, dim)
    assert acts.shape == (2, dim, hw, hw)
    # DESIGN section 1: e(x) = GAP(A(x)) at the default target layer.
    torch.testing.assert_close(emb, acts.mean(dim=(2, 3)))
    assert model.pooling == "gap"
    assert model.model_name == name


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_flatten_pooling_is_the_flattened_map(name):
    options = {"channels": [8, 8, 8, 8]} if name == "resnet12" else {"hidden": 8}
    model = build_model(name, pools=[True, True, False, False], pooling="flatten", **options)
    emb, acts = _target_map(model, torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 8 * 8 * 8)
    torch.testing.assert_close(emb, acts.flatten(1))


def test_resnet12_parameter_count_matches_closed_form():
    # Per block: three 3x3 convs (no bias), a 1x1 shortcut conv, four BNs (weight + bias).
    widths = [3, 64, 160, 320, 640]
    expected = sum(
        9 * cin * cout + 2 * 9 * cout * cout + cin * cout + 4 * 2 * cout
        for cin, cout in zip(widths[:-1], widths[1:], strict=True)
    )
    model = ResNet12()
    assert sum(p.numel() for p in model.parameters()) == expected  # 12.4M, as published
    block = model.layer1
    assert isinstance(block.activation, nn.LeakyReLU) and block.activation.negative_slope == 0.1
    assert isinstance(block.pool, nn.MaxPool2d)


def test_resnet12_residual_block_computes_documented_function():
    torch.manual_seed(0)
    model = ResNet12(channels=(4, 4, 4, 4)).eval()
    block = model.layer1
    x = torch.randn(2, 3, 8, 8)
    body = x
    convs = [m for m in block.body if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.body if isinstance(m, nn.BatchNorm2d)]
    for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
        body = bn(conv(body))
        if i < 2:
            body = torch.nn.functional.leaky_relu(body, 0.1)
    shortcut = block.shortcut[1](block.shortcut[0](x))
    expected = torch.nn.functional.max_pool2d(
        torch.nn.functional.leaky_relu(body + shortcut, 0.1), 2
    )
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_encoder_matches_torchvision_without_fc(arch, tmp_path):
    from experiments.training import load_weights

    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / "torchvision.pt"
    torch.save(reference.state_dict(), path)  # includes fc.*, which the encoder drops
    encoder = build_model(arch)
    load_weights(encoder, path)
    encoder.eval()
    reference.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference(images))


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    model = build_model("resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    standard = build_model("resnet18")
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)
    _, acts = _target_map(standard, torch.randn(1, 3, 32, 32))
    assert acts.shape[-2:] == (1, 1)  # why the CIFAR stem exists


def test_conv4_pools_flags_set_last_map_size():
    for pools, side in [((True,) * 4, 2), ((True, True, False, False), 8), ((False,) * 4, 32)]:
        _, acts = _target_map(Conv4(hidden=4, pools=pools), torch.randn(1, 3, 32, 32))
        assert acts.shape[-1] == side


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(FamBenchError, match="Unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(FamBenchError, match="cifar_stem"):
        build_model("conv4", cifar_stem=True)
    with pytest.raises(FamBenchError, match="pooling"):
        build_model("resnet12", pooling="max")


def test_build_model_instantiates_hydra_target_with_labels():
    model = build_model(
        "tiny",
        _target_="torch.nn.Sequential",
        default_target_layer="0",
        pooling="gap",
    )
    assert isinstance(model, nn.Sequential)
    assert model.default_target_layer == "0" and model.pooling == "gap"
    assert model.model_name == "tiny"
    # Options the constructor takes go to it, not to the labels.
    conv = build_model("c4", _target_="experiments.models.Conv4", hidden=8, pooling="flatten")
    assert (
        isinstance(conv, Conv4)
        and conv.pooling == "flatten"
        and conv.encoder[0][0].out_channels == 8
    )
    with pytest.raises(FamBenchError, match="not a torch.nn.Module"):
        build_model("bad", _target_="collections.OrderedDict")
    with pytest.raises(FamBenchError, match="Cannot import"):
        build_model("bad", _target_="no_such_package.Net")


def test_resnet_encoder_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch"):
        ResNetEncoder("resnet34")


# -- model=custom: any class or factory function, exactly that model or an error -----------
def custom(target: str, class_counts=None, checkpoint_state=None, **extra):
    from experiments.models import build_model_from_config

    return build_model_from_config(
        {"target": target, "kwargs": {}, **extra},
        class_counts=class_counts,
        checkpoint_state=checkpoint_state,
    )


def test_custom_class_is_built_with_its_kwargs_and_labelled_by_its_path():
    model, label = custom(
        "experiments.models.Conv4", kwargs={"hidden": 8}, input_size=32, target_layer=None
    )
    assert isinstance(model, Conv4) and model.encoder[0][0].out_channels == 8
    assert label == model.model_name == "experiments.models.Conv4"
    assert model.default_target_layer == "encoder.3" and model.embedding_dim == 8


def test_custom_factory_head_is_stripped_when_its_outputs_are_the_named_class_count():
    # torchvision's ResNet names 1000 classes (its num_classes default), which fc maps to
    model, label = custom("torchvision.models.resnet18", input_size=32)
    assert label == "torchvision.models.resnet18"
    assert isinstance(model.fc, nn.Identity) and model.checkpoint_ignore == ("fc.",)
    assert model.default_target_layer == "layer4" and model.embedding_dim == 512
    (strip,) = model.head_strips
    assert (strip.layer, strip.before, strip.after) == ("fc", 1000, 512)
    assert strip.warning["code"] == "head_stripped" and "default num_classes" in strip.why
    kept, _ = custom("torchvision.models.resnet18", strip_head=False, input_size=32)
    assert isinstance(kept.fc, nn.Linear) and kept.embedding_dim == 1000
    assert kept.head_strips == []


def test_an_fc_the_user_sized_is_explained_in_place_unless_strip_head_is_true():
    # resnet18(num_classes=128) is how a metric-learning model gets a 128-d embedding fc
    model, _ = custom("torchvision.models.resnet18", kwargs={"num_classes": 128}, input_size=32)
    assert isinstance(model.fc, nn.Linear) and model.embedding_dim == 128
    assert model.head_strips == [] and "model.strip_head=true" in model.head_notes[0]
    forced, _ = custom(
        "torchvision.models.resnet18", kwargs={"num_classes": 7}, strip_head="true", input_size=32
    )
    assert isinstance(forced.fc, nn.Identity) and forced.embedding_dim == 512
    assert [(s.layer, s.before, s.after) for s in forced.head_strips] == [("fc", 7, 512)]


def test_a_checkpoint_naming_its_classes_strips_the_head_that_maps_to_them():
    from experiments.models.custom import named_class_counts

    payload = {"hyper_parameters": {"model": {"num_classes": 7}}, "state_dict": {}}
    counts = named_class_counts(payload)
    assert list(counts) == [7] and "hyper_parameters.model.num_classes" in counts[7]
    classifier = torchvision.models.resnet18(num_classes=7).state_dict()
    state = {f"backbone.{k}": v for k, v in classifier.items()}
    state["x.fc.weight"] = torch.zeros(3, 512)  # an fc of another module: never the head
    model, _ = custom(
        "torchvision.models.resnet18",
        kwargs={"num_classes": 7},
        input_size=32,
        class_counts=counts,
        checkpoint_state=state,
    )
    assert isinstance(model.fc, nn.Identity) and model.head_strips[0].before == 7
    # the checkpoint's head is 128-d where the model's default is 1000: the stored shape
    # decides, 128 is no named class count, so fc stays (and must then fit the file)
    embedding = torchvision.models.resnet18(num_classes=128).state_dict()
    kept, _ = custom("torchvision.models.resnet18", checkpoint_state=embedding)
    assert isinstance(kept.fc, nn.Linear) and kept.head_strips == []


def test_custom_head_inside_a_pooling_head_is_stripped_one_level_down():
    from experiments.models.custom import strip_heads

    net = nn.Sequential()
    net.features = nn.Conv2d(3, 4, 3)
    net.head = nn.Sequential()
    net.head.pool, net.head.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)
    strips, _ = strip_heads(net, "net", "true", {})  # model.strip_head=true
    assert [s.layer for s in strips] == ["head.fc"] and isinstance(net.head.pool, nn.Module)


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("no_such_package.SmallNet", {}, "Cannot import model.target 'no_such_package"),
        ("torchvision.models.no_such_net", {}, "has no attribute 'no_such_net'"),
        ("math.pi", {}, "not a class or function"),
        ("collections.OrderedDict", {}, "not a torch.nn.Module"),
        ("experiments.models.Conv4", {"kwargs": {"width": 3}}, r"do not fit .*'hidden'"),
        (
            "torch.nn.Conv2d",
            {"kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 3}, "input_size": 8},
            r"shape \(2, 4, 6, 6\).*feature map",
        ),
        ("experiments.models.Conv4", {"target_layer": "layer9"}, "not a module of"),
        ("", {}, "needs model.target"),
    ],
)
def test_custom_targets_that_cannot_be_built_are_errors_never_a_fallback(target, extra, message):
    with pytest.raises(FamBenchError, match=message):
        custom(target, **extra)


def test_model_configs_reject_unknown_keys_and_hydra_targets():
    from experiments.models import build_model_from_config

    base = {"name": "conv4", "checkpoint": None, "target_layer": None, "options": {}}
    model, label = build_model_from_config(base)
    assert isinstance(model, Conv4) and label == "conv4"
    with pytest.raises(FamBenchError, match="model=custom model.target=mymodels.SmallNet"):
        build_model_from_config({**base, "_target_": "mymodels.SmallNet"})
    with pytest.raises(FamBenchError, match=r"unknown key\(s\) \['kwargs'\]"):
        build_model_from_config({**base, "kwargs": {}})
    with pytest.raises(FamBenchError, match="Unknown model 'vgg'"):
        build_model_from_config({**base, "name": "vgg"})


def test_solo_learn_stem_padding_and_easyfsl_resnet12_shapes():
    solo = ResNetEncoder("resnet18", cifar_stem=True, stem_padding=2)
    assert solo.conv1.padding == (2, 2)
    emb, acts = _target_map(solo, torch.randn(2, 3, 32, 32))
    assert acts.shape[-2:] == (5, 5)  # 34 px after the stem, four halvings
    easy = ResNetEncoder("easyfsl_resnet12", cifar_stem=True)
    emb, acts = _target_map(easy, torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 640) and acts.shape == (2, 640, 4, 4)
    with pytest.raises(ValueError, match="cifar_stem=True"):
        ResNetEncoder("easyfsl_resnet12")
