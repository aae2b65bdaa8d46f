"""User mistakes end with one paragraph naming the key to change, exit 2, no traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from torch import nn

from experiments import builders, config, pipeline
from experiments.store import OutputStore
from fam.errors import FamBenchError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["FAM_BENCH_CACHE"] = str(cwd / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])  # custom_nets
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_paragraph_error(done: subprocess.CompletedProcess, *named: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("fam-bench: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for name in named:
        assert name in errors[0], errors[0]


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("eval.num_episode=1", "eval.num_episodes"),
        ("+eval.num_episode=1", "eval.num_episodes"),
        ("trainer.max_step=5", "trainer.max_steps"),
        ("method.fam.contrib=product", "method.fam.contribution"),
    ],
)
def test_a_mistyped_key_names_the_nearest_valid_key_and_never_a_plus_key(override, suggestion):
    with pytest.raises(FamBenchError) as err:
        config.compose_config([override])
    message = str(err.value)
    assert f"`{suggestion}`" in message
    assert "+" not in message.replace(override, "")


def test_an_unknown_task_key_added_with_plus_is_refused_when_the_run_starts():
    from experiments.tasks import family_for

    run = config.load(config.compose_config(["+task.train_wya=3"]))
    with pytest.raises(FamBenchError, match="task.train_way"):
        family_for(run.task)


@pytest.mark.parametrize("family", ["fewshot", "contrastive", "retrieval"])
def test_every_task_option_the_runner_reads_is_in_its_yaml(family):
    """A read option missing from ``conf/task/<family>.yaml`` is refused by Hydra as an
    unknown key; the validation monitor is Python-API only (the runner has no val split)."""
    import dataclasses

    from omegaconf import OmegaConf

    from experiments.tasks import family_for

    fields = {f.name for f in dataclasses.fields(family_for({"name": family}).Config)}
    api_only = {name for name in fields if name.startswith("monitor_")}
    yaml_keys = set(OmegaConf.load(ROOT / "conf" / "task" / f"{family}.yaml"))
    assert yaml_keys == fields - api_only
    override = "task.cj_strength=0.3" if family == "contrastive" else "task.name=" + family
    config.compose_config([f"task={family}", override])  # no error


def test_a_validation_monitor_from_the_command_line_is_refused_before_training(
    tmp_path, monkeypatch
):
    from experiments.training import train as train_module

    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("trained"))
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}", "+task.monitor_every=5"])
    with pytest.raises(FamBenchError, match="task.monitor_every is read only by the Python API"):
        pipeline.run(cfg, tmp_path / "run")


def test_an_unknown_method_option_lists_the_valid_ones():
    run = config.load(config.compose_config(["+method.fam.contribtion=product"]))
    with pytest.raises(FamBenchError, match=r"method\.fam\.contribution.*ablation_batch"):
        builders.build_methods(run.methods, run.method, False)


def test_episode_shape_errors_name_the_training_keys(tmp_path):
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}", "task.train_shot=9"])
    with pytest.raises(FamBenchError, match="task.train_shot=9"):
        pipeline.run(cfg, tmp_path / "run")
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}", "eval.n_shot=9"])
    with pytest.raises(FamBenchError, match="eval.n_shot=9"):
        pipeline.run(cfg, tmp_path / "run2")


def test_an_image_too_small_for_the_pooling_is_named_before_training(tmp_path, monkeypatch):
    from experiments.training import train as train_module

    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("trained"))
    cfg = config.compose_config(
        ["model=conv4", "data.image_size=8", f"cache_dir={tmp_path}", "trainer.accelerator=cpu"]
    )
    with pytest.raises(FamBenchError, match="data.image_size"):
        pipeline.run(cfg, tmp_path / "run")


class FeatureMap(nn.Module):
    """Returns a 4-D feature map instead of an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.default_target_layer = "conv"

    def forward(self, x):
        return self.conv(x)


def test_a_model_whose_output_is_not_n_by_d_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "build_network", lambda run, checkpoint=None: FeatureMap())
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}"])
    with pytest.raises(FamBenchError, match=r"returns \(2, 4, 16, 16\).*\(N, D\)"):
        pipeline.run(cfg, tmp_path / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_output_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(FamBenchError, match="hydra.run.dir"):
        OutputStore(folder / "run").__enter__()


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FamBenchError, match="cannot be written.*hydra.run.dir"):
        OutputStore(blocker / "run").__enter__()


def test_a_second_run_on_the_same_folder_is_refused_and_the_lock_dies_with_it(tmp_path):
    with OutputStore(tmp_path / "run"):
        with pytest.raises(FamBenchError, match="Another run is writing"):
            OutputStore(tmp_path / "run").__enter__()
    with OutputStore(tmp_path / "run"):  # released: the next run takes it
        pass
    code = (
        "import sys, time; from experiments.store import OutputStore; "
        f"s = OutputStore({str(tmp_path / 'run2')!r}).__enter__(); print('locked', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(FamBenchError, match="Another run"):
            OutputStore(tmp_path / "run2").__enter__()
    finally:
        holder.kill()
        holder.wait()
    with OutputStore(tmp_path / "run2"):  # the killed process left no stale lock
        pass


def test_an_unwritable_cache_keeps_the_trained_model_in_the_run_folder(tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    cfg = config.compose_config([*TINY, f"cache_dir={blocker}"])
    result = pipeline.run(cfg, tmp_path / "run")
    kept = tmp_path / "run" / "model.pt"
    assert kept.is_file()
    assert any(str(kept) in note for note in result["notes"])
    state = torch.load(kept, weights_only=True)
    assert "encoder.0.0.weight" in state


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["eval.num_episode=1"], ["eval.num_episodes"]),
        (["eval.n_way=five"], ["eval.n_way"]),
        (["trainer.devices=0"], ["trainer.devices"]),
        (["model=conv4", "data.image_size=8"], ["data.image_size"]),
        (["task.train_way=300", "trainer.max_steps=1"], ["task.train_way=300"]),
    ],
)
def test_cli_user_mistakes_exit_2_with_one_paragraph(args, named, tmp_path):
    done = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    one_paragraph_error(done, *named)


