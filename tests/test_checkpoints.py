"""Checkpoint loading: every format and foreign layout, with the key names each project's
own code writes (FEAT, easyfsl, solo-learn, Lightning, DataParallel, safetensors). Each
test builds a small stand-in of the project's network with its real module names, saves it
the way that project does, loads it into the suite's architecture and checks that the
embeddings are the same."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from custom_nets import fit_and_save
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from experiments.models import Conv4, Conv4GlobalMax, ResNet12, ResNetEncoder
from experiments.training import load_weights
from experiments.training.checkpoints import LoadReport
from fam.errors import FamBenchError


def scramble(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic seeded non-default values, so a load that
    leaves anything at its initial value changes the embedding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                if name.endswith("running_var"):
                    tensor.copy_(1 + noise.abs())
                else:
                    tensor.add_(noise)
    return module.eval()


def same_embeddings(suite: nn.Module, reference, size: int = 32) -> None:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(suite.eval()(images), reference(images))


# -- FEAT (Sha-Lab/FEAT): model/networks/res12.py and convnet.py, saved as {'params': ...} --
class FeatBlock(nn.Module):
    """FEAT's BasicBlock: three conv3x3-BN (LeakyReLU 0.1), 1x1 downsample, max-pool 2."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(2)
        self.downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu(out + self.downsample(x)))


class FeatResNet(nn.Module):
    """FEAT's ResNet: ``layer1..4`` each a Sequential of one FeatBlock, then GAP."""

    def __init__(self, widths=(8, 12, 16, 20)) -> None:
        super().__init__()
        inplanes = 3
        for i, planes in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(FeatBlock(inplanes, planes)))
            inplanes = planes

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))


def feat_conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


class FeatConvNet(nn.Module):
    """FEAT's ConvNet: ``self.encoder`` = four conv blocks, embedding = max over the map."""

    def __init__(self, hid: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            feat_conv_block(3, hid),
            feat_conv_block(hid, hid),
            feat_conv_block(hid, hid),
            feat_conv_block(hid, hid),
        )

    def forward(self, x):
        x = self.encoder(x)
        return nn.functional.max_pool2d(x, x.shape[-1]).flatten(1)


