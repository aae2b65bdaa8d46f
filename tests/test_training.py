"""Training (ProtoNet, SimCLR, metric learning), the checkpoint cache and task metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from torch import nn

import experiments.training.train as train_module
from evaluation.plain import short_hash
from experiments.models import build_model
from experiments.tasks import family_for
from experiments.tasks.fewshot import EpisodeClassifier, episode_accuracy
from experiments.tasks.fewshot.protonet import ProtoNetModule
from experiments.tasks.neighbour.task_metrics import knn_accuracy, recall_at_k
from experiments.tasks.neighbour.views import TwoViews
from experiments.training import (
    cached_checkpoint,
    fit,
    load_weights,
    save_weights,
    train_or_load,
)
from experiments.training.batches import IndexedBatches
from fam.errors import FamBenchError
from fam.similarity import pairwise

CPU = {"accelerator": "cpu", "devices": 1}


def _family(name, cfg=None):
    """The registered task family ``name`` with the task config ``cfg``."""
    return family_for({"name": name, **(cfg or {})})


class ToyShapes(torch.utils.data.Dataset):
    """Tiny in-memory dataset: each class is a fixed random pattern plus noise.

    Follows the dataset contract (dict samples, ``labels``, ``classes``, ``mean``/``std``,
    ``image_size``, ``has_masks``).
    """

    has_masks = False
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, n_classes=8, per_class=12, size=16, noise=0.6, seed=0, offset=0):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.rand(n_classes + offset, 3, size, size, generator=g)[offset:]
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)
        raw = patterns[self.labels] + noise * torch.rand(
            len(self.labels), 3, size, size, generator=g
        )
        raw = (raw / (1 + noise)).clamp(0, 1)
        self.images = (raw - 0.5) / 0.25
        self.classes = [f"c{i}" for i in range(n_classes)]
        self.image_size = size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i]), "index": int(i)}


class Fixed(nn.Module):
    """Embedding = the flattened image (a model whose embeddings the test knows)."""

    def forward(self, images):
        return images.flatten(1)


def _toy_conv4():
    torch.manual_seed(0)
    return build_model("conv4", hidden=16, pools=[True, True, False, False])


def _episodes(labels, way, shot, query, n, seed):
    from experiments.data import EpisodeSampler

    return EpisodeSampler(labels, way, shot, query, n, seed)


def _trend(losses, k=5):
    values = torch.stack(losses)
    return float(values[:k].mean()), float(values[-k:].mean())


# ---------------------------------------------------------------- losses decrease


def test_protonet_loss_decreases():
    module, _ = fit(
        _toy_conv4(),
        ToyShapes(),
        _family("fewshot", {"train_way": 4, "train_shot": 2, "train_query": 3}),
        {"max_steps": 40, **CPU},
        seed=0,
    )
    first, last = _trend(module.train_losses)
    assert len(module.train_losses) == 40
    assert last < 0.6 * first


def test_protonet_cosine_learns_temperature_and_fixed_one_stays():
    data = ToyShapes()
    cfg = {"train_way": 4, "train_shot": 2, "train_query": 3, "similarity": "cosine"}
    learned, _ = fit(_toy_conv4(), data, _family("fewshot", cfg), {"max_steps": 15, **CPU})
    assert isinstance(learned.log_temperature, nn.Parameter)
    assert not math.isclose(float(learned.log_temperature.detach().exp()), 10.0, rel_tol=1e-4)
    first, last = _trend(learned.train_losses, 3)
    assert last < first
    fixed, _ = fit(
        _toy_conv4(), data, _family("fewshot", {**cfg, "temperature": 5.0}), {"max_steps": 3, **CPU}
    )
    assert "log_temperature" in dict(fixed.named_buffers())
    assert math.isclose(float(fixed.log_temperature.exp()), 5.0, rel_tol=1e-6)


def test_protonet_logits_match_definition():
    module = ProtoNetModule(Fixed(), n_way=2, n_shot=2, n_query=1)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    images = torch.cat([support, query]).view(6, 2, 1, 1)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    logits = -torch.cdist(query, prototypes).pow(2)  # [[0, -10], [-10, 0]]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(module.loss(images), expected)
    assert float(expected) == pytest.approx(math.log1p(math.exp(-10)), abs=1e-7)


def test_simclr_loss_decreases_and_head_is_not_part_of_model():
    data = ToyShapes(per_class=8)
    # Colour augmentations off: the toy classes are colour patterns, so they would erase them.
    cfg = {"projection_dim": 16, "min_scale": 0.5, "cj_prob": 0.0, "random_gray_scale": 0.0}
    trainer = {"max_steps": 25, "batch_size": 16, "lr": 3e-3, **CPU}
    module, _ = fit(_toy_conv4(), data, _family("contrastive", cfg), trainer)
    first, last = _trend(module.train_losses)
    assert last < first - 0.3
    assert not any(k.startswith("head") for k in module.model.state_dict())
    assert module.head is not None


def test_retrieval_loss_decreases_for_each_loss():
    data = ToyShapes()
    for loss in ("multi_similarity", "contrastive", "triplet"):
        module, _ = fit(
            _toy_conv4(),
            data,
            _family("retrieval", {"loss": loss, "samples_per_class": 4}),
            {"max_steps": 25, "batch_size": 16, **CPU},
        )
        first, last = _trend(module.train_losses)
        assert last < first, loss


# ---------------------------------------------------------------- batches


def test_two_views_without_augmentation_reproduce_the_image():
    data = ToyShapes(n_classes=2, per_class=2)
    views = TwoViews(data, 16, min_scale=1.0, cj_prob=0.0, random_gray_scale=0.0, hf_prob=0.0)
    a, b, label = views[3]
    torch.testing.assert_close(a, data.images[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(b, data.images[3], atol=1e-5, rtol=0)
    assert int(label) == 1
    augmented = TwoViews(data, 16)
    a, b, _ = augmented[0]
    assert a.shape == b.shape == (3, 16, 16) and not torch.equal(a, b)


def test_retrieval_batches_are_class_balanced():
    data = ToyShapes()
    family = _family("retrieval", {"samples_per_class": 4})
    loader = family.train_loader(data, train_module.as_trainer({"batch_size": 16}), seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 16, 16)
    assert sorted(torch.bincount(labels).tolist())[-4:] == [4, 4, 4, 4]
    torch.testing.assert_close(images, data.images[_indices_of(data, images)])
    with pytest.raises(FamBenchError, match="multiple of task.samples_per_class"):
        _family("retrieval", {"samples_per_class": 3}).train_loader(
            data, train_module.as_trainer({"batch_size": 16}), 0
        )


def _indices_of(data, images):
    flat = data.images.flatten(1)
    return torch.stack([(flat == img.flatten()).all(dim=1).nonzero()[0, 0] for img in images])


def test_indexed_batches_fetch_whole_batches_in_one_call():
    calls = []

    class Counting(ToyShapes):
        def images_at(self, indices):
            calls.append(len(indices))
            return self.images[indices]

    data = Counting()
    images, labels = IndexedBatches(data).__getitems__([3, 0, 17])
    assert calls == [3]
    torch.testing.assert_close(images, data.images[[3, 0, 17]])
    assert labels.tolist() == data.labels[[3, 0, 17]].tolist()


# ---------------------------------------------------------------- train_or_load and the cache

FEWSHOT = {"train_way": 4, "train_shot": 2, "train_query": 2}
TRAINER = {"max_steps": 3, **CPU}


def _fewshot():
    return _family("fewshot", FEWSHOT)


def _key(**change):
    return {"model": {"name": "conv4", "hidden": 16}, "data": "toy", "max_steps": 3, **change}


def test_cached_checkpoint_is_reused_without_training(tmp_path, monkeypatch):
    data = ToyShapes()
    first = train_or_load(_toy_conv4(), data, _fewshot(), TRAINER, None, tmp_path, _key(), 0)
    assert not first.training
    path = cached_checkpoint(tmp_path, "fewshot", first, _key(), 0)
    assert path.name == f"fewshot-conv4-{short_hash({'key': _key(), 'seed': 0}, strict=True)}.pt"
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been loaded")

    monkeypatch.setattr(train_module, "fit", no_training)
    fresh = build_model("conv4", hidden=16, pools=[True, True, False, False])
    second = train_or_load(fresh, data, _fewshot(), TRAINER, None, tmp_path, _key(), 0)
    assert not second.training
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_changed_config_or_seed_gets_a_new_key_and_trains(tmp_path, monkeypatch):
    data = ToyShapes()
    calls = []
    real_fit = train_module.fit
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    model = _toy_conv4()
    train_or_load(model, data, _fewshot(), TRAINER, None, tmp_path, _key(), 0)
    train_or_load(model, data, _fewshot(), TRAINER, None, tmp_path, _key(max_steps=4), 0)
    train_or_load(model, data, _fewshot(), TRAINER, None, tmp_path, _key(), 1)
    train_or_load(model, data, _fewshot(), TRAINER, None, tmp_path, _key(), 0)
    assert len(calls) == 3
    assert len(list(tmp_path.glob("fewshot-conv4-*.pt"))) == 3


def test_cache_hash_is_canonical():
    def cache_hash(key):
        return short_hash(key, strict=True)

    a = {"b": [1, 2], "a": {"y": 0.5, "x": None}}
    b = json.loads('{"a": {"x": null, "y": 0.5}, "b": [1, 2]}')
    assert cache_hash(a) == cache_hash(b) and len(cache_hash(a)) == 16
    assert cache_hash(a) != cache_hash({**a, "b": [2, 1]})
    assert cache_hash({"cfg": OmegaConf.create(a)}) == cache_hash({"cfg": a})
    with pytest.raises(FamBenchError, match="plain JSON"):
        cache_hash({"model": nn.Linear(1, 1)})
    with pytest.raises(FamBenchError, match="plain JSON"):
        cache_hash({"lr": float("nan")})
    # the default form (ids in results.csv, the fingerprint) writes any value as its str
    assert short_hash({"path": nn.Linear}) == short_hash({"path": str(nn.Linear)})
    assert short_hash(a) != cache_hash(a)  # default separators vs compact ones


def test_training_is_reproducible_from_the_seed():
    data = ToyShapes()
    runs = [
        train_or_load(_toy_conv4(), data, _fewshot(), TRAINER, None, None, _key(), 7)
        for _ in range(2)
    ]
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_wrong_architecture_and_missing_checkpoint_are_clear_errors(tmp_path):
    path = save_weights(build_model("conv4", hidden=8), tmp_path / "small.pt")
    with pytest.raises(FamBenchError, match=r"small\.pt.*shape mismatches.*encoder\.0\.0\.weight"):
        load_weights(build_model("conv4", hidden=16), path)
    with pytest.raises(FamBenchError, match=r"small\.pt.*missing keys.*layer1"):
        load_weights(build_model("resnet12", channels=[8, 8, 8, 8]), path)
    with pytest.raises(FamBenchError, match=r"nothing\.pt does not exist"):
        train_or_load(
            _toy_conv4(),
            ToyShapes(),
            _fewshot(),
            TRAINER,
            tmp_path / "nothing.pt",
            None,
            {},
            0,
        )
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(FamBenchError, match="junk.pt"):
        load_weights(build_model("conv4"), tmp_path / "junk.pt")


def test_lightning_checkpoint_loads_with_weights_only(tmp_path):
    data = ToyShapes()
    module, trainer = fit(
        _toy_conv4(),
        data,
        _family("contrastive", {"projection_dim": 8}),
        {"max_steps": 2, "batch_size": 16, **CPU},
    )
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    raw = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.") for k in raw["state_dict"])
    assert any(k.startswith("head.") for k in raw["state_dict"])  # dropped on load
    loaded = train_or_load(
        build_model("conv4", hidden=16, pools=[True, True, False, False]),
        data,
        _family("contrastive", {}),
        {},
        tmp_path / "run.ckpt",
        None,
        {},
        0,
    )
    assert not loaded.training
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_unknown_trainer_setting_and_task_are_errors():
    with pytest.raises(FamBenchError, match="max_step"):
        fit(_toy_conv4(), ToyShapes(), _fewshot(), {"max_step": 3})
    with pytest.raises(FamBenchError, match="Unknown task"):
        _family("segmentation")


# ---------------------------------------------------------------- task metrics


def _protonet(similarity: str):
    return family_for({"name": "fewshot", "similarity": similarity}).algorithm


class CallableCosine:
    """Nearest prototype under a similarity callable (any object with ``classifier``)."""

    def classifier(self, support, n_way, n_shot):
        prototypes = support.view(n_way, n_shot, -1).mean(1)

        def cos(e, r):
            return torch.nn.functional.cosine_similarity(e, r)

        return EpisodeClassifier(prototypes, cos, lambda emb: pairwise(cos, emb, prototypes))


def test_episode_accuracy_matches_per_episode_reference():
    data = ToyShapes(noise=3.0)
    sampler = _episodes(data.labels, 4, 2, 3, 12, seed=3)
    result = episode_accuracy(Fixed(), data, sampler, _protonet("euclidean"))
    accs = []
    for e in range(12):
        ep = sampler.episode(e)
        support = data.images[ep.support].flatten(1).double().view(4, 2, -1).mean(1)
        query = data.images[ep.query].flatten(1).double()
        pred = torch.cdist(query, support).argmin(1)
        accs.append(float((pred == torch.arange(4).repeat_interleave(3)).double().mean()))
    accs = np.array(accs)
    assert 0.2 < accs.mean() < 1.0  # a non-trivial case
    assert result["n"] == 12
    assert result["mean"] == pytest.approx(accs.mean(), abs=1e-6)
    assert result["ci95"] == pytest.approx(1.96 * accs.std(ddof=1) / math.sqrt(12), abs=1e-6)
    cosine = episode_accuracy(Fixed(), data, sampler, _protonet("cosine"))
    callable_cosine = episode_accuracy(Fixed(), data, sampler, CallableCosine())
    assert cosine["mean"] == pytest.approx(callable_cosine["mean"], abs=1e-6)


def test_knn_accuracy_with_k1_matches_sklearn():
    train, test = ToyShapes(noise=1.0), ToyShapes(noise=1.0, per_class=5)
    torch.manual_seed(0)
    test.images = test.images + 2.0 * torch.randn_like(test.images)
    ours = knn_accuracy(Fixed(), train, test, k=1)
    reference = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(
        train.images.flatten(1).numpy(), train.labels.numpy()
    )
    expected = reference.score(test.images.flatten(1).numpy(), test.labels.numpy())
    assert 0.2 < expected < 1.0
    assert ours == pytest.approx(expected, abs=1e-9)


def test_knn_accuracy_weighted_vote_known_answer():
    class Points(torch.utils.data.Dataset):
        def __init__(self, points, labels):
            self.images = torch.tensor(points, dtype=torch.float).view(-1, 2, 1, 1)
            self.labels = torch.tensor(labels)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"image": self.images[i], "label": int(self.labels[i])}

    # Query at angle 0: one class-0 neighbour at angle 0.1 and two class-1 ones at 0.5.
    angles = [0.1, 0.5, -0.5]
    bank = Points([[math.cos(a), math.sin(a)] for a in angles], [0, 1, 1])
    query = Points([[1.0, 0.0]], [0])
    # t = 0.05: exp(cos/t) makes the closest one dominate; t = 10: the majority wins.
    assert knn_accuracy(Fixed(), bank, query, k=3, temperature=0.05) == 1.0
    assert knn_accuracy(Fixed(), bank, query, k=3, temperature=10.0) == 0.0


def test_recall_at_k_matches_brute_force_and_pml_precision_at_1():
    data = ToyShapes(noise=5.0, per_class=6)
    result = recall_at_k(Fixed(), data, ks=(1, 2, 4, 8))
    emb = data.images.flatten(1).numpy()
    neighbours = NearestNeighbors(n_neighbors=9, metric="cosine").fit(emb)
    _, idx = neighbours.kneighbors(emb)
    idx = idx[:, 1:]  # leave-one-out: drop the query itself
    labels = data.labels.numpy()
    for k in (1, 2, 4, 8):
        expected = (labels[idx[:, :k]] == labels[:, None]).any(axis=1).mean()
        assert result[f"recall@{k}"] == pytest.approx(expected, abs=1e-9)
    assert 0.1 < result["recall@1"] < result["recall@8"] <= 1.0
    assert result["precision_at_1"] == pytest.approx(result["recall@1"], abs=1e-6)
    gallery = ToyShapes(noise=5.0, per_class=6, seed=1)
    separate = recall_at_k(Fixed(), data, gallery, ks=(1,))
    g = gallery.images.flatten(1).numpy()
    _, idx = NearestNeighbors(n_neighbors=1, metric="cosine").fit(g).kneighbors(emb)
    assert separate["recall@1"] == pytest.approx(
        (gallery.labels.numpy()[idx[:, 0]] == labels).mean()
    )
    with pytest.raises(FamBenchError, match="exclude_self"):
        recall_at_k(Fixed(), data, gallery, exclude_self=True)


def test_monitor_logs_the_task_metric_during_training():
    train, val = ToyShapes(), ToyShapes(seed=1)
    module, trainer = fit(
        _toy_conv4(),
        train,
        _family("contrastive", {"monitor_every": 2, "projection_dim": 8, "knn_k": 3}),
        {"max_steps": 4, "batch_size": 16, **CPU},
        val_set=val,
    )
    assert [step for step, _ in module.monitor_history] == [2, 4]
    assert all(0.0 <= value <= 1.0 for _, value in module.monitor_history)
    assert "val_knn_accuracy" in trainer.callback_metrics


# ---------------------------------------------------------------- quality on the synthetic data


@pytest.mark.slow
def test_protonet_conv4_reaches_70_percent_on_synthetic_test_classes():
    from experiments.data import SyntheticShapes

    # 5-query training episodes and 40 images per class keep this near a minute on 2 cores;
    # the standard 15-query episodes reach about the same accuracy.
    train = SyntheticShapes("train", image_size=32, images_per_class=40, seed=0)
    test = SyntheticShapes("test", image_size=32, images_per_class=30, seed=0)
    torch.manual_seed(0)
    model = build_model("conv4", pools=[True, True, False, False])
    model = train_or_load(
        model,
        train,
        _family("fewshot", {"train_way": 5, "train_shot": 5, "train_query": 5}),
        {"max_steps": 200, **CPU},
        None,
        None,
        {},
        seed=0,
    )
    sampler = _episodes(test.labels, 5, 5, 15, 150, seed=1)
    result = episode_accuracy(model, test, sampler, _protonet("euclidean"))
    assert result["mean"] >= 0.70, result


def test_training_imports_no_task_family():
    """experiments.training keeps what every family shares; a family is passed in as an
    object, so importing training loads no family (nor the runner's builders)."""
    code = (
        "import sys, experiments.training; "
        "print([m for m in sys.modules if m.startswith('experiments.tasks') "
        "or m in ('experiments.builders', 'experiments.pipeline')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
