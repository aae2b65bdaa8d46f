"""Nothing lost, nothing ignored: faults and misuse a new user meets end in kept work, a
clear ``fam-bench: error:`` paragraph (exit 2) or a recorded warning.

Root ignores permission bits, so read-only folders and full disks are real mounts: a
tmpfs mounted (read-only, or with a size limit) in a private mount namespace
(``unshare -m``). Where the machine does not allow that, those tests are skipped with
the reason; the file-in-the-path's-place cases run everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import TINY

from experiments import builders, config, pipeline
from experiments.data import content
from fam.errors import FamBenchError

ROOT = Path(__file__).resolve().parents[1]


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["FAM_BENCH_CACHE"] = str(cwd / "cache")
    return env


def run_cli(*args: str, cwd: Path, module: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-m", module] if module else [str(ROOT / "run.py")]), *args]
    return subprocess.run(
        command, cwd=cwd if module is None else ROOT, env=_env(cwd), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def one_paragraph_error(done: subprocess.CompletedProcess, *named: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("fam-bench: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for name in named:
        assert name in errors[0], errors[0]
    return errors[0]


# -- mount namespaces -------------------------------------------------------------------------
def _mount_namespace_reason() -> str | None:
    """Why tmpfs mounts in a private mount namespace are impossible here (``None``: they
    work)."""
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && mount -o remount,ro $d"
    try:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", probe], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare is not available ({err})"
    if done.returncode != 0:
        return f"no private mount namespace with tmpfs here: {done.stderr.strip()[:200]}"
    return None


MOUNT_REASON = _mount_namespace_reason()
needs_mounts = pytest.mark.skipif(MOUNT_REASON is not None, reason=str(MOUNT_REASON))


def in_mounts(setup: str, args: list[str], cwd: Path, module: str | None = None):
    """Run ``run.py args`` (or ``python -m module args``) after the shell ``setup`` (its
    mounts) in a private mount namespace: the mounts vanish with the process."""
    command = [sys.executable, *(["-m", module] if module else [str(ROOT / "run.py")]), *args]
    where = shlex.quote(str(ROOT if module else cwd))
    script = f"set -e\n{setup}\ncd {where}\nexec {shlex.join(command)}"
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=_env(cwd), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def tmpfs(folder: Path, size: str = "1m", read_only: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    line = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))}"
    return line + (f" && mount -o remount,ro {shlex.quote(str(folder))}" if read_only else "")


def fill(folder: Path) -> str:
    # dd stops (with an error status) when the tmpfs is full: ignore that status
    return f"dd if=/dev/zero of={shlex.quote(str(folder / 'filler'))} bs=64k 2>/dev/null || true"


# -- nothing lost ---------------------------------------------------------------------------
def test_a_failing_cache_save_of_any_kind_keeps_the_model_in_the_run_folder(tmp_path, monkeypatch):
    """A full disk makes torch.save raise RuntimeError, not OSError."""
    from experiments.training import train as train_module

    save = train_module.save_weights
    cache = tmp_path / "cache"

    def full_cache(model, path):
        if Path(path).is_relative_to(cache):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed "
                "writing file data/0: file write failed"
            )
        return save(model, path)

    monkeypatch.setattr(train_module, "save_weights", full_cache)
    result = pipeline.run(config.compose_config([*TINY, f"cache_dir={cache}"]), tmp_path / "run")
    kept = tmp_path / "run" / "model.pt"
    assert "encoder.0.0.weight" in torch.load(kept, weights_only=True)
    note = next(n for n in result["notes"] if str(kept) in n)
    assert "RuntimeError" in note and "model.checkpoint=" in note
    assert not list(cache.glob("*.pt"))


def test_a_model_that_can_be_saved_nowhere_is_still_evaluated_and_the_note_says_so(
    tmp_path, monkeypatch
):
    from experiments.training import train as train_module

    def disk_full(model, path):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(train_module, "save_weights", disk_full)
    result = pipeline.run(
        config.compose_config([*TINY, f"cache_dir={tmp_path / 'cache'}"]), tmp_path / "run"
    )
    assert len(result["results"]) == 2 * 3  # both methods scored every query
    note = next(n for n in result["notes"] if "could not be saved anywhere" in n)
    assert str(tmp_path / "run" / "model.pt") in note and "cache" in note
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert note in settings["notes"]


@needs_mounts
@pytest.mark.slow
def test_cli_a_full_cache_disk_keeps_the_trained_model_in_the_run_folder(tmp_path):
    cache = tmp_path / "cache-mount"
    done = in_mounts(
        f"{tmpfs(cache, '256k')}\n{fill(cache)}",
        [*TINY, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "model.checkpoint=" in done.stderr + done.stdout


def test_a_folder_holding_files_no_run_wrote_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my,own\n1,2\n")
    (out / "report.html").write_text("<p>mine</p>")
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FamBenchError, match=r"report\.html, results\.csv.*hydra\.run\.dir"):
        pipeline.run(cfg, out)
    assert (out / "results.csv").read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv"]
    assert not (tmp_path / "cache").exists()  # refused before training


@pytest.mark.slow
def test_cli_a_folder_holding_files_no_run_wrote_is_refused_before_hydra_writes(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = run_cli(*TINY, f"hydra.run.dir={out}", cwd=tmp_path)
    one_paragraph_error(done, "notes.txt", "hydra.run.dir")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_rerun_keeps_the_training_logs_of_the_earlier_run(tmp_path):
    cfg = config.compose_config(
        [
            *TINY,
            f"cache_dir={tmp_path / 'cache'}",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=1",
        ]
    )
    out = tmp_path / "run"
    pipeline.run(cfg, out)
    first = (out / "logs" / "metrics.csv").read_text()
    assert pd.read_csv(out / "logs" / "metrics.csv")["train_loss"].notna().sum() == 6
    pipeline.run(cfg, out)  # finished: resumes nothing, logs again
    pipeline.run(cfg, out)
    assert (out / "logs" / "metrics.csv").read_text() == first
    for k in (2, 3):
        assert (out / "logs" / f"run_{k}" / "metrics.csv").is_file()


# -- signals --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_sigterm_during_training_exits_143_with_a_note(tmp_path):
    out = tmp_path / "run"
    args = [
        *TINY,
        "trainer.max_steps=1000000",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={out}",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        # Lightning's CSV logger flushes every 100 steps: the file means training runs
        while not (out / "logs" / "metrics.csv").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    notes = [line for line in stderr.splitlines() if line.startswith("fam-bench: terminated")]
    assert len(notes) == 1 and f"hydra.run.dir={out}" in notes[0], stderr[-3000:]
    assert "0 finished evaluation unit(s)" in notes[0]


# -- nothing ignored ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.root=/tmp"], "data=synthetic is generated"),
        (["eval.num_queries=20"], "task=fewshot explains"),
        (["eval.unit_size=4"], "task=fewshot explains"),
        (["experiment=synthetic_retrieval", "eval.n_way=3"], "task=retrieval explains"),
        (["experiment=synthetic_simclr", "eval.num_episodes=3"], "task=contrastive explains"),
        (["model.checkpoint=model.pt", "trainer.max_steps=5"], "only while a model is trained"),
        (["model.checkpoint=model.pt", "trainer.lr=0.1"], "only while a model is trained"),
        (["model.checkpoint=model.pt", "task.train_way=5"], "only while a model is trained"),
        (
            ["experiment=synthetic_retrieval", "model.checkpoint=m.pt", "task.margin=0.2"],
            "only while a model is trained",
        ),
        (
            ["experiment=synthetic_simclr", "model.checkpoint=m.pt", "task.cj_prob=0.5"],
            "only while a model is trained",
        ),
    ],
)
def test_a_key_the_run_never_reads_is_refused_naming_what_reads_it(overrides, named):
    key = overrides[-1].split("=")[0]
    with pytest.raises(FamBenchError, match=rf"{key}=.*would be ignored.*{named}"):
        config.compose_config(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=synthetic_retrieval", "eval.num_queries=20", "eval.unit_size=4"],
        ["eval.n_way=3", "eval.num_episodes=2"],
        ["data=imagefolder", "data.root=/tmp"],
        ["model.checkpoint=model.pt", "trainer.accelerator=cpu", "trainer.devices=2"],
        ["trainer.max_steps=5"],
        # read by the evaluation too: allowed next to a checkpoint
        ["model.checkpoint=model.pt", "task.temperature=2.0"],
        ["experiment=synthetic_simclr", "model.checkpoint=m.pt", "task.knn_k=10"],
    ],
)
def test_the_keys_a_run_reads_are_accepted(overrides):
    config.compose_config(overrides)


# -- content identity -----------------------------------------------------------------------
class Files(SimpleNamespace):
    """The attributes of a file dataset that identify it."""

    def __len__(self) -> int:
        return len(self.paths)


def _files(root: Path, payloads: list[bytes]) -> Files:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, payload in enumerate(payloads):
        path = root / f"img{i}.png"
        path.write_bytes(payload)
        paths.append(str(path))
    labels = torch.arange(len(paths)) % 2
    return Files(paths=paths, classes=["a", "b"], labels=labels)


def test_a_file_rewritten_at_the_same_size_is_another_dataset(tmp_path):
    payloads = [os.urandom(3000) for _ in range(3)]
    data = _files(tmp_path / "a", payloads)
    before = builders.dataset_content_id(data, tmp_path / "a")
    Path(data.paths[1]).write_bytes(os.urandom(3000))  # same size, other bytes
    after = builders.dataset_content_id(data, tmp_path / "a")
    assert after != before
    Path(data.paths[1]).write_bytes(payloads[1])
    assert builders.dataset_content_id(data, tmp_path / "a") == before
    moved = _files(tmp_path / "elsewhere" / "a", payloads)  # the same bytes elsewhere
    assert builders.dataset_content_id(moved, tmp_path / "elsewhere" / "a") == before


def test_file_digests_are_sha256_of_the_bytes_and_read_once_per_size_and_mtime(
    tmp_path, monkeypatch
):
    import hashlib

    payloads = [os.urandom(n) for n in (0, 1, 5000, 3 * content.BLOCK + 7)]
    data = _files(tmp_path / "d", payloads)
    cache = content.DigestCache(tmp_path / "cache" / content.DIGEST_CACHE)
    first = content.file_digests(data.paths, cache)
    assert first == [hashlib.sha256(p).hexdigest() for p in payloads]
    reads = []
    real = content.file_digest
    monkeypatch.setattr(content, "file_digest", lambda p: reads.append(p) or real(p))
    assert content.file_digests(data.paths, cache) == first
    assert reads == []  # every (path, size, mtime) known: nothing read
    Path(data.paths[2]).write_bytes(os.urandom(5000))
    os.utime(data.paths[2], ns=(1, 1))  # another mtime, the same size
    again = content.file_digests(data.paths, cache)
    assert reads == [data.paths[2]] and again[2] != first[2]
    cache.close()


def test_an_array_dataset_is_identified_by_every_pixel():
    import numpy as np

    images = np.zeros((3000, 4, 4, 3), dtype=np.uint8)
    before = content.array_digest(images)
    images[2500, 1, 1, 0] = 1  # beyond any sample of a few images
    assert content.array_digest(images) != before


# -- degenerate settings --------------------------------------------------------------------
def test_a_coarse_metric_step_warns_and_is_recorded(tmp_path):
    from experiments.checks import settings_warnings

    assert settings_warnings({"image_size": 32, "step": 32}, ["deletion_auc"]) == []
    assert settings_warnings({"image_size": 32, "step": 100000}, ["pointing_game"]) == []
    codes = [
        w["code"] for w in settings_warnings({"image_size": 32, "step": 150}, ["insertion_auc"])
    ]
    assert codes == ["coarse_step"]  # 8 points, but 15% of the image per step
    cfg = config.compose_config(
        [*TINY, f"cache_dir={tmp_path / 'cache'}", "metric.step=100000", "metrics=[deletion_auc]"]
    )
    result = pipeline.run(cfg, tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "warnings.json").read_text())
    codes = {w["code"] for w in recorded}
    assert {"few_curve_points", "coarse_step"} <= codes
    assert any("2 points" in w["message"] for w in result["warnings"])


# -- empty paths, messages ------------------------------------------------------------------
def test_an_empty_cache_dir_is_refused():
    with pytest.raises(FamBenchError, match="cache_dir is empty"):
        config.compose_config(["cache_dir=''"])


@pytest.mark.slow
def test_cli_an_empty_run_folder_is_refused(tmp_path):
    one_paragraph_error(run_cli("hydra.run.dir=''", cwd=tmp_path), "hydra.run.dir is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("eval.num_episodes=abc", "eval.num_episodes takes an integer, got 'abc'"),
        ("trainer.lr=fast", "trainer.lr takes a number, got 'fast'"),
        ("eval.progress=maybe", "eval.progress takes true or false"),
        ("metric.temperature=hot", "metric.temperature takes a number or null"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_expected_type(override, named):
    with pytest.raises(FamBenchError, match=named):
        config.compose_config([override])


def test_out_of_memory_says_memory_and_names_the_batch_sizes(tmp_path, monkeypatch):
    from torch import nn

    class Hungry(nn.Module):
        default_target_layer = "conv"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(builders, "build_network", lambda run, checkpoint=None: Hungry())
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path}"])
    with pytest.raises(FamBenchError) as err:
        pipeline.run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "out of memory" in message and "eval.batch_size" in message
    assert "metric.batch_size" in message and "too small" not in message


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda p: p.write_bytes(b""), "is an empty file"),
        (
            lambda p: p.write_bytes(os.urandom(300).replace(b"PK", b"pk").lstrip(b"\x80")),
            "is not a torch file",
        ),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: p.write_bytes(b"\x80\x04Ke."), "damaged or truncated"),
    ],
)
def test_a_checkpoint_that_cannot_be_read_is_described(make, named, tmp_path):
    from experiments.training.checkpoint_files import read_checkpoint

    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(FamBenchError, match=named) as err:
        read_checkpoint(path)
    assert "weights_only=False" not in str(err.value)
    assert "weights_only` set to `False" not in str(err.value)


def test_a_bad_cache_entry_is_named_and_can_be_deleted(tmp_path):
    cache = tmp_path / "cache"
    cfg = config.compose_config([*TINY, f"cache_dir={cache}"])
    pipeline.run(cfg, tmp_path / "first")
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"")
    with pytest.raises(FamBenchError, match=rf"model-cache entry {entry}.*rm {entry}"):
        pipeline.run(cfg, tmp_path / "second")
    entry.unlink()
    pipeline.run(cfg, tmp_path / "second")  # deleting it retrains


def test_a_manifest_separated_by_semicolons_gets_a_delimiter_hint(tmp_path):
    from experiments.data import build_dataset

    (tmp_path / "manifest.csv").write_text("path;label\na.png;cat\n")
    with pytest.raises(FamBenchError, match=r"separated by ';'.*commas"):
        build_dataset("manifest", tmp_path, "train", 16)


def test_sanity_alone_is_refused_before_the_run(tmp_path):
    cfg = config.compose_config([*TINY, f"cache_dir={tmp_path / 'cache'}", "metrics=[sanity]"])
    with pytest.raises(
        FamBenchError, match=r"no per-sample metric.*metrics=\[deletion_auc,sanity\]"
    ):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# -- output folders that cannot be written ---------------------------------------------------
@pytest.mark.slow
def test_cli_an_output_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    done = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}", cwd=tmp_path)
    one_paragraph_error(done, "is a file", "hydra.run.dir")


@needs_mounts
@pytest.mark.slow
@pytest.mark.parametrize("existing", [True, False])
def test_cli_a_read_only_output_folder_is_refused(existing, tmp_path):
    mount = tmp_path / "ro"
    out = mount / "run" if existing else mount / "new" / "run"
    setup = (
        f"{tmpfs(mount)}\nmkdir -p {shlex.quote(str(mount / 'run'))}\n"
        f"mount -o remount,ro {shlex.quote(str(mount))}"
    )
    done = in_mounts(setup, [*TINY, f"hydra.run.dir={out}"], cwd=tmp_path)
    one_paragraph_error(done, "read-only", "hydra.run.dir")


@needs_mounts
@pytest.mark.slow
def test_cli_an_output_folder_on_a_full_disk_is_refused(tmp_path):
    mount = tmp_path / "full"
    done = in_mounts(
        f"{tmpfs(mount, '256k')}\n{fill(mount)}", [*TINY, f"hydra.run.dir={mount / 'run'}"],
        cwd=tmp_path,
    )  # fmt: skip
    one_paragraph_error(done, "disk is full", "hydra.run.dir")


FILL_WHEN_CLAIMED = """
import os, runpy, sys, threading, time
out, filler = sys.argv[1], sys.argv[2]
def fill():
    while not os.path.exists(os.path.join(out, "run.json")):
        time.sleep(0.005)
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
    except OSError:
        pass
