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


# -- your own weights: heads, file formats, Lightning hyper-parameters ---------------------
CUSTOM_FC = [*FEWSHOT, "experiment=synthetic_5way", "data.options.images_per_class=4"]


def lightning_checkpoint(path: Path, net, hparams: dict) -> None:
    """A real Lightning checkpoint of ``net`` (as ``model.``), ``hparams`` saved with it;
    one step at learning rate 0, so the weights are ``net``'s."""
    import pytorch_lightning as pl
    import torch
    from custom_nets import fit_and_save

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters(hparams)
            self.model = net

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    fit_and_save(Module(), path)


def test_an_embedding_layer_named_fc_is_explained_in_place(tmp_path):
    import torch
    from custom_nets import FcEmbedder

    torch.save(FcEmbedder().state_dict(), tmp_path / "embedder.pth")
    cfg = config(
        tmp_path / "cache",
        *CUSTOM_FC,
        "model=custom",
        "model.target=custom_nets.FcEmbedder",
        f"model.checkpoint={tmp_path / 'embedder.pth'}",
    )
    run = pipeline.run(cfg, tmp_path / "out")
    environment = (tmp_path / "out" / "environment.json").read_text()
    assert "Loaded 6 tensors" in environment and "0 unexpected" in environment  # fc loaded
    assert not [w for w in run["warnings"] if w["code"] == "head_stripped"]
    assert any("fc (16 -> 8) is explained as part of the embedding" in n for n in run["notes"])


def test_a_head_the_checkpoint_names_classes_for_is_stripped_with_a_warning(tmp_path):
    """A Lightning checkpoint whose hyper-parameters say num_classes=5 and hold a
    pathlib.Path (which weights_only loading refuses): its state_dict is read, the Path
    never built, and fc (16 -> 5) goes, with a warning naming it and both sizes."""
    from custom_nets import FcEmbedder

    path = tmp_path / "classifier.ckpt"
    lightning_checkpoint(path, FcEmbedder(dim=5), {"num_classes": 5, "root": tmp_path})
    cfg = config(
        tmp_path / "cache",
        *CUSTOM_FC,
        "model=custom",
        "model.target=custom_nets.FcEmbedder",
        "+model.kwargs.dim=5",
        f"model.checkpoint={path}",
    )
    run = pipeline.run(cfg, tmp_path / "out")
    warnings = json.loads((tmp_path / "out" / "warnings.json").read_text())
    (strip,) = [w for w in warnings if w["code"] == "head_stripped"]
    assert (strip["layer"], strip["before"], strip["after"]) == ("fc", 5, 16)
    assert "hyper_parameters.num_classes = 5" in strip["message"]
    assert any("hyper_parameters.root (pathlib.PosixPath)" in n for n in run["notes"])


def test_the_same_weights_share_model_id_in_any_file_format(tmp_path):
    import torch
    from custom_nets import FcEmbedder
    from safetensors.torch import save_file

    state = FcEmbedder().state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.ckpt")
    changed = dict(state, **{"fc.bias": state["fc.bias"] + 1e-3})
    torch.save(changed, tmp_path / "changed.pth")

    def ids(name: str) -> tuple[str, str]:
        cfg = config(
            tmp_path / "cache",
            *CUSTOM_FC,
            "model=custom",
            "model.target=custom_nets.FcEmbedder",
            f"model.checkpoint={tmp_path / name}",
        )
        frame = pipeline.run(cfg, tmp_path / name.replace(".", "_"))["results"]
        return frame["model_id"].iloc[0], frame["table_id"].iloc[0]

    first = ids("w.pth")
    assert ids("w.safetensors") == first
    assert ids("w.ckpt") == first  # another container and key prefix, the same tensors
    assert ids("changed.pth")[0] != first[0]


# -- an existing experiment on your own data -------------------------------------------------
OWN_RETRIEVAL = [
    "experiment=synthetic_retrieval",
    "data=manifest",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.batch_size=4",
    "task.samples_per_class=2",
    "eval.num_queries=4",
    "eval.unit_size=2",
    "eval.progress=false",
    "eval.figure_samples=1",
    "data.image_size=32",
    "methods=[fam,center]",
    "metrics=[pointing_game]",
]


def test_an_experiment_on_other_data_is_named_after_it_and_drops_only_its_own_options(
    manifest, tmp_path, capsys
):
    from evaluation.reporting.loading import load_results
    from evaluation.reporting.render import to_markdown
    from evaluation.reporting.tables import build_leaderboard
    from experiments.config import compose_config

    csv, _ = manifest
    base = [*OWN_RETRIEVAL, f"data.root={csv}", f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config(base)
    note = capsys.readouterr().err
    assert "fam-bench: note: data.options.images_per_class=100 comes from " in note
    assert "images_per_class" not in cfg.data.options
    run = pipeline.run(cfg, tmp_path / "out")
    assert (run["results"]["experiment"] == "synthetic_retrieval@manifest").all()
    assert (run["results"]["dataset"] == "manifest").all()
    board = to_markdown(build_leaderboard(load_results([tmp_path / "out"])))
    assert "## synthetic_retrieval@manifest: manifest / conv4_32 / retrieval" in board
    # name= wins; on the experiment's own dataset nothing changes
    assert compose_config([*base, "name=mine"]).name == "mine"
    same = compose_config(["experiment=synthetic_retrieval", "data=synthetic"])
    assert same.name == "synthetic_retrieval" and same.data.options.images_per_class == 100
    capsys.readouterr()
    # set on the command line, a synthetic-only option stays the user's error
    with pytest.raises(FamBenchError, match="images_per_class"):
        pipeline.run(compose_config([*base, "data.options.images_per_class=5"]), tmp_path / "x")
    assert "note" not in capsys.readouterr().err
