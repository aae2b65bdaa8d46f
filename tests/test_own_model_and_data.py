"""Bring your own model and data, end to end: ``model=custom``, ``data=imagefolder`` and
``data=manifest`` through ``experiments.pipeline.run`` and ``run.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from format_writers import manifest_box, write_class_folders, write_manifest
from hydra import compose, initialize_config_dir

from experiments import pipeline
from fam.errors import FamBenchError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

SMALL = [
    "trainer.accelerator=cpu",
    "eval.progress=false",
    "trainer.max_steps=1",
    "trainer.batch_size=8",
    "eval.figure_samples=1",
    "metric.batch_size=64",
    "model=conv4_32",
    "data.image_size=32",
    "methods=[fam,center]",
    "metrics=[deletion_auc,pointing_game,energy_pointing_game]",
]
FEWSHOT = [
    "eval.num_episodes=1",
    "eval.n_way=2",
    "eval.n_shot=1",
    "eval.n_query=2",
    "task.train_way=2",
    "task.train_shot=1",
    "task.train_query=1",
]
RETRIEVAL = [
    "experiment=retrieval_cub",
    "eval.num_queries=4",
    "eval.unit_size=2",
    "task.recall_ks=[1,2]",
]


def config(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"cache_dir={cache}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_images")
    write_class_folders(root, n_classes=10, images_per_class=3, size=24)
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("my_manifest")
    splits = {k: "train" if k < 3 else "test" for k in range(6)}
    return root / "manifest.csv", write_manifest(
        root, n_classes=6, images_per_class=3, splits=splits
    )


@pytest.mark.parametrize("task", ["fewshot", "retrieval"])
def test_imagefolder_runs_each_task_with_one_root_override(task, folders, tmp_path):
    extra = FEWSHOT if task == "fewshot" else RETRIEVAL
    cfg = config(tmp_path / "cache", *extra, "data=imagefolder", f"data.root={folders}")
    run = pipeline.run(cfg, tmp_path / "out")
    results = run["results"]
    assert set(results["method"]) == {"fam", "center"}
    assert results["deletion_auc"].notna().all()
    assert "pointing_game" not in results  # no annotations: skipped with a note
    assert any("pointing_game" in note for note in run["notes"])
    warnings = json.loads((tmp_path / "out" / "warnings.json").read_text())
    skipped = [w["metric"] for w in warnings if w["code"] == "metric_skipped"]
    assert skipped == ["pointing_game", "energy_pointing_game"]  # where the leaderboard looks
    assert (results["dataset"] == "imagefolder").all()


def test_imagefolder_split_by_images_runs_contrastive(folders, tmp_path):
    cfg = config(
        tmp_path / "cache",
        "experiment=simclr_cifar10",
        "model=conv4_32",
        "eval.num_queries=3",
        "eval.unit_size=2",
        "task.knn_k=2",
        "data=imagefolder",
        f"data.root={folders}",
        "data.options.split_by=images",
        "data.options.split_fractions=[0.6,0.0,0.4]",
    )
    run = pipeline.run(cfg, tmp_path / "out")
    assert len(run["results"]) == 3 * 2  # queries x methods
    task = pd.read_csv(tmp_path / "out" / "task_metrics.csv")
    assert task["value"].notna().all()


def centre_hit(row: dict, size: int = 32, width: int = 48, height: int = 40) -> float:
    """The known pointing-game answer of the centre map: its maximum lies in the middle of
    the image, so a box over the centre is a hit and the top-left corner box a miss."""
    return 1.0 if row["box"] == manifest_box(0, width, height) else 0.0


@pytest.mark.parametrize("task", ["fewshot", "retrieval"])
def test_manifest_boxes_reach_the_pointing_game(task, manifest, tmp_path):
    csv, rows = manifest
    extra = FEWSHOT if task == "fewshot" else RETRIEVAL
    cfg = config(tmp_path / "cache", *extra, "data=manifest", f"data.root={csv}")
    run = pipeline.run(cfg, tmp_path / "out")
    results = run["results"]
    test_rows = [r for r in rows if r["split"] == "test"]
    centre = results[results["method"] == "center"]
    assert len(centre) == 4
    for _, result in centre.iterrows():
        row = test_rows[int(result["index"])]
        if row["box"] is None:  # no ground truth: excluded, never a hit
            assert pd.isna(result["pointing_game"])
        elif row["mask"] is None:
            assert result["pointing_game"] == centre_hit(row)
    assert results["energy_pointing_game"].notna().any()


def test_another_data_root_is_another_dataset_and_a_moved_copy_the_same(folders, tmp_path):
    """``data.root`` is not an identity (the same copy may sit elsewhere), the content is:
    a folder of other images never reuses the cached model, shares a table or resumes."""
    other = tmp_path / "other"
    write_class_folders(other, n_classes=10, images_per_class=3, size=20)  # other pixels
    moved = tmp_path / "moved"
    shutil.copytree(folders, moved)
    cache = tmp_path / "cache"

    def ids(root, out):
        run = pipeline.run(config(cache, *FEWSHOT, "data=imagefolder", f"data.root={root}"), out)
        frame = run["results"]
        return frame["model_id"].iloc[0], frame["table_id"].iloc[0], frame

    first = ids(folders, tmp_path / "a")
    second = ids(other, tmp_path / "b")
    assert first[0] != second[0] and first[1] != second[1]
    assert len(list(cache.rglob("*.pt"))) == 2  # trained again for the other images
    again = ids(moved, tmp_path / "c")
    assert again[:2] == first[:2]
    pd.testing.assert_frame_equal(again[2], first[2])
    assert len(list(cache.rglob("*.pt"))) == 2  # the moved copy reused the cached model
    with pytest.raises(FamBenchError, match="data.content"):
        ids(other, tmp_path / "a")  # resuming a's folder on other images is refused


def test_a_custom_target_runs_and_names_the_model(tmp_path):
    cfg = config(
        tmp_path / "cache",
        *FEWSHOT,
        "experiment=synthetic_5way",
        "data.options.images_per_class=4",
        "model=custom",
        "model.target=experiments.models.Conv4",
        "+model.kwargs.hidden=8",
        "+model.kwargs.pools=[true,true,false,false]",
    )
    run = pipeline.run(cfg, tmp_path / "out")
    assert (run["results"]["model"] == "experiments.models.Conv4").all()


def test_a_nonexistent_target_exits_2_without_traceback_or_training(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "run.py",
            "model=custom",
            "model.target=no_such_package.SmallNet",
            f"hydra.run.dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            "trainer.accelerator=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "no_such_package" in completed.stderr
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached
    assert not list((tmp_path / "out").glob("shards/*"))


def test_the_model_config_takes_no_hydra_target(tmp_path):
    from fam.errors import FamBenchError

    cfg = config(tmp_path, *FEWSHOT, "+model._target_=mymodels.SmallNet")
    with pytest.raises(FamBenchError, match="model=custom model.target=mymodels.SmallNet"):
        pipeline.run(cfg, tmp_path / "out")
