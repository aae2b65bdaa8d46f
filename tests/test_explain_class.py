"""Each protocol explains the class its source explains (issue 25).

RISE's deletion/insertion and Grad-CAM++'s Average Drop explain the model's prediction;
TorchRay's pointing game the ground-truth class. On the default few-shot experiment (its
shipped 30-step checkpoint, 2 episodes = 20 queries, several misclassified) three runs:
the default (each metric its source's class), and every metric forced to ``predicted``
and to ``true``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.registry import explained_classes
from experiments import pipeline
from experiments.config import compose_config
from fam.errors import FamBenchError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run(tmp_path: Path, *overrides: str) -> tuple[pd.DataFrame, dict, Path]:
    cfg = compose_config(
        [
            f"model.checkpoint={FIXTURES / 'default_small_model.pt'}",
            f"cache_dir={tmp_path / 'cache'}",
            "eval.num_episodes=2",
            "eval.progress=false",
            "eval.figure_samples=0",
            "trainer.accelerator=cpu",
            "methods=[fam]",
            "metrics=[deletion_auc,pointing_game]",
            *overrides,
        ]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    curves = dict(np.load(out / "curves.npz"))
    results = pd.read_csv(out / "results.csv").set_index("sample_id").sort_index()
    return results, curves, out


@pytest.mark.slow
def test_deletion_explains_the_prediction_and_the_pointing_game_the_label(tmp_path):
    default, _, out = run(tmp_path / "default")
    predicted, predicted_curves, _ = run(tmp_path / "p", "metric.explain_class=predicted")
    true, true_curves, _ = run(tmp_path / "t", "metric.explain_class=true")
    wrong = ~default["correct"].astype(bool)
    assert 0 < wrong.sum() < len(default)
    assert (default.loc[wrong, "predicted_label"] != default.loc[wrong, "label"]).all()
    assert (default.loc[~wrong, "predicted_label"] == default.loc[~wrong, "label"]).all()
    assert json.loads(default["explained_class"].iloc[0]) == {
        "deletion_auc": "predicted",
        "pointing_game": "true",
    }
    # the default takes deletion from the predicted class, the pointing game from the label
    np.testing.assert_array_equal(default["deletion_auc"], predicted["deletion_auc"])
    np.testing.assert_array_equal(default["pointing_game"], true["pointing_game"])
    # where the two classes agree, the map of the second pass is not needed: same numbers
    np.testing.assert_allclose(
        predicted.loc[~wrong, "deletion_auc"], true.loc[~wrong, "deletion_auc"], rtol=0, atol=1e-6
    )
    assert (predicted.loc[wrong, "deletion_auc"] != true.loc[wrong, "deletion_auc"]).all()
    # the first deletion point is the unperturbed query's probability of the explained
    # class: the model's own top class (above 1/5) when it explains the prediction, lower
    # than that when it explains a label the model got wrong
    order = list(predicted_curves["sample_id"])
    rows = [order.index(s) for s in default.index[wrong]]
    p_first = predicted_curves["fam/deletion"][rows, 0]
    t_first = true_curves["fam/deletion"][rows, 0]
    assert (p_first > t_first).all() and (p_first > 0.2).all()
    # the run also summarises correct and misclassified queries apart
    split = pd.read_csv(out / "summary_by_correct.csv")
    row = split[(split["metric"] == "deletion_auc") & ~split["correct"].astype(bool)].iloc[0]
    assert row["n"] == wrong.sum()
    assert row["mean"] == pytest.approx(default.loc[wrong, "deletion_auc"].mean())


def test_tasks_whose_reference_is_the_decision_explain_the_prediction_everywhere():
    both = ("true", "predicted")
    assert explained_classes(["deletion_auc", "pointing_game", "average_drop"], None, both) == {
        "deletion_auc": "predicted",
        "pointing_game": "true",
        "average_drop": "predicted",
    }
    assert set(explained_classes(["pointing_game"], None, ("predicted",)).values()) == {"predicted"}
    with pytest.raises(FamBenchError, match="metric.explain_class=true is not available"):
        explained_classes(["pointing_game"], "true", ("predicted",))
