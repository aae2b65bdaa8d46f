"""A wheel built from the checkout ships the configs and runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_fam_bench_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheel = next(wheels.glob("fam_bench-*.whl"))
    # a quiet build: no setuptools warning about a config folder missing from `packages`
    assert "is absent from the `packages` configuration" not in built.stdout + built.stderr
    # every config file ships, at its place under the data package
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    configs = {
        "fam_bench_conf/" + p.relative_to(ROOT / "conf").as_posix()
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert shipped == configs
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies come from the existing environment (a path entry, not its .pth
    # files: the checkout's editable finder must not leak in)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    found = subprocess.run(
        [str(python), "-c", "import experiments, fam_bench_conf; print(experiments.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(venv) in found and str(ROOT) not in found
    run = subprocess.run(
        [
            str(venv / "bin" / "fam-bench"),
            *tiny(
                "methods=[fam,random]",
                f"cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / 'run'}",
                drop=["trainer.batch_size", "trainer.accelerator"],
            ),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(results["method"]) == {"fam", "random"} and len(results) == 2 * 3
    board = subprocess.run(
        [
            str(venv / "bin" / "fam-bench-leaderboard"),
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "board"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert board.returncode == 0, board.stderr[-3000:]
    assert (tmp_path / "board" / "leaderboard.md").is_file()


def test_every_config_folder_is_a_listed_package():
    """setuptools warns about (and may drop) a folder of data files that is not listed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["fam_bench_conf"] == "conf"
    folders = {
        ".".join(("fam_bench_conf", *p.parent.relative_to(ROOT / "conf").parts))
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    # a folder holding only sub-folders (conf/hydra) is a package too
    parents = {f.rsplit(".", 1)[0] for f in folders if f != "fam_bench_conf"}
    listed = {p for p in setuptools["packages"] if p.split(".")[0] == "fam_bench_conf"}
    assert listed == folders | parents