threading.Thread(target=fill, daemon=True).start()
sys.argv = [sys.argv[3], *sys.argv[4:]]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python run.py` would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_mounts
@pytest.mark.slow
def test_cli_a_disk_that_fills_during_the_run_is_one_paragraph(tmp_path):
    """The check before the run passes; the disk fills once the run has claimed its
    folder (a thread in the run's process), before any result is written."""
    mount = tmp_path / "small"
    out = mount / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(FILL_WHEN_CLAIMED)
    script = f"set -e\n{tmpfs(mount, '2m')}\ncd {shlex.quote(str(tmp_path))}\n" + shlex.join(
        [sys.executable, str(driver), str(out), str(mount / "filler"), str(ROOT / "run.py")]
        + [*TINY, f"hydra.run.dir={out}"]
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=_env(tmp_path), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    one_paragraph_error(done, "No space left on device")


@pytest.mark.slow
def test_cli_a_sweep_value_of_the_wrong_type_is_one_paragraph(tmp_path):
    done = run_cli("-m", "seed=0,abc", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    one_paragraph_error(done, "seed takes an integer, got 'abc'")
    assert not (tmp_path / "sweep").exists()


def _board_input(tmp_path: Path) -> Path:
    from results_fixtures import results_frame, write_run

    runs = tmp_path / "runs"
    write_run(runs / "a", results_frame())
    return runs


@needs_mounts
def test_a_leaderboard_to_a_read_only_folder_is_one_paragraph(tmp_path):
    runs = _board_input(tmp_path)
    mount = tmp_path / "ro"
    done = in_mounts(
        tmpfs(mount, read_only=True),
        [str(runs), "--out", str(mount / "board")],
        cwd=tmp_path,
        module="evaluation.reporting",
    )
    one_paragraph_error(done, "--out")


def test_a_leaderboard_under_a_file_is_one_paragraph(tmp_path):
    runs = _board_input(tmp_path)
    (tmp_path / "file").write_text("")
    done = run_cli(
        str(runs),
        "--out",
        str(tmp_path / "file" / "board"),
        cwd=tmp_path,
        module="evaluation.reporting",
    )
    one_paragraph_error(done, "--out")


def test_pooled_seed_intervals_are_clipped_to_the_metric_range_with_a_note():
    """Two seeds give a t interval with 12.7 standard errors on each side."""
    from results_fixtures import results_frame

    from evaluation.reporting.tables import build_leaderboard

    frames = []
    for seed, value in ((0, 0.1), (1, 0.9)):
        frame = results_frame(methods=("fam", "random"), seed=seed)
        frame["energy_pointing_game"] = value
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["run"] = frame["seed"].map(lambda s: f"run{s}")
    configs = {f"run{s}": {"seed": s, "metric": {"score": "probability"}} for s in (0, 1)}
    board = build_leaderboard(frame, pool_seeds=True, configs=configs)
    cell = board[(board["method"] == "fam") & (board["metric"] == "energy_pointing_game")]
    assert cell["mean"].item() == pytest.approx(0.5)
    assert (cell["ci95_low"].item(), cell["ci95_high"].item()) == (0.0, 1.0)
    notes = json.loads(cell["notes"].item())
    clip = [n for n in notes if "fam / energy_pointing_game" in n]
    assert len(clip) == 1 and "clipped to [0, 1]" in clip[0] and "seeds" in clip[0]
    auc = board[board["metric"].isin(["insertion_auc", "deletion_auc"])]  # probabilities
    assert auc["ci95_high"].max() <= 1.0 and auc["ci95_low"].min() >= 0.0
    from evaluation.registry import value_bounds

    assert value_bounds("insertion_auc", "similarity") is None  # a cosine AUC may be < 0
    assert value_bounds("pointing_game_other") == (0.0, 1.0)
