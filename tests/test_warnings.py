"""Meaningless runs warn loudly (warnings.json) without changing the exit code."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny
from torch import nn

from experiments import builders, config, pipeline
from experiments.checks import run_warnings
from fam.errors import FamBenchError


def frame(method: str, n: int, degenerate: int, nan: int) -> pd.DataFrame:
    values = np.linspace(0.1, 0.9, n)
    values[:nan] = np.nan
    return pd.DataFrame(
        {
            "method": method,
            "deletion_auc": values,
            "degenerate": [True] * degenerate + [False] * (n - degenerate),
            "degenerate_reason": ["constant"] * degenerate + [""] * (n - degenerate),
        }
    )


def codes(warnings: list[dict]) -> list[tuple]:
    return sorted((w["code"], w.get("method"), w.get("metric")) for w in warnings)


def test_each_warning_fires_exactly_past_its_threshold():
    results = pd.concat(
        [frame("ok", 20, degenerate=10, nan=2), frame("bad", 20, degenerate=11, nan=3)]
    )
    task = pd.DataFrame({"metric": ["fewshot_accuracy"], "value": [0.21]})
    got = run_warnings(results, task, chance=0.2, target_shape=(2, 2))
    assert codes(got) == [
        ("degenerate_maps", "bad", None),  # 11/20 > half; 10/20 is not
        ("excluded_samples", "bad", "deletion_auc"),  # 3/20 > 10%; 2/20 is not
        ("near_chance", None, None),  # 0.21 <= 0.2 + 0.02
        ("small_target_layer", None, None),  # 2x2 < 3x3
    ]
    fine = pd.DataFrame({"metric": ["fewshot_accuracy"], "value": [0.23]})
    assert run_warnings(frame("ok", 20, 0, 0), fine, chance=0.2, target_shape=(3, 3)) == []
    # an encoder no better than its own re-initialisation (collapsed or untrained)
    knn = pd.DataFrame(
        {"metric": ["knn20_accuracy", "linear_probe_accuracy"], "value": [0.64, 0.80]}
    )
    for untrained, fires in (([0.62, 0.70], True), ([0.61, 0.70], False), ([0.5, 0.9], True)):
        task = knn.assign(untrained=untrained)
        got = run_warnings(frame("ok", 20, 0, 0), task, chance=0.1, target_shape=(3, 3))
        assert codes(got) == ([("not_above_untrained", None, None)] if fires else []), untrained
        if fires:
            assert "knn20" in got[0]["message"] or "linear_probe" in got[0]["message"]
    nan = knn.assign(untrained=[float("nan")] * 2)  # no baseline (a module without reset)
    assert run_warnings(frame("ok", 20, 0, 0), nan, chance=0.1, target_shape=(3, 3)) == []


TINY = tiny("eval.n_query=2", "methods=[fam,gradcam]", drop=["trainer.batch_size"])


@pytest.mark.slow
def test_a_one_by_one_target_layer_finishes_with_warnings(tmp_path):
    # Conv-4 with four pools at 16 px leaves a 1x1 map: every map is constant
    cfg = config.compose_config(
        [*TINY, "model.options.pools=[true,true,true,true]", f"cache_dir={tmp_path}"]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    warnings = json.loads((out / "warnings.json").read_text())
    found = {(w["code"], w.get("method")) for w in warnings}
    assert ("small_target_layer", None) in found
    assert ("degenerate_maps", "fam") in found and ("degenerate_maps", "gradcam") in found


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        self.default_target_layer = "encoder.0"

    def forward(self, x):
        return self.encoder(x).mean((2, 3)) * torch.tensor(float("nan"))


def test_a_model_with_non_finite_embeddings_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "build_network", lambda run, checkpoint=None: NaNNet())
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}"])
    with pytest.raises(FamBenchError, match="non-finite embeddings"):
        pipeline.run(cfg, tmp_path / "run")


def test_the_untrained_baseline_scores_a_reinitialised_copy_and_leaves_the_model_alone():
    class Stub:
        def task_metrics(self, net: nn.Module) -> dict[str, float]:
            return {"weight_sum": float(sum(p.sum() for p in net.parameters()))}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # "trained": far from any initialisation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    notes: list[str] = []
    rng = torch.get_rng_state()
    first = pipeline.untrained_task_metrics(Stub(), model, seed=3, notes=notes)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert first["weight_sum"] != Stub().task_metrics(model)["weight_sum"] and notes == []
    assert pipeline.untrained_task_metrics(Stub(), model, seed=3, notes=notes) == first

    class Scale(nn.Module):  # parameters but no reset_parameters()
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(2))

    odd = nn.Sequential(nn.Linear(2, 2), Scale())
    assert pipeline.untrained_task_metrics(Stub(), odd, seed=0, notes=notes) == {}
    assert len(notes) == 1 and "no untrained baseline" in notes[0] and "Scale" in notes[0]


def hits(share: float, n: int = 1000) -> list[float]:
    k = round(share * n)
    return [1.0] * k + [0.0] * (n - k)


@pytest.mark.parametrize(
    ("centre", "fires"),
    [(0.978, True), (0.967, True), (0.918, True), (0.916, False), (0.5, False)],
)
def test_the_centre_prior_warns_within_5_points_of_the_best_method_or_above(centre, fires):
    # the numbers: centre 0.978 against FAM 0.967 at the default tolerance, 48 px;
    # the oracle (mask) and the random floor are not "the best method"
    shares = {"fam": 0.967, "gradcam": 0.8, "random": 0.99, "mask": 1.0, "center": centre}
    results = pd.concat(
        [
            pd.DataFrame({"method": m, "pointing_game": hits(s), "degenerate": False})
            for m, s in shares.items()
        ]
    ).assign(degenerate_reason="")
    fine = pd.DataFrame({"metric": ["fewshot_accuracy"], "value": [0.9]})
    got = [w for w in run_warnings(results, fine, 0.2, (4, 4)) if w["code"] == "centre_prior"]
    assert len(got) == int(fires)
    if fires:
        assert "metric.tolerance" in got[0]["message"] and "fam 0.967" in got[0]["message"]


def test_relevance_not_conserved_is_recorded_naming_model_and_layer(tmp_path, monkeypatch):
    from test_relevance_conservation import PlainResNet

    def network(run, checkpoint=None):
        torch.manual_seed(0)
        model = PlainResNet()
        model.default_target_layer = "block1"  # below a residual '+' no canonizer knows
        return model

    monkeypatch.setattr(builders, "build_network", network)
    cfg = config.compose_config(
        [
            *(o for o in TINY if not o.startswith("methods=")),
            "methods=[relevancecam]",
            "method.relevancecam.composite=zplus",
            f"cache_dir={tmp_path}",
        ]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    warnings = json.loads((out / "warnings.json").read_text())
    found = [w for w in warnings if w["code"] == "relevance_not_conserved"]
    assert len(found) == 1
    (warning,) = found
    assert warning["method"] == "relevancecam" and warning["layer"] == "block1"
    assert warning["model"] in warning["message"] and "'block1'" in warning["message"]
    results = pd.read_csv(out / "results.csv")
    assert sorted(warning["samples"]) == sorted(results["sample_id"].tolist())
    assert all(r > 1.05 for r in warning["ratios"])
