"""A few-shot algorithm added from outside through the single entry point,
``experiments.tasks.fewshot.register_algorithm``, and run end to end.

The toy algorithm (cosine to the class prototype, softmax at a fixed scale) lives in this
file only: its classifier, its own training module and its own option check. It is
registered by the ``toy`` fixture and unregistered afterwards, so no other test sees it.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_user_errors import TINY
from torch import Tensor

from experiments import config, pipeline
from experiments.tasks import family_for
from experiments.tasks.fewshot import (
    ALGORITHMS,
    EpisodeClassifier,
    FewShotAlgorithm,
    register_algorithm,
)
from experiments.tasks.fewshot.algorithm import split_episode
from experiments.training.base import TaskModule
from fam.errors import FamBenchError
from fam.similarity import pairwise

SCALE = 5.0
NAME = "toy_cosine_prototype"


class CosinePrototypeModule(TaskModule):
    """Episodic cross-entropy over ``SCALE * cos(query, prototype)``."""

    def __init__(self, model, n_way, n_shot, n_query, **optim) -> None:
        super().__init__(model, **optim)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.steps = 0

    def loss(self, images: Tensor) -> Tensor:
        self.steps += 1
        emb = self.model(self.images(images)).float()
        support, query = split_episode(emb, self.n_way, self.n_shot, self.n_query)
        prototypes = support.view(self.n_way, self.n_shot, -1).mean(1)
        target = torch.arange(self.n_way, device=emb.device).repeat_interleave(self.n_query)
        return F.cross_entropy(SCALE * pairwise("cosine", query, prototypes), target)


class CosinePrototype(FewShotAlgorithm):
    """Nearest prototype by cosine; probabilities ``softmax(SCALE * cos)``."""

    name = NAME
    similarity_name = "cosine"
    score_label = "class probability (softmax of 5 cos)"
    modules: list[CosinePrototypeModule] = []

    @classmethod
    def check_options(cls, config):
        if config.train_shot < 2:
            raise FamBenchError(
                f"{NAME} averages at least two shots: set task.train_shot >= 2, got "
                f"{config.train_shot}."
            )

    def training_module(self, model, train_set, optim):
        c = self.config
        module = CosinePrototypeModule(model, c.train_way, c.train_shot, c.train_query, **optim)
        CosinePrototype.modules.append(module)
        return module

    def classifier(self, support, n_way, n_shot):
        prototypes = support.view(n_way, n_shot, -1).mean(1)
        return EpisodeClassifier(
            prototypes,
            "cosine",
            lambda emb: torch.softmax(SCALE * pairwise("cosine", emb, prototypes), dim=1),
        )


@pytest.fixture
def toy():
    saved = dict(ALGORITHMS)
    CosinePrototype.modules.clear()
    register_algorithm(CosinePrototype)
    yield CosinePrototype
    ALGORITHMS.clear()
    ALGORITHMS.update(saved)
    CosinePrototype.modules.clear()


def _cfg(tmp_path, *extra: str):
    return config.compose_config(
        [*TINY, f"task.algorithm={NAME}", "eval.num_episodes=2", f"cache_dir={tmp_path}", *extra]
    )


@pytest.mark.slow
def test_a_registered_algorithm_trains_and_is_explained_end_to_end(toy, tmp_path):
    out = pipeline.run(_cfg(tmp_path / "cache"), tmp_path / "run")["out"]
    # its own training module trained the model, one loss per step
    assert len(toy.modules) == 1 and toy.modules[0].steps == 2
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"fam", "center"}
    assert set(results["task"]) == {"fewshot"}
    for _, rows in results.groupby("method"):  # 2 episodes x 3 ways x 1 query
        assert sorted(rows["sample_id"]) == list(range(6))
        assert sorted(set(rows["episode"])) == [0, 1]
    assert results["pointing_game"].isin([0.0, 1.0]).all()
    metrics = pd.read_csv(out / "task_metrics.csv").set_index("metric")["value"]
    assert metrics["episodes"] == 2
    # the accuracy of the toy classifier (embedded once, episode by episode) equals the
    # share of queries the evaluation units found correct (the same rule on the images;
    # per-episode accuracies are float32)
    correct = results[results["method"] == "fam"].set_index("sample_id")["correct"]
    assert metrics["fewshot_accuracy"] == pytest.approx(correct.astype(float).mean(), abs=1e-6)
    assert 0.0 <= metrics["fewshot_accuracy"] <= 1.0
    assert set(results["predicted_label"]) <= set(results["label"])  # episode classes


def test_its_option_check_fails_before_anything_runs(toy, tmp_path):
    with pytest.raises(FamBenchError, match=rf"{NAME} averages at least two shots.*got 1"):
        pipeline.run(_cfg(tmp_path / "cache", "task.train_shot=1"), tmp_path / "run")
    assert not list(tmp_path.rglob("*.pt"))  # nothing trained
    # the family's shared rule covers it too: keys it does not read are refused
    with pytest.raises(FamBenchError, match=rf"{NAME} does not read task.relation_hidden=32"):
        family_for({"name": "fewshot", "algorithm": NAME, "relation_hidden": 32})


def test_it_is_found_by_name_and_by_dotted_path_and_only_while_registered(toy):
    family = family_for({"name": "fewshot", "algorithm": NAME})
    assert type(family.algorithm) is CosinePrototype
    dotted = family_for({"name": "fewshot", "algorithm": f"{__name__}.CosinePrototype"})
    assert type(dotted.algorithm) is CosinePrototype
    with pytest.raises(FamBenchError, match="not a FewShotAlgorithm subclass"):
        family_for({"name": "fewshot", "algorithm": f"{__name__}.CosinePrototypeModule"})
    with pytest.raises(TypeError, match="FewShotAlgorithm"):
        register_algorithm(CosinePrototypeModule)


def test_the_toy_is_gone_after_its_fixture():
    assert NAME not in ALGORITHMS
    with pytest.raises(FamBenchError, match="task.algorithm must be one of"):
        family_for({"name": "fewshot", "algorithm": NAME})
