"""Meaningless runs warn loudly (warnings.json) without changing the exit code."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
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


TINY = [
    "data.image_size=16",
    "model.options.hidden=8",
    "data.options.images_per_class=6",
    "trainer.max_steps=2",
    "task.train_way=3",
    "task.train_shot=2",
    "task.train_query=2",
    "eval.num_episodes=1",
    "eval.n_way=3",
    "eval.n_shot=2",
    "eval.n_query=2",
    "methods=[fam,gradcam]",
    "metrics=[pointing_game]",
    "trainer.accelerator=cpu",
    "eval.progress=false",
]


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
    monkeypatch.setattr(builders, "build_network", lambda run: NaNNet())
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}"])
    with pytest.raises(FamBenchError, match="non-finite embeddings"):
        pipeline.run(cfg, tmp_path / "run")
