"""results.csv-shaped frames and run folders for the summary, leaderboard and report tests.

The columns follow the runner's interface (docs/user-guide.md, "What a run leaves"): one row per
sample x method with ``sample_id, episode, index, label, method, experiment, dataset,
model, task, settings_id, seed, model_id, table_id, method_options``, the metric columns,
``degenerate``, ``degenerate_reason`` and ``correct``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = (
    "deletion_auc",
    "insertion_auc",
    "pointing_game",
    "energy_pointing_game",
    "average_drop",
    "increase_in_confidence",
)
#: per method: (quality in [0, 1], noise); better quality -> better metric values
QUALITY = {"fam": 0.8, "gradcam": 0.5, "eigencam": 0.7, "mask": 0.95, "random": 0.1}


def results_frame(
    methods=("fam", "gradcam", "random"),
    episodes: int = 5,
    per_episode: int = 10,
    seed: int = 0,
    table_id: str = "t1",
    model: str = "conv4_32",
    experiment: str = "synthetic_5way",
    episode_effect: float = 0.0,
    identical: dict[str, str] | None = None,
    options: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """A results frame with plausible metric values; ``identical``: copy -> original method.

    ``episode_effect``: sd of a per-episode shift shared by every sample of an episode.
    ``options``: method label -> (method name, options) via ``{"label": {"method": ...,
    "options": {...}}}``.
    """
    rng = np.random.default_rng(seed)
    n = episodes * per_episode
    shift = np.repeat(rng.normal(0.0, episode_effect, episodes), per_episode)
    base = {}
    rows = []
    entries = list(methods)
    for entry in entries:
        if identical and entry in identical:
            continue
        name = (options or {}).get(entry, {}).get("method", entry)
        q = QUALITY.get(name, 0.5)
        noise = rng.normal(0.0, 0.1, (6, n))
        base[entry] = {
            "deletion_auc": np.clip(0.6 - 0.4 * q + noise[0] + shift, 0, 1),
            "insertion_auc": np.clip(0.4 + 0.4 * q + noise[1] - shift, 0, 1),
            "pointing_game": (rng.random(n) < np.clip(q - shift, 0, 1)).astype(float),
            "energy_pointing_game": np.clip(0.1 + 0.5 * q + noise[3] - shift, 0, 1),
            "average_drop": np.clip(60 - 50 * q + 100 * noise[4], 0, 100),
            "increase_in_confidence": 100.0 * (rng.random(n) < 0.5 * q),
        }
    for copy, original in (identical or {}).items():
        base[copy] = base[original]
    for entry in entries:
        spec = (options or {}).get(entry, {})
        name = spec.get("method", entry)
        opts = json.dumps(spec.get("options", {}), sort_keys=True)
        for i in range(n):
            rows.append(
                dict(
                    sample_id=f"s{seed}-{i}",
                    episode=i // per_episode,
                    index=i % per_episode,
                    label=i % 5,
                    method=name,
                    experiment=experiment,
                    dataset="synthetic",
                    model=model,
                    task="fewshot",
                    settings_id=f"set-{name}-{abs(hash(opts)) % 1000}",
                    seed=seed,
                    model_id=f"m-{table_id}",
                    table_id=table_id,
                    method_options=opts,
                    **{m: base[entry][m][i] for m in METRICS},
                    degenerate=False,
                    degenerate_reason="",
                    correct=True,
                )
            )
    return pd.DataFrame(rows)


def sanity_frame(
    methods=("fam", "gradcam", "random"),
    layers=("encoder.3", "encoder.2", "encoder.1", "encoder.0"),
    samples: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """sanity.csv rows: correlation falls with depth, fastest for ``fam``."""
    rng = np.random.default_rng(seed)
    rows = []
    for method in methods:
        speed = {"fam": 0.25, "gradcam": 0.2, "random": 1.0}.get(method, 0.1)
        for step, layer in enumerate(layers, start=1):
            for sample in range(samples):
                rho = max(-1.0, 1.0 - speed * step) + rng.normal(0, 0.02)
                if method == "random":
                    rho = rng.normal(0, 0.05)
                rows.append(
                    dict(
                        method=method,
                        step=step,
                        layer=layer,
                        sample=sample,
                        spearman=rho,
                        spearman_abs=abs(rho),
                        sample_id=f"s{seed}-{sample}",
                    )
                )
    return pd.DataFrame(rows)


def config(max_steps: int = 300, pools=(True, True, False, False), seed: int = 0) -> dict:
    return {
        "name": "synthetic_5way",
        "seed": seed,
        "methods": ["fam", "gradcam", "random"],
        "data": {"name": "synthetic", "image_size": 32},
        "model": {
            "name": "conv4_32",
            "options": {"hidden": 32, "pools": list(pools), "pooling": "gap"},
        },
        "trainer": {"max_steps": max_steps, "lr": 0.001},
        "eval": {"n_way": 5, "n_shot": 5},
    }


def write_run(
    folder: Path,
    frame: pd.DataFrame,
    cfg: dict | None = None,
    warnings: list[dict] | None = None,
    sanity: pd.DataFrame | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "results.csv", index=False)
    if cfg is not None:
        (folder / "run.json").write_text(json.dumps({"fingerprint": "f", "config": cfg}))
    if warnings is not None:
        (folder / "warnings.json").write_text(json.dumps(warnings))
    if sanity is not None:
        sanity.to_csv(folder / "sanity.csv", index=False)
    return folder
