"""A new task family, metric and method, each added with exactly the files docs/extending.md names.

- method: one module (an ``Explainer`` subclass) + ``method/<name>.yaml`` in the user's own
  config directory (``hydra.searchpath=[file://DIR]``);
- metric: one module + one ``register(MetricSpec(...))`` call;
- task family: a task module (``TaskFamily`` subclass), a training module (its
  LightningModule) and ``task/<name>.yaml`` (``family: <dotted path>``).

All three are written to a temporary folder by the test, none into the repository.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from evaluation import registry
from experiments import config, pipeline, tasks

METHOD_MODULE = '''
import torch
from fam import Explainer


class BoxMap(Explainer):
    """A ``size`` x ``size`` square of ones in the top-left corner (at image resolution)."""

    def __init__(self, model, target_layer=None, *, size: int = 2):
        super().__init__(model, target_layer)
        self.size = size

    def raw_maps(self, images, target):
        maps = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        maps[:, : self.size, : self.size] = 1.0
        return maps
'''

METHOD_YAML = """
# a test plugin: a corner square
_target_: plugin_method.BoxMap
size: 2
"""

METRIC_MODULE = """
from evaluation.registry import MetricSpec, register


def map_mean(inputs):
    return {"map_mean": inputs.maps.mean(dim=(1, 2))}


