"""The embedded retrieval and contrastive experiments: they train and run end to end, the
probability score separates the ground truth from random, maps depend on the reference; a
contrastive algorithm registered from test code (``register_algorithm``) runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from baselines import MaskOracle, ScoreCAM
from evaluation.plain import plain
from evaluation.pointing import pointing_game
from evaluation.stats import wilcoxon
from experiments import builders, config, pipeline
from experiments.config import compose_config
from experiments.models import build_model
from experiments.tasks import family_for
from experiments.tasks.neighbour import (
    ALGORITHMS,
    Contrastive,
    ContrastiveConfig,
    ContrastiveModule,
    register_algorithm,
)
from experiments.tasks.neighbour.holdout import Subset, holdout_split
from experiments.tasks.neighbour.task_metrics import linear_probe_accuracy
from fam.errors import FamBenchError

pytestmark = pytest.mark.slow

# Reduced settings: fewer queries (and SimCLR training steps) than the experiment files,
# the same model, data and protocol. Retrieval keeps its 700 steps (at 150 FAM's pointing
# game was 0.19, random 0.03; at 300 0.75; Recall@1 reaches 0.6 near 600).
RETRIEVAL = [
    "experiment=synthetic_retrieval",
    "eval.num_queries=32",
    "eval.figure_samples=2",
]
SIMCLR = [
    "experiment=synthetic_simclr",
    "trainer.max_steps=100",
    "eval.num_queries=32",
    "eval.figure_samples=2",
]
METHODS = "methods=[fam,scorecam,random,mask]"
CAUSAL = "metrics=[deletion_auc,insertion_auc,pointing_game]"


def compose(cache: Path, *overrides: str):
    return compose_config(
        [f"cache_dir={cache}", "trainer.accelerator=cpu", "eval.progress=false", *overrides]
    )


def means(result: dict, metric: str) -> pd.Series:
    return result["results"].groupby("method")[metric].mean()


def task_metrics(out: Path, column: str = "value") -> dict[str, float]:
    frame = pd.read_csv(out / "task_metrics.csv")
    return dict(zip(frame["metric"], frame[column], strict=True))


def warning_codes(out: Path) -> set[str]:
    return {w["code"] for w in json.loads((out / "warnings.json").read_text())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def retrieval(cache, tmp_path_factory) -> dict[str, dict]:
    """The reduced retrieval run under both scores (one trained model)."""
    return {
        score: pipeline.run(
            compose(cache, *RETRIEVAL, METHODS, CAUSAL, f"metric.score={score}"),
            tmp_path_factory.mktemp(f"retrieval-{score}"),
        )
        for score in ("probability", "similarity")
    }


@pytest.fixture(scope="module")
def simclr(cache, tmp_path_factory) -> dict:
    return pipeline.run(compose(cache, *SIMCLR, METHODS, CAUSAL), tmp_path_factory.mktemp("simclr"))


def test_synthetic_retrieval_trains_and_runs_end_to_end(retrieval):
    result = retrieval["probability"]
    # the full 700 training steps: Recall@1 0.6445 measured (untrained Conv-4: 0.12)
    assert task_metrics(result["out"])["recall@1"] >= 0.6
    # the same network re-initialised, scored beside it (eval.untrained_baseline)
    untrained = task_metrics(result["out"], "untrained")
    assert 0 < untrained["recall@1"] < 0.3 and untrained["recall@8"] < 0.7
    assert "not_above_untrained" not in warning_codes(result["out"])
    results = result["results"]
    assert len(results) == 32 * 4
    assert results[["deletion_auc", "insertion_auc"]].stack().between(0, 1).all()
    # maps.png shows the retrieved gallery image beside the query
    figure = result["figure"]
    assert figure["references"] is not None
    assert figure["references"].shape == figure["images"].shape


def test_synthetic_simclr_trains_and_reports_knn_and_linear_probe(simclr, cache):
    metrics = task_metrics(simclr["out"])
    # 10 classes, chance 0.1. Measured at these 100 steps (background swap 0.5): kNN 0.76,
    # probe 0.775 (without the swap: 0.68 / 0.795). Colour alone separates much of these
    # classes: an untrained Conv-4 scores kNN 0.62 and probe 0.73, so both must also beat
    # the untrained network on the same images.
    assert metrics["knn20_accuracy"] >= 0.7
    assert metrics["linear_probe_accuracy"] >= 0.75
    run_cfg = config.load(compose(cache, *SIMCLR))
    family = family_for(run_cfg.task)
    train_set, _ = builders.build_datasets(run_cfg.data, run_cfg.name)
    bank, held_out = holdout_split(train_set, family.config.holdout_per_class)
    torch.manual_seed(0)
    untrained = build_model("conv4", hidden=64, pools=[True, True, False, False], pooling="gap")
    baseline = linear_probe_accuracy(
        untrained, Subset(train_set, bank), Subset(train_set, held_out)
    )
    assert metrics["linear_probe_accuracy"] >= baseline + 0.02, baseline
    # the run's own untrained column: another draw of the same random network
    untrained = task_metrics(simclr["out"], "untrained")
    assert abs(untrained["linear_probe_accuracy"] - baseline) < 0.1, (untrained, baseline)
    assert metrics["linear_probe_accuracy"] >= untrained["linear_probe_accuracy"] + 0.02
    assert "not_above_untrained" not in warning_codes(simclr["out"])
    assert simclr["figure"]["references"] is not None
    assert len(simclr["results"]) == 32 * 4


def test_both_scores_rank_the_ground_truth_above_random_on_retrieval(retrieval):
    spreads = {}
    for score, result in retrieval.items():
        deletion, insertion = means(result, "deletion_auc"), means(result, "insertion_auc")
        spreads[score] = (
            deletion["random"] - deletion["mask"],
            insertion["mask"] - insertion["random"],
        )
    # The issue asks the probability to separate them by more than the raw similarity; on
    # this embedded Conv-4 it does not (measured on these 32 queries: probability 0.05
    # deletion / 0.01 insertion, similarity 0.18 / 0.09; issue 10 stays open). What holds,
    # and is pinned: both scores rank the ground truth above random on both curves.
    for score, (deletion_gap, insertion_gap) in spreads.items():
        assert deletion_gap > 0.02 and insertion_gap > 0.005, (score, spreads)
    assert spreads["similarity"][0] > 0.05, spreads


def test_fam_points_far_above_random_on_retrieval(retrieval):
    pointing = means(retrieval["probability"], "pointing_game")
    assert pointing["fam"] >= pointing["random"] + 0.25, pointing
    assert pointing["mask"] == 1.0


def test_the_knn_probability_ranks_the_ground_truth_above_random_on_simclr(simclr):
    """The default contrastive score (the kNN probability of the predicted class, issue 22)
    separates the true object from a random map, paired per query, on both curves; the
    distractor softmax it replaced spread the deletion AUCs by 0.027 only."""
    frame = simclr["results"].pivot(index="sample_id", columns="method")
    deletion = frame["deletion_auc"]["random"] - frame["deletion_auc"]["mask"]
    insertion = frame["insertion_auc"]["mask"] - frame["insertion_auc"]["random"]
    assert deletion.mean() >= 0.1, deletion.mean()
    assert insertion.mean() > 0, insertion.mean()
    for gap in (deletion, insertion):
        assert wilcoxon(gap.to_numpy(), 0 * gap.to_numpy()) < 0.05, gap.describe()


def test_fam_points_above_random_on_simclr(simclr):
    pointing = means(simclr, "pointing_game")
    assert pointing["fam"] >= pointing["random"] + 0.1, pointing
    assert pointing["mask"] == 1.0


def test_the_probability_settings_go_into_settings_id(retrieval):
    ids = {s: r["settings_ids"]["fam"] for s, r in retrieval.items()}
    assert ids["probability"] != ids["similarity"]


def evaluation_of(cache: Path, tmp: Path, *overrides: str):
    """The trained model and the task evaluation of a composed run (model from the cache)."""
    run_cfg = config.load(compose(cache, *overrides))
    family = family_for(run_cfg.task)
    run_cfg.task = plain(family.config)
    device = torch.device("cpu")
    train_set, eval_set = builders.build_datasets(run_cfg.data, run_cfg.name)
    model = pipeline.build_run_model(run_cfg, family, train_set, device, tmp, None, [])
    return model, family.evaluation(run_cfg, train_set, eval_set, model, device), run_cfg


def probability_against(evaluation, unit, reference: torch.Tensor):
    """The unit's task probability with another reference (the unit's distractors)."""
    rows = evaluation.distractor_ids[: len(unit.images)]
    distractors = evaluation.bank_emb[rows]
    temperature = evaluation.temperature

    def score(emb, index):
        own = F.cosine_similarity(emb, reference[index], dim=1)
        others = F.cosine_similarity(emb[:, None], distractors[index], dim=2)
        return torch.softmax(torch.cat([own[:, None], others], 1) / temperature, 1)[:, 0]

    return score


def test_scorecam_maps_change_with_the_reference(retrieval, cache, tmp_path):
    model, evaluation, _ = evaluation_of(cache, tmp_path, *RETRIEVAL)
    unit = evaluation.unit(0, model, torch.device("cpu"))
    labels = torch.tensor(unit.columns["reference_label"])
    # each image against the reference of another sample of another class
    other = torch.tensor([int(torch.nonzero(labels != labels[i])[0]) for i in range(len(labels))])
    scorecam = ScoreCAM(model)
    own = scorecam(unit.images, unit.reference, "cosine", task_score=unit.embedding_score)
    swapped_ref = unit.reference[other]
    swapped = scorecam(
        unit.images,
        swapped_ref,
        "cosine",
        task_score=probability_against(evaluation, unit, swapped_ref),
    )
    corr = F.cosine_similarity(
        (own - own.mean((1, 2), keepdim=True)).flatten(1),
        (swapped - swapped.mean((1, 2), keepdim=True)).flatten(1),
    )
    assert corr.median() < 0.9, corr


def test_on_pairs_explaining_the_other_objects_reference_moves_the_maximum(
    retrieval, cache, tmp_path
):
    model, evaluation, run_cfg = evaluation_of(
        cache, tmp_path, *RETRIEVAL, "experiment=synthetic_retrieval_pairs"
    )
    unit = evaluation.unit(0, model, torch.device("cpu"))
    assert unit.other_masks is not None
    with torch.no_grad():
        emb = F.normalize(model(unit.images), dim=1)
    # the other object's reference: its class's gallery image nearest to the pair image
    gallery = F.normalize(evaluation.bank_emb, dim=1)
    labels = evaluation.bank.labels
    other_ref = []
    for i, b in enumerate(unit.columns["other_label"]):
        sims = (gallery @ emb[i]).masked_fill(labels != b, float("-inf"))
        other_ref.append(evaluation.bank_emb[int(sims.argmax())])
    other_ref = torch.stack(other_ref)
    tol = 15 * run_cfg.data.image_size / 224
    scorecam = ScoreCAM(model)
    own = scorecam(unit.images, unit.reference, "cosine", task_score=unit.embedding_score)
    moved = scorecam(
        unit.images,
        other_ref,
        "cosine",
        task_score=probability_against(evaluation, unit, other_ref),
    )
    on_own = pointing_game(own, unit.masks, tol).mean(), pointing_game(moved, unit.masks, tol)
    on_other = pointing_game(moved, unit.other_masks, tol).mean()
    assert on_other > pointing_game(own, unit.other_masks, tol).mean() + 0.2
    assert on_own[0] > on_own[1].mean() + 0.2


def test_mask_oracle_returns_the_blurred_mask_and_flags_missing_ground_truth():
    from experiments.models.conv4 import Conv4

    model = Conv4(hidden=8, pools=(True, True, False, False)).eval()
    images = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:9, 4:9] = True
    oracle = MaskOracle(model, blur=0.05)
    maps = oracle(images, torch.randn(2, 8), "cosine", masks=masks)
    assert maps.shape == (2, 16, 16)
    assert maps[0].max() == 1.0 and bool(masks[0].flatten()[maps[0].flatten().argmax()])
    assert maps[0][~masks[0]].max() < 1.0  # blurred: the rim ranks below the core
    assert oracle.degenerate.tolist() == [False, True]
    none = oracle(images, torch.randn(2, 8), "cosine")
    assert (none == 0).all() and oracle.degenerate.all()


# --------------------------------------------- a contrastive algorithm added from user code


class ToyInvariance(ContrastiveModule):
    """A toy algorithm: pulls the two views' normalised embeddings together (no negatives,
    no projector; it would collapse if trained long). It takes no queue."""

    algorithm = "toy_invariance"
    steps = 0

    @classmethod
    def check_config(cls, config):
        if config.queue_size != ContrastiveConfig.queue_size:
            raise FamBenchError("task.queue_size does not apply to toy_invariance.")

    @classmethod
    def from_config(cls, model, embedding_dim, config, optim):
        return cls(model, **optim)

    def loss(self, batch):
        view_a, view_b, _ = batch
        type(self).steps += 1
        a = F.normalize(self.model(self.images(view_a)).float(), dim=1)
        b = F.normalize(self.model(self.images(view_b)).float(), dim=1)
        return (1 - (a * b).sum(1)).mean()


@pytest.fixture
def toy_algorithm():
    register_algorithm(ToyInvariance)
    yield ToyInvariance
    del ALGORITHMS[ToyInvariance.algorithm]


def test_a_contrastive_algorithm_registered_from_test_code_runs_end_to_end(toy_algorithm, tmp_path):
    assert isinstance(
        family_for({"name": "contrastive", "algorithm": "toy_invariance"}), Contrastive
    )
    # its own option check runs when the config is built
    with pytest.raises(FamBenchError, match="queue_size does not apply"):
        family_for({"name": "contrastive", "algorithm": "toy_invariance", "queue_size": 16})
    cfg = compose(
        tmp_path / "cache",
        "experiment=synthetic_simclr",
        "task.algorithm=toy_invariance",
        "data.image_size=16",
        "model.options.hidden=8",
        "data.options.images_per_class=8",
        "data.options.max_classes=4",
        "task.holdout_per_class=2",
        "task.knn_k=3",
        "trainer.max_steps=3",
        "trainer.batch_size=8",
        "eval.num_queries=6",
        "eval.unit_size=3",
        "eval.figure_samples=0",
        "methods=[fam,mask]",
    )
    result = pipeline.run(cfg, tmp_path / "run")
    assert toy_algorithm.steps == 3
    assert len(result["results"]) == 6 * 2
    assert {"knn3_accuracy", "linear_probe_accuracy"} <= set(task_metrics(result["out"]))
