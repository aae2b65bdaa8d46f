"""Ties carry no information, on the default run (issue 25).

The default experiment (its shipped 30-step model checkpoint, 5 episodes x 5 ways x 2
queries = 50 queries) with the ``constant`` method beside the ``random`` floor: under the
default ``metric.ties=smooth`` the constant map's deletion and insertion AUCs equal the
floor's on every query (its tied pixels follow the random method's field), so it does not
beat the floor (paired, p > 0.05).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.reporting.tables import build_leaderboard
from experiments import pipeline
from experiments.config import compose_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def default_run(tmp_path: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose_config(
        [
            f"model.checkpoint={FIXTURES / 'default_small_model.pt'}",
            f"cache_dir={tmp_path / 'cache'}",
            "eval.progress=false",
            "eval.figure_samples=0",
            "trainer.accelerator=cpu",
            "methods=[fam,random,constant]",
            "metrics=[deletion_auc,insertion_auc]",
            *overrides,
        ]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    return pd.read_csv(out / "results.csv")


def constant_vs_random(results: pd.DataFrame) -> pd.Series:
    board = build_leaderboard(results, reference="random")
    return board[(board["method"] == "constant") & (board["metric"] == "deletion_auc")].iloc[0]


@pytest.mark.slow
def test_a_constant_map_scores_as_random_on_the_default_run(tmp_path):
    smooth = default_run(tmp_path / "smooth")
    assert len(smooth[smooth["method"] == "constant"]) == 50
    assert smooth.loc[smooth["method"] == "constant", "degenerate"].all()
    wide = smooth.pivot(index="sample_id", columns="method")
    for metric in ("deletion_auc", "insertion_auc"):
        np.testing.assert_allclose(
            wide[(metric, "constant")], wide[(metric, "random")], rtol=0, atol=1e-6
        )
    row = constant_vs_random(smooth)
    assert row["p_value"] > 0.05 and row["versus"] != "better"