register(MetricSpec("map_mean", "lower", "mean map value (sparsity)", map_mean))
"""

TRAINING_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn

from experiments.training.base import TaskModule


class CentroidModule(TaskModule):
    """Cross-entropy over scaled cosine similarities to learned class proxies."""

    def __init__(self, model, embedding_dim, num_classes, **optim):
        super().__init__(model, **optim)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim))

    def loss(self, batch):
        images, labels = batch
        emb = F.normalize(self.model(images).float(), dim=1)
        logits = 10.0 * emb @ F.normalize(self.proxies, dim=1).T
        return F.cross_entropy(logits, labels)
'''

TASK_MODULE = '''
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from experiments.embedding import embed
from experiments.tasks import TaskEvaluation, TaskFamily, Unit, query_order, stack_items
from experiments.training.batches import IndexedBatches, labels_of, pass_through
from fam.similarity import cosine


@dataclass
class CentroidConfig:
    name: str = "centroid"
    similarity: str = "cosine"


class CentroidFamily(TaskFamily):
    """Explain a test image against its class centroid of training embeddings."""

    name = "centroid"
    Config = CentroidConfig

    def training_module(self, model, train_set, optim):
        from plugin_training import CentroidModule

        dim = embed(model, train_set, torch.arange(1)).shape[1]
        classes = int(labels_of(train_set).max()) + 1
        return CentroidModule(model, dim, classes, **optim)

    def train_loader(self, train_set, trainer, seed):
        return DataLoader(
            IndexedBatches(train_set), batch_size=trainer.batch_size, shuffle=True,
            collate_fn=pass_through, drop_last=True,
        )

    def evaluation(self, run, train_set, eval_set, model, device):
        return CentroidEvaluation(run, train_set, eval_set, model)


class CentroidEvaluation(TaskEvaluation):
    similarity = "cosine"
    score_label = "cosine similarity to the class centroid"

    def __init__(self, run, train_set, eval_set, model):
        # the centroid task keeps the split's own classes: train and test share them here
        self.eval_set, self.unit_size = eval_set, run.eval.unit_size
        self.queries = query_order(len(eval_set), run.eval.num_queries, run.seed)
        emb = embed(model, eval_set)
        labels = labels_of(eval_set).to(emb.device)
        self.centroids = torch.stack([emb[labels == c].mean(0) for c in labels.unique()])
        self.classes = labels.unique()

    @property
    def num_units(self):
        return -(-len(self.queries) // self.unit_size)

    @property
    def confidence_available(self):
        return True

    def unit(self, u, model, device):
        ids = self.queries[u * self.unit_size : (u + 1) * self.unit_size].tolist()
        images, masks, labels = stack_items(self.eval_set, ids, device)
        row = torch.searchsorted(self.classes, torch.tensor(labels, device=self.classes.device))
        reference = self.centroids[row]

        def score(x, index):
            return cosine(model(x).float(), reference[index])

        return Unit(
            unit=u, images=images, reference=reference, score_fn=score,
            confidence_fn=lambda x, i: score(x, i).clamp_min(0),
            reference_fn=lambda net: reference, similarity="cosine", masks=masks,
            columns={"sample_id": ids, "episode": [u] * len(ids), "index": ids,
                     "label": labels, "correct": [True] * len(ids)},
        )

    def task_metrics(self, model):
        emb = embed(model, self.eval_set)
        labels = labels_of(self.eval_set).to(emb.device)
        sims = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(
            self.centroids, dim=1
        ).T
        return {"centroid_accuracy": float((self.classes[sims.argmax(1)] == labels).float().mean())}
'''

TASK_YAML = """
# a test plugin: nearest class centroid, cosine
name: centroid
family: plugin_task.CentroidFamily
similarity: cosine
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The five plugin files (two modules + method YAML, one module, two modules + task
    YAML) in a temporary folder; registries restored afterwards."""
    code = tmp_path / "code"
    conf = tmp_path / "my_conf"
    (conf / "method").mkdir(parents=True)
    (conf / "task").mkdir(parents=True)
    code.mkdir()
    files = {
        code / "plugin_method.py": METHOD_MODULE,
        conf / "method" / "boxmap.yaml": METHOD_YAML,
        code / "plugin_metric.py": METRIC_MODULE,
        code / "plugin_task.py": TASK_MODULE,
        code / "plugin_training.py": TRAINING_MODULE,
        conf / "task" / "centroid.yaml": TASK_YAML,
    }
    for path, text in files.items():
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(code))
    metrics, families = dict(registry.METRICS), dict(tasks.TASKS)
    import plugin_metric  # noqa: F401 - registers the metric

    yield conf
    registry.METRICS.clear()
    registry.METRICS.update(metrics)
    tasks.TASKS.clear()
    tasks.TASKS.update(families)


def overrides(conf: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"hydra.searchpath=[file://{conf}]",
        f"cache_dir={cache}",
        "~experiment",
        "task=centroid",
        "model=conv4_32",
        "data.image_size=16",
        "model.options.hidden=8",
        "data.options.images_per_class=4",
        "data.eval_split=train",
        "trainer.max_steps=3",
        "trainer.batch_size=16",
        "trainer.accelerator=cpu",
        "eval.num_queries=6",
        "eval.unit_size=3",
        "eval.progress=false",
        "methods=[fam,boxmap]",
        "metrics=[deletion_auc,pointing_game,map_mean]",
        *extra,
    ]


@pytest.mark.slow
def test_a_plugin_task_family_metric_and_method_run_end_to_end(plugins, tmp_path):
    cfg = config.compose_config(overrides(plugins, tmp_path / "cache"))
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    results = pd.read_csv(out / "results.csv")
    assert set(results["task"]) == {"centroid"} and set(results["method"]) == {"fam", "boxmap"}
    assert len(results) == 2 * 6
    box = results[results.method == "boxmap"]
    # the plugin metric on the plugin method: a 2x2 square of ones on a 16x16 map
    assert box["map_mean"].tolist() == pytest.approx([4 / 256] * 6)
    assert results["pointing_game"].isin([0.0, 1.0]).all()
    summary = pd.read_csv(out / "summary.csv")
    assert "map_mean" in set(summary["metric"])
    task_metrics = pd.read_csv(out / "task_metrics.csv").set_index("metric")
    assert 0 <= task_metrics.loc["centroid_accuracy", "value"] <= 1

    # the plugin method's option is config: it changes its maps and its settings_id only
    cfg = config.compose_config(overrides(plugins, tmp_path / "cache", "method.boxmap.size=4"))
    out2 = pipeline.run(cfg, tmp_path / "run2")["out"]
    again = pd.read_csv(out2 / "results.csv")
    assert again.loc[again.method == "boxmap", "map_mean"].tolist() == pytest.approx([16 / 256] * 6)
    ids = results.groupby("method")["settings_id"].first()
    ids2 = again.groupby("method")["settings_id"].first()
    assert ids["fam"] == ids2["fam"] and ids["boxmap"] != ids2["boxmap"]
    options = json.loads(again.loc[again.method == "boxmap", "method_options"].iloc[0])
    assert options["size"] == 4
    assert json.loads((out2 / "settings.json").read_text())["methods"]["boxmap"]["size"] == 4