class FeatProtoNet(nn.Module):
    """FEAT's FewShotModel: the backbone as ``self.encoder`` (+ FEAT's attention)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.slf_attn = nn.Linear(4, 4)  # FEAT's set-to-set module lives beside the encoder


def test_feat_resnet12_params_checkpoint_loads_into_resnet12(tmp_path):
    feat = FeatProtoNet(scramble(FeatResNet()))
    path = tmp_path / "max_acc.pth"
    torch.save({"params": feat.state_dict()}, path)
    assert "encoder.layer1.0.conv3.weight" in feat.state_dict()
    model = ResNet12(channels=(8, 12, 16, 20))
    report = load_weights(model, path)
    assert report.layout == "feat_resnet12" and report.key == "params"
    assert report.prefix == "encoder." and report.missing == []
    assert report.unexpected == ["slf_attn.bias", "slf_attn.weight"]
    same_embeddings(model, feat.encoder)


def test_feat_pretrained_classifier_checkpoint_drops_its_fc(tmp_path):
    classifier = nn.Module()
    classifier.encoder, classifier.fc = scramble(FeatResNet()), nn.Linear(20, 64)
    path = tmp_path / "Res12-pre.pth"
    torch.save({"params": classifier.state_dict()}, path)
    model = ResNet12(channels=(8, 12, 16, 20))
    report = load_weights(model, path)
    assert report.unexpected == ["fc.bias", "fc.weight"]
    same_embeddings(model, classifier.encoder)


@pytest.mark.parametrize("nested", [True, False], ids=["protonet", "pretrained"])
def test_feat_convnet_loads_into_conv4_global_max(nested, tmp_path):
    convnet = scramble(FeatConvNet())
    state = FeatProtoNet(convnet).state_dict() if nested else convnet.state_dict()
    path = tmp_path / "con.pth"
    torch.save({"params": state}, path)
    model = Conv4GlobalMax(hidden=8)
    report = load_weights(model, path)
    assert report.layout == "feat_convnet" and report.notes == []
    assert report.prefix == ("encoder." if nested else "")
    same_embeddings(model, convnet)


def test_feat_convnet_in_a_gap_conv4_loads_with_a_note(tmp_path, caplog):
    convnet = scramble(FeatConvNet())
    path = tmp_path / "con.pth"
    torch.save({"params": FeatProtoNet(convnet).state_dict()}, path)
    model = Conv4(hidden=8)
    with caplog.at_level(logging.WARNING):
        report = load_weights(model, path)
    assert "global max" in report.notes[0] and "global max" in caplog.text
    with torch.no_grad():  # same network: the last map agrees, only the pooling differs
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model.eval().encoder(x), convnet.encoder(x))


# -- easyfsl (sicara/easy-few-shot-learning): a FewShotClassifier keeps `self.backbone` ------
class EasyfslResNet(nn.Module):
    """easyfsl's ResNet (modules/resnet.py) with big_kernel=False: 3x3 stem, no max-pool,
    torchvision BasicBlocks, GAP, and an ``fc`` that exists even when unused."""

    def __init__(self, layers=(1, 1, 2, 1), planes=(64, 160, 320, 640)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        inplanes = 64
        for i, (width, blocks) in enumerate(zip(planes, layers, strict=True)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            seq = [BasicBlock(inplanes, width, stride, down)]
            seq += [BasicBlock(width, width) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*seq))
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, 1000)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class EasyfslPrototypicalNetworks(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def test_easyfsl_resnet12_loads_into_the_easyfsl_resnet12_encoder(tmp_path):
    protonet = EasyfslPrototypicalNetworks(scramble(EasyfslResNet()))
    path = tmp_path / "easyfsl.pt"
    torch.save(protonet.state_dict(), path)
    assert "backbone.layer3.1.conv2.weight" in protonet.state_dict()
    model = ResNetEncoder("easyfsl_resnet12", cifar_stem=True)
    report = load_weights(model, path)
    assert report.layout == "easyfsl_resnet" and report.prefix == "backbone."
    assert report.unexpected == ["backbone.fc.bias", "backbone.fc.weight"]
    same_embeddings(model, protonet.backbone, size=16)


def test_easyfsl_resnet18_loads_into_resnet18_with_the_cifar_stem(tmp_path):
    protonet = EasyfslPrototypicalNetworks(
        scramble(EasyfslResNet((2, 2, 2, 2), (64, 128, 256, 512)))
    )
    path = tmp_path / "easyfsl18.pt"
    torch.save(protonet.state_dict(), path)
    model = ResNetEncoder("resnet18", cifar_stem=True)
    load_weights(model, path)
    same_embeddings(model, protonet.backbone, size=16)


def test_easyfsl_feat_resnet12_backbone_loads_into_resnet12(tmp_path):
    protonet = EasyfslPrototypicalNetworks(scramble(FeatResNet()))
    path = tmp_path / "easyfsl_feat.pt"
    torch.save(protonet.state_dict(), path)
    model = ResNet12(channels=(8, 12, 16, 20))
    report = load_weights(model, path)
    assert report.layout == "feat_resnet12" and report.prefix == "backbone."
    same_embeddings(model, protonet.backbone)


def test_a_wrong_suite_model_is_told_which_architecture_fits(tmp_path):
    path = tmp_path / "max_acc.pth"
    torch.save({"params": FeatProtoNet(FeatResNet()).state_dict()}, path)
    with pytest.raises(FamBenchError, match="does not fit the model") as excinfo:
        load_weights(Conv4(hidden=8), path)
    assert "FEAT ResNet-12" in str(excinfo.value) and "model=resnet12" in str(excinfo.value)


# -- solo-learn (vturrisi/solo-learn): a Lightning module with backbone/classifier/projector --
def solo_learn_checkpoint(path, cifar: bool = True):
    """A real Lightning checkpoint of a solo-learn-shaped module: ``self.backbone`` a
    torchvision ResNet-18 with ``fc = Identity`` (and solo-learn's CIFAR stem: 3x3 conv,
    stride 1, *padding 2*, no max-pool), ``classifier``, ``projector``, and the Hydra config
    saved as OmegaConf hyper-parameters."""
    import pytorch_lightning as pl

    class SoloMethod(pl.LightningModule):
        def __init__(self, cfg):
            super().__init__()
            self.save_hyperparameters(cfg)
            self.backbone = torchvision.models.resnet18(weights=None)
            self.backbone.fc = nn.Identity()
            if cifar:
                self.backbone.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=2, bias=False)
                self.backbone.maxpool = nn.Identity()
            self.classifier = nn.Linear(512, 10)
            self.projector = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 8))

        def training_step(self, batch, _):
            return self.projector(self.backbone(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    cfg = OmegaConf.create(
        {
            "method": "simclr",
            "backbone": {"name": "resnet18", "kwargs": {}},
            "data": {"dataset": "cifar10" if cifar else "imagenet", "num_classes": 10},
        }
    )
    module = SoloMethod(cfg)
    scramble(module)
    fit_and_save(module, path)
    return module.backbone.eval()


@pytest.fixture(scope="module")
def solo_cifar(tmp_path_factory):
    path = tmp_path_factory.mktemp("solo") / "simclr-cifar10.ckpt"
    return path, solo_learn_checkpoint(path)


def test_lightning_checkpoint_with_omegaconf_hparams_is_read_weights_only(solo_cifar):
    path, backbone = solo_cifar
    with pytest.raises(Exception, match="Weights only load failed"):  # why the allow-list
        torch.load(path, weights_only=True)
    model = ResNetEncoder("resnet18", cifar_stem=True, stem_padding=2)
    report = load_weights(model, path)
    assert report.layout == "solo_learn_resnet" and report.key == "state_dict"
    assert report.prefix == "backbone."
    assert any(k.startswith("projector.") for k in report.unexpected)
    assert "classifier.weight" in report.unexpected
    same_embeddings(model, backbone)


def test_solo_learn_cifar_stem_never_loads_into_the_padding_1_stem(solo_cifar):
    path, _ = solo_cifar
    with pytest.raises(FamBenchError, match="stem_padding=2"):
        load_weights(ResNetEncoder("resnet18", cifar_stem=True), path)


def test_solo_learn_imagenet_resnet_loads_into_the_torchvision_stem(tmp_path):
    path = tmp_path / "byol-imagenet.ckpt"
    backbone = solo_learn_checkpoint(path, cifar=False)
    model = ResNetEncoder("resnet18")
    assert load_weights(model, path).layout == "solo_learn_resnet"
    same_embeddings(model, backbone, size=64)


# -- plain files, nesting, prefixes, safetensors ----------------------------------------------
def suite_conv4() -> Conv4:
    return scramble(Conv4(hidden=8, pools=(True, True, False, False)))


@pytest.mark.parametrize(
    ("wrap", "suffix"),
    [
        (lambda s: s, ".pt"),
        (lambda s: {f"module.{k}": v for k, v in s.items()}, ".pth"),  # DataParallel / DDP
        (lambda s: {"model": s, "epoch": 3}, ".pth"),  # timm / torchvision train scripts
        (lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}}, ".ckpt"),
        (lambda s: {"model_state_dict": s, "optimizer_state_dict": {}}, ".tar"),
    ],
    ids=["plain", "module-prefix", "model-key", "lightning", "model_state_dict"],
)
def test_plain_and_nested_state_dicts_load(wrap, suffix, tmp_path):
    reference = suite_conv4()
    path = tmp_path / f"weights{suffix}"
    torch.save(wrap(reference.state_dict()), path)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    report = load_weights(model, path)
    assert isinstance(report, LoadReport) and report.missing == []
    same_embeddings(model, reference)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    reference = suite_conv4()
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in reference.state_dict().items()}, path)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    assert load_weights(model, path).prefix == "module."
    same_embeddings(model, reference)


def test_explicit_key_and_prefix_choose_the_entry_and_the_network(tmp_path):
    reference, other = suite_conv4(), scramble(Conv4(hidden=8, pools=(True, True, False, False)), 5)
    state = {f"student.{k}": v for k, v in other.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / "distill.pt"
    torch.save({"ema": {"weights": state}, "step": 10}, path)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    report = load_weights(model, path, key="ema.weights", prefix="teacher")
    assert report.prefix == "teacher." and report.key == "ema.weights"
    same_embeddings(model, reference)
    with pytest.raises(FamBenchError, match="no entry 'ema.nothing'"):
        load_weights(model, path, key="ema.nothing")
    with pytest.raises(FamBenchError, match="holds no state_dict"):
        load_weights(model, path)  # ambiguous nesting: told to name the key


def test_two_networks_that_fit_equally_are_an_error_unless_they_are_one(tmp_path):
    """MoCo's layout: ``encoder_q`` (explained) beside its momentum copy ``encoder_k``;
    prefix order would pick ``encoder_k`` silently."""
    query, key = suite_conv4(), scramble(Conv4(hidden=8, pools=(True, True, False, False)), 5)
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in key.state_dict().items()}
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "epoch": 200}, path)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    with pytest.raises(FamBenchError, match=r"model\.checkpoint_prefix=module\.encoder_q\.") as e:
        load_weights(model, path)
    assert "module.encoder_k." in str(e.value)
    assert load_weights(model, path, prefix="module.encoder_q.").prefix == "module.encoder_q."
    same_embeddings(model, query)
    # identical copies (a momentum encoder right after initialisation) are one network
    state |= {f"module.encoder_k.{k}": v for k, v in query.state_dict().items()}
    torch.save({"state_dict": state}, path)
    fresh = Conv4(hidden=8, pools=(True, True, False, False))
    load_weights(fresh, path)
    same_embeddings(fresh, query)


def test_a_checkpoint_that_does_not_fit_names_the_keys_and_shapes(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(Conv4(hidden=16).state_dict(), path)
    with pytest.raises(FamBenchError, match="does not fit the model") as excinfo:
        load_weights(Conv4(hidden=8), path)
    assert "encoder.0.0.weight: checkpoint (16, 3, 3, 3) vs model (8, 3, 3, 3)" in str(
        excinfo.value
    )
    torch.save({"encoder.0.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(FamBenchError, match="missing keys: .*encoder.0.1.weight"):
        load_weights(Conv4(hidden=8), path)


def test_a_pickled_module_is_refused_without_running_its_code(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(Conv4(hidden=8), path)
    with pytest.raises(FamBenchError, match="pickled experiments.models.conv4.Conv4"):
        load_weights(Conv4(hidden=8), path)


class Trap:
    """Unpickling one runs its ``__setstate__``: the safe loader must never do that."""

    built = False

    def __init__(self) -> None:
        self.armed = True  # a state, so that unpickling calls __setstate__

    def __setstate__(self, state) -> None:
        Trap.built = True


def test_entries_the_safe_loader_refuses_are_never_built_and_the_state_dict_loads(tmp_path):
    import pickle
    from pathlib import Path

    pickle.loads(pickle.dumps(Trap()))  # plain unpickling runs the class's code
    assert Trap.built
    Trap.built = False
    conv = suite_conv4()
    path = tmp_path / "lightning.ckpt"
    hparams = {"root": Path("/data/shapes"), "trap": Trap(), "lr": 0.1}
    torch.save({"state_dict": conv.state_dict(), "hyper_parameters": hparams}, path)
    model = Conv4(hidden=8, pools=(True, True, False, False))
    report = load_weights(model, path)
    assert not Trap.built
    assert report.key == "state_dict" and report.missing == [] and report.unexpected == []
    (note,) = report.notes
    assert "hyper_parameters.root (pathlib.PosixPath)" in note
    assert f"hyper_parameters.trap ({__name__}.Trap)" in note
    for name, value in conv.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_torchvision_resnet50_with_its_fc_loads_into_a_stripped_custom_model(tmp_path):
    from experiments.models import build_model_from_config

    reference = scramble(torchvision.models.resnet50(weights=None))
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model, label = build_model_from_config(
        {"target": "torchvision.models.resnet50", "kwargs": {}, "input_size": 32}
    )
    report = load_weights(model, path)
    assert label == "torchvision.models.resnet50"
    assert report.unexpected == ["fc.bias", "fc.weight"]
    reference.fc = nn.Identity()
    same_embeddings(model, reference)