@pytest.mark.slow
def test_cli_a_busy_output_folder_exits_2(tmp_path):
    with OutputStore(tmp_path / "run"):
        done = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    one_paragraph_error(done, "Another run")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # a built-in model would be built without them while they name the cache entry
        (["+model.kwargs.hidden=4"], r"model\.kwargs \['hidden'\].*model\.options\.<name>"),
        (["model.strip_head=false"], "model.strip_head applies to model=custom"),
        (
            ["model=custom", "model.target=experiments.models.Conv4", "+model.options.hidden=4"],
            r"\+model\.kwargs\.hidden=<value>",
        ),
    ],
)
def test_a_model_key_of_the_other_kind_of_model_is_refused(overrides, named, tmp_path):
    with pytest.raises(FamBenchError, match=named):
        cfg = config.compose_config([*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides])
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # refused before anything was trained


@pytest.mark.parametrize("task", ["retrieval", "contrastive"])
def test_a_neighbour_task_explains_only_the_cosine_it_ranks_by(task):
    from experiments.tasks import family_for

    assert family_for({"name": task}).config.similarity == "cosine"
    with pytest.raises(FamBenchError, match="task.similarity=euclidean is not what"):
        family_for({"name": task, "similarity": "euclidean"})


def test_a_retrieval_margin_applies_or_is_refused():
    from experiments.tasks.neighbour.metric_learning import build_loss_and_miner

    with pytest.raises(FamBenchError, match="task.margin does not apply"):
        build_loss_and_miner("multi_similarity", margin=0.1)
    with pytest.raises(FamBenchError, match="task.miner=triplet needs task.margin"):
        build_loss_and_miner("contrastive", miner="triplet")
    # the margin of a triplet miner beside a loss without one is the miner's
    _, miner = build_loss_and_miner("multi_similarity", miner="triplet", margin=0.1)
    assert miner.margin == pytest.approx(0.1)
    loss, miner = build_loss_and_miner("triplet", margin=0.2)
    assert loss.margin == pytest.approx(0.2) and miner.margin == pytest.approx(0.2)
    assert build_loss_and_miner("contrastive", margin=0.7)[0].neg_margin == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # labels are numbered per split: kNN would compare ids of different classes
        (["data.eval_split=test"], "holds other classes"),
        (["data.options.mode=pairs"], "data.options.mode=pairs"),
    ],
)
def test_contrastive_data_it_would_score_otherwise_is_refused_before_training(
    overrides, named, tmp_path
):
    cfg = config.compose_config(
        ["experiment=synthetic_simclr", f"cache_dir={tmp_path / 'cache'}", *overrides]
    )
    with pytest.raises(FamBenchError, match=named):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("task", "named"),
    [
        ({"algorithm": "matchingnet", "similarity": "cosine"}, "task.similarity=cosine"),
        ({"algorithm": "protonet", "temperature": 5.0}, "task.temperature=5.0"),
        ({"algorithm": "relationnet", "temperature": 5.0}, "task.temperature=5.0"),
        ({"algorithm": "simpleshot", "relation_hidden": 8}, "task.relation_hidden=8"),
    ],
)
def test_a_few_shot_key_the_algorithm_never_reads_is_refused(task, named):
    from experiments.tasks import family_for

    with pytest.raises(FamBenchError, match=named):
        family_for({"name": "fewshot", **task})


def test_the_keys_each_few_shot_algorithm_reads_are_accepted():
    from experiments.tasks import family_for

    for task in (
        {"algorithm": "protonet", "similarity": "cosine", "temperature": 5.0},
        {"algorithm": "matchingnet", "temperature": 5.0},
        {"algorithm": "simpleshot", "temperature": 2.0},
        {"algorithm": "relationnet", "relation_hidden": 8},
    ):
        family_for({"name": "fewshot", **task})


def test_the_neighbour_probability_settings_are_refused_for_few_shot(tmp_path):
    cfg = config.compose_config(
        [*TINY, f"cache_dir={tmp_path / 'cache'}", "metric.temperature=0.1"]
    )
    with pytest.raises(FamBenchError, match="metric.temperature=0.1 set"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], ["model=custom needs model.target="]),
        # the factory's own exception, quoted in one line with its type
        (
            ["model.target=custom_nets.offline_pretrained", "+model.kwargs.pretrained=true"],
            ["custom_nets.offline_pretrained", "URLError", "Temporary failure in name resolution"],
        ),
        # the model reads it: the fix is Hydra's +, never "nothing reads it"
        (
            ["model.target=custom_nets.FcEmbedder", "model.kwargs.width=24"],
            ["+model.kwargs.width=24"],
        ),
    ],
)
def test_cli_custom_model_mistakes_exit_2_with_one_paragraph(args, named, tmp_path):
    small = ["data.image_size=16", "data.options.images_per_class=6", "trainer.accelerator=cpu"]
    done = run_cli(
        "model=custom",
        *args,
        *small,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    one_paragraph_error(done, *named)
    assert "nothing reads it" not in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_a_new_model_kwarg_added_with_plus_reaches_the_model():
    cfg = config.compose_config(
        ["model=custom", "model.target=custom_nets.FcEmbedder", "+model.kwargs.width=24"]
    )
    network = builders.build_network(config.load(cfg).model)
    assert network.body[0].out_channels == 24
