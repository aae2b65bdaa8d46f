"""run.py and the config tree: composition, interface overrides, fingerprints, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import tiny

from evaluation.plain import plain
from experiments import builders, config, identity, pipeline
from experiments.store import OutputStore
from experiments.tasks import family_for
from fam.errors import FamBenchError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = [
    "fam",
    "fam_ablation",
    "gradcam",
    "gradcampp",
    "xgradcam",
    "layercam",
    "scorecam",
    "relevancecam",
    "eigencam",
    "random",
    "center",
]


def composed(*overrides: str, hydra_node: bool = False):
    return config.compose_config(list(overrides), return_hydra_config=hydra_node)


def typed(*overrides: str) -> config.RunConfig:
    return config.load(composed(*overrides))


def settings_of(run: config.RunConfig, score: str = "probability") -> dict:
    family = family_for(run.task)
    evaluation = SimpleNamespace(
        score=score if family.name == "fewshot" else "similarity",
        similarity=family.config.similarity,
    )
    return identity.metric_settings(run, family, evaluation, autocast_of(run))


def autocast_of(run: config.RunConfig) -> bool:
    """``metric.amp`` resolved as the pipeline does, once per run."""
    return identity.resolve_amp(run.metric.amp, builders.device_for(run.trainer.accelerator))


def methods_of(run: config.RunConfig) -> dict[str, builders.Method]:
    return builders.build_methods(run.methods, run.method, autocast_of(run))


def fingerprint(*overrides: str) -> tuple[str, dict]:
    run = typed(*overrides)
    family = family_for(run.task)
    run.task = plain(family.config)
    options = {name: m.options for name, m in methods_of(run).items()}
    return identity.fingerprint_of(run, family, options, autocast_of(run))


def test_the_ten_experiments_exist_and_compose_with_their_protocol_settings():
    assert EXPERIMENTS == sorted(
        [
            "synthetic_5way",
            "synthetic_5way_pairs",
            "miniimagenet_5way",
            "tieredimagenet_5way",
            "cub_5way",
            "simclr_cifar10",
            "simclr_stl10",
            "retrieval_cub",
            "retrieval_sop",
            "retrieval_cars",
            "synthetic_retrieval",
            "synthetic_retrieval_pairs",
            "synthetic_simclr",
        ]
    )
    expected = {  # experiment: (data, model, task, image size, similarity)
        "synthetic_5way": ("synthetic", "conv4", "fewshot", 32, "euclidean"),
        "synthetic_5way_pairs": ("synthetic", "conv4", "fewshot", 32, "euclidean"),
        "miniimagenet_5way": ("miniimagenet", "conv4", "fewshot", 84, "euclidean"),
        "tieredimagenet_5way": ("tieredimagenet", "conv4", "fewshot", 84, "euclidean"),
        "cub_5way": ("cub", "conv4", "fewshot", 84, "euclidean"),
        "simclr_cifar10": ("cifar10", "resnet18", "contrastive", 32, "cosine"),
        "simclr_stl10": ("stl10", "resnet18", "contrastive", 96, "cosine"),
        "retrieval_cub": ("cub", "resnet50", "retrieval", 224, "cosine"),
        "retrieval_sop": ("sop", "resnet50", "retrieval", 224, "cosine"),
        "retrieval_cars": ("cars196", "resnet50", "retrieval", 224, "cosine"),
        "synthetic_retrieval": ("synthetic", "conv4", "retrieval", 32, "cosine"),
        "synthetic_retrieval_pairs": ("synthetic", "conv4", "retrieval", 32, "cosine"),
        "synthetic_simclr": ("synthetic", "conv4", "contrastive", 32, "cosine"),
    }
    for name in EXPERIMENTS:
        cfg = composed(f"experiment={name}")
        assert cfg.name == name
        got = (
            cfg.data.name,
            cfg.model.name,
            cfg.task.name,
            cfg.data.image_size,
            cfg.task.similarity,
        )
        assert got == expected[name], name
        assert set(METHODS) <= set(cfg.methods) <= {*METHODS, "mask"}
        settings = settings_of(config.load(cfg))
        # RISE: 224 px per step at 224 px; TorchRay: 15 px tolerance at 224 px.
        assert settings["step"] == cfg.data.image_size
        assert settings["tolerance_px"] == pytest.approx(15 * cfg.data.image_size / 224, abs=1e-4)
    assert composed("experiment=simclr_cifar10").model.options.cifar_stem is True
    assert composed("experiment=simclr_stl10").model.options.cifar_stem is False
    assert list(composed().model.options.pools) == [True, True, False, False]
    assert composed().data.options.mode == "single"
    assert composed("experiment=synthetic_5way_pairs").data.options.mode == "pairs"


def test_default_run_is_synthetic_5way_and_cache_lives_outside_the_run_folder(monkeypatch):
    monkeypatch.delenv("FAM_BENCH_CACHE", raising=False)
    cfg = composed(hydra_node=True)
    assert cfg.name == "synthetic_5way"
    assert cfg.cache_dir == ".cache/fam-bench"
    assert not cfg.cache_dir.startswith(cfg.hydra.run.dir.split("/")[0])
    monkeypatch.setenv("FAM_BENCH_CACHE", "/somewhere/cache")
    assert composed().cache_dir == "/somewhere/cache"


def test_interface_overrides_reach_their_settings():
    cfg = composed(
        "experiment=miniimagenet_5way",
        "data.root=/data/mini",
        "data.image_size=64",
        "model=resnet12",
        "trainer.max_steps=7",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "eval.num_episodes=3",
        "eval.n_way=3",
        "eval.n_shot=1",
        "eval.n_query=4",
        "methods=[fam,gradcam]",
        "metrics=[pointing_game]",
        "seed=5",
    )
    assert (cfg.data.root, cfg.data.image_size, cfg.model.name) == ("/data/mini", 64, "resnet12")
    # a model choice on the command line wins over the experiment's, with its own options
    assert dict(cfg.model.options) == {}
    assert (cfg.trainer.max_steps, cfg.trainer.accelerator, cfg.trainer.devices) == (7, "cpu", 2)
    assert (cfg.eval.num_episodes, cfg.eval.n_way, cfg.eval.n_shot, cfg.eval.n_query) == (
        3,
        3,
        1,
        4,
    )
    assert list(cfg.methods) == ["fam", "gradcam"] and list(cfg.metrics) == ["pointing_game"]
    assert cfg.seed == 5
    given = composed("experiment=miniimagenet_5way", "model.checkpoint=/ckpt.pt")
    assert given.model.checkpoint == "/ckpt.pt"
    assert composed("experiment=synthetic_retrieval", "eval.num_queries=9").eval.num_queries == 9


def test_launchers_and_loggers_compose():
    assert composed("hydra/launcher=joblib", hydra_node=True).hydra.launcher._target_.endswith(
        "JoblibLauncher"
    )
    slurm = composed("hydra/launcher=slurm", hydra_node=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    for name in ("csv", "wandb", "tensorboard"):
        assert composed(f"logger={name}").logger.name == name
    assert composed("logger=wandb").logger.offline is True


def test_every_method_config_builds_an_explainer_factory():
    methods = methods_of(typed())
    assert list(methods) == [*METHODS, "mask"]  # the default experiment adds the oracle
    assert all(callable(m.factory) for m in methods.values())


def test_unknown_method_and_metric_names_list_the_valid_ones():
    with pytest.raises(FamBenchError, match="Valid methods.*gradcam"):
        methods_of(typed("methods=[fam,gradkam]"))
    with pytest.raises(FamBenchError, match="Valid metrics.*deletion_auc"):
        pipeline.check_metrics(["pointing_gme"])


def test_fingerprint_ignores_execution_settings_but_not_result_settings():
    base, _ = fingerprint()
    for same in (
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "eval.batch_size=7",
        "metric.batch_size=3",
        "logger=tensorboard",
        "eval.progress=false",
    ):
        assert fingerprint(same)[0] == base, same
    for different in (
        "seed=1",
        "eval.n_shot=1",
        "metric.step=4",
        "methods=[fam]",
        "trainer.max_steps=5",
        "metric.score=similarity",
        "method.fam.contribution=ablation",
    ):
        assert fingerprint(different)[0] != base, different


def test_loader_workers_name_the_weights_only_where_they_draw_random_views():
    """Contrastive views are drawn in the loader workers (one stream each); few-shot
    episodes and retrieval batches are not: num_workers is an execution key there."""
    for experiment, matters in (("synthetic_simclr", True), ("synthetic_5way", False)):
        runs = [typed(f"experiment={experiment}", f"trainer.num_workers={w}") for w in (0, 2)]
        keys = [identity.training_key(r, family_for(r.task)) for r in runs]
        prints = [
            fingerprint(f"experiment={experiment}", f"trainer.num_workers={w}")[0] for w in (0, 2)
        ]
        assert (keys[0] != keys[1]) == matters and (prints[0] != prints[1]) == matters


def test_training_runs_in_one_process_whatever_the_evaluation_devices(monkeypatch):
    """trainer.devices shards the evaluation; DDP training would split each batch over
    the processes and give weights that depend on an execution key."""
    from experiments.training import train as train_module

    L = train_module.L

    seen = {}

    class Recording(L.Trainer):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(train_module.L, "Trainer", Recording)
    from experiments.data import build_dataset
    from experiments.models import build_model

    data = build_dataset("synthetic", None, "train", 16, images_per_class=4, seed=0)
    model = build_model("conv4", hidden=8, pools=[True, True, False, False])
    trainer = {"max_steps": 1, "batch_size": 8, "accelerator": "cpu", "devices": 2}
    task = {"name": "fewshot", "train_way": 2, "train_shot": 1, "train_query": 1}
    train_module.fit(model, data, family_for(task), trainer)
    assert (seen["devices"], seen["num_nodes"], seen["strategy"]) == (1, 1, "auto")


def test_the_unit_size_of_neighbour_tasks_is_in_settings_id():
    """Queries of one unit share the random maps' seed and the pairs' second object."""
    for experiment in ("synthetic_retrieval", "synthetic_simclr"):
        ids = {
            identity.settings_id(
                settings_of(typed(f"experiment={experiment}", f"eval.unit_size={n}"))
            )
            for n in (8, 32)
        }
        assert len(ids) == 2, experiment
    with pytest.raises(FamBenchError, match="eval.unit_size=8 would be ignored"):
        typed("eval.unit_size=8")  # an episode is the unit of few-shot runs


def test_method_options_record_the_precision_that_runs():
    """metric.amp turns autocast on for every method that offers it: its recorded
    ``amp`` option (results' method_options) says so instead of the YAML's false."""
    for amp, expected in (("auto", False), ("true", True)):
        run = typed("trainer.accelerator=cpu", f"metric.amp={amp}", "methods=[fam,center]")
        methods = methods_of(run)
        assert methods["fam"].options["amp"] is expected
        assert "amp" not in methods["center"].options
    run = typed("trainer.accelerator=cpu", "method.fam.amp=true", "methods=[fam,gradcam]")
    methods = methods_of(run)
    assert methods["fam"].options["amp"] is True and methods["gradcam"].options["amp"] is False


def test_settings_id_changes_with_every_metric_setting():
    base = settings_of(typed())
    ids = {identity.settings_id(base)}
    for key, value in (
        ("step", 8),
        ("blur_sigma", 2.0),
        ("tolerance_px", 1.0),
        ("score", "similarity"),
        ("insertion_substrate", "zeros"),
    ):
        ids.add(identity.settings_id({**base, key: value}))
    assert len(ids) == 6


def test_output_folder_of_another_config_is_refused(tmp_path):
    fp, plain = fingerprint()
    fp2, plain2 = fingerprint("eval.n_query=7")
    fp3, plain3 = fingerprint("method.fam.contribution=ablation")
    store = OutputStore(tmp_path)
    store.claim(fp2, plain2)
    store.claim(fp, plain)  # no results yet: the folder is taken over
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "unit_000000.pt").write_bytes(b"")
    store.claim(fp, plain)  # same config: resume is fine
    with pytest.raises(FamBenchError, match="eval.n_query"):
        store.claim(fp2, plain2)
    with pytest.raises(FamBenchError, match="method.fam.contribution"):
        store.claim(fp3, plain3)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["FAM_BENCH_CACHE"] = str(cwd / "cache")
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_unknown_experiment_exits_2_with_the_valid_names(tmp_path):
    done = run_cli("experiment=synthetic_10way", cwd=tmp_path)
    assert done.returncode == 2
    assert "synthetic_5way_pairs" in done.stderr and "retrieval_sop" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.slow
def test_cli_unknown_method_and_missing_dataset_exit_2_without_traceback(tmp_path):
    done = run_cli("methods=[fam,gradkam]", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "gradkam" in done.stderr and "relevancecam" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    done = run_cli("experiment=cub_5way", f"hydra.run.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert done.returncode == 2 and "data.root" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    missing = tmp_path / "no-such-folder"
    done = run_cli(
        "experiment=miniimagenet_5way",
        f"data.root={missing}",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("kind", ["csv", "tensorboard", "wandb"])
def test_each_logger_records_the_summary_and_figures(kind, tmp_path, monkeypatch):
    from matplotlib.image import imsave

    from experiments.loggers import build_logger

    monkeypatch.setenv("WANDB_SILENT", "true")
    figure = tmp_path / "maps.png"
    imsave(figure, np.zeros((4, 4, 3)))
    summary = pd.DataFrame({"method": ["fam"], "metric": ["deletion_auc"], "mean": [0.25]})
    task = pd.DataFrame({"metric": ["fewshot_accuracy"], "value": [0.9]})
    run = typed(f"logger={kind}")
    build_logger(run.logger, tmp_path, "run").log_run(plain(run), summary, task, [figure])
    logs = tmp_path / "logs"
    if kind == "csv":
        metrics = pd.read_csv(logs / "metrics.csv")
        assert metrics["fam/deletion_auc"].iloc[0] == 0.25
        assert metrics["task/fewshot_accuracy"].iloc[0] == 0.9
    elif kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(logs)).Reload()
        assert events.Scalars("fam/deletion_auc")[0].value == 0.25
        assert "maps" in events.Tags()["images"]
    else:
        runs = list((logs / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_unknown_logger_is_a_clear_error(tmp_path):
    from experiments.loggers import build_logger

    with pytest.raises(FamBenchError, match="Unknown logger 'mlflow'"):
        build_logger({"name": "mlflow"}, tmp_path, "run")


@pytest.mark.slow
def test_cli_run_writes_into_the_hydra_folder_and_a_rerun_resumes(tmp_path):
    overrides = tiny(
        "eval.num_episodes=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        drop=["trainer.batch_size", "trainer.accelerator", "eval.progress"],
    )
    done = run_cli(*overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert len(results) == 2 * 3 * 2  # episodes x queries x methods
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert list((tmp_path / "cache").glob("fewshot-conv4-*.pt"))  # FAM_BENCH_CACHE honoured
    shard = tmp_path / "run" / "shards" / "unit_000000.pt"
    written = shard.stat().st_mtime_ns
    assert run_cli(*overrides, cwd=tmp_path).returncode == 0
    assert shard.stat().st_mtime_ns == written  # nothing recomputed
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "results.csv"), results)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("eval.n_way=five", "eval.n_way"),
        ("eval.n_query=0", "eval.n_query"),
        ("metric.step=0", "metric.step"),
        ("metric.blur_sigma=-1", "metric.blur_sigma"),
        ("metric.deletion_substrate=noise", "metric.deletion_substrate"),
        ("metric.score=prob", "metric.score"),
        ("trainer.devices=0", "trainer.devices"),
        ("task.similarity=manhattan", "task.similarity"),
    ],
)
def test_mistyped_settings_are_named_before_anything_is_trained(override, named):
    with pytest.raises(FamBenchError, match=named):
        run = typed(override)
        family_for(run.task)


def test_the_shipped_experiments_pass_the_settings_check():
    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        run = typed(f"experiment={experiment}")
        family_for(run.task)
        methods_of(run)
