"""The prepared GPU check: the wheel set (``make gpu-wheels``), the torchcam deletion/insertion
adapter of ``benchmarks/protocol.py``, and ``benchmarks/gpu_check.sh --smoke`` on CPU.

The wheel tests build ``.whl/`` when it is absent or incomplete (PyPI must be reachable;
about 5 s) and are skipped, with the reason, only when that fails.
"""

from __future__ import annotations

import ast
import fcntl
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import gpu_wheels
from benchmarks.protocol import torchcam_deletion_insertion
from evaluation import deletion_insertion

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"


@pytest.fixture(scope="session")
def wheels() -> Path:
    """``.whl/`` as ``make gpu-wheels`` leaves it (built here when it is not)."""
    WHEELS.mkdir(exist_ok=True)
    with open(WHEELS / ".lock", "w") as lock:  # xdist workers build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete = not gpu_wheels.problems(WHEELS, gpu_wheels.gpu_packages())
        if not complete:
            done = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "gpu_wheels.py")],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                pytest.skip(
                    ".whl/ is absent or incomplete and `make gpu-wheels` could not build it "
                    f"(no PyPI here?): {done.stderr.strip()[-500:]}"
                )
    return WHEELS


def test_wheel_set_is_complete_and_needs_nothing_the_gpu_machine_lacks(wheels):
    assert gpu_wheels.problems(wheels, gpu_wheels.gpu_packages()) == []
    for path in wheels.glob("*.whl"):
        assert all(gpu_wheels.tag_ok(t) for t in gpu_wheels.wheel_tags(path)), path.name
    total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    assert total < 60 * 2**20


def test_every_module_level_import_is_on_the_gpu_machine_or_in_the_wheel_set():
    """What ``pytest -m cuda tests`` imports while collecting, and what every run imports,
    exists on the GPU machine once the wheels are installed (lazy imports of optional
    loggers and launchers are not module-level and are not needed there)."""
    have = gpu_wheels.gpu_packages() | {gpu_wheels.canonical(n) for n, _, _ in gpu_wheels.WHEELS}
    owners = importlib.metadata.packages_distributions()
    folders = ["fam", "baselines", "evaluation", "experiments", "benchmarks", "tests"]
    ours = set(folders) | {p.stem for p in (ROOT / "tests").glob("*.py")}
    missing = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in ours:
                        continue
                    dists = {gpu_wheels.canonical(d) for d in owners.get(top, [top])}
                    if not dists & have:
                        missing.append(f"{path.relative_to(ROOT)}: {top} ({', '.join(dists)})")
    assert missing == [], "\n".join(missing)


def _fake_wheel(folder: Path, filename: str, requires: list[str]) -> Path:
    name, version = filename.split("-")[:2]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as archive:
        metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        metadata += [f"Requires-Dist: {r}" for r in requires]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(metadata) + "\n")
    return path


def test_the_check_names_each_missing_dependency_bad_tag_and_extra_version(tmp_path):
    _fake_wheel(
        tmp_path,
        "good-1.0-py3-none-any.whl",
        [
            "numpy>=1",  # on the GPU machine
            "needy<1",  # the wheel set has needy 1.0
            "old-backport; python_version < '3.9'",  # not for Python 3.12
            "docs-only; extra == 'docs'",  # an extra
        ],
    )
    _fake_wheel(tmp_path, "needy-1.0-py3-none-any.whl", ["not-on-gpu>=2"])
    _fake_wheel(tmp_path, "native-2.0-cp311-cp311-manylinux_2_17_x86_64.whl", [])
    _fake_wheel(tmp_path, "twice-1.0-py3-none-any.whl", [])
    _fake_wheel(tmp_path, "twice-1.1-py3-none-any.whl", [])
    expected = [
        ("good", "1.0", "download"),
        ("needy", "1.0", "download"),
        ("twice", "1.0", "download"),
        ("gone", "3", "build"),
    ]
    found = gpu_wheels.problems(
        tmp_path, {"numpy"}, expected=expected, needs=["numpy", "torch"], limit_bytes=2**20
    )
    text = "\n".join(found)
    assert "native-2.0-cp311-cp311-manylinux_2_17_x86_64.whl: tag cp311" in text
    assert "twice: 2 versions (1.0, 1.1)" in text
    assert "gone==3: no wheel" in text
    assert "native: a wheel that benchmarks/gpu_wheels.py does not list" in text
    assert "requires 'needy<1'; the wheel set has needy" in text
    assert "requires not-on-gpu" in text
    assert "fam-bench requires torch" in text
    assert "old-backport" not in text and "docs-only" not in text
    assert len(found) == 7, found


def test_benchmarks_readme_lists_every_wheel_with_its_version():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    rows = re.findall(r"^\| `?([\w.-]+)`? \| ([\w.]+) \|", readme, re.MULTILINE)
    listed = {(gpu_wheels.canonical(n), v) for n, v in rows}
    for name, version, _ in gpu_wheels.WHEELS:
        assert (gpu_wheels.canonical(name), version) in listed, name


@pytest.mark.parametrize("ties", ["continuous", "tied"])
def test_torchcam_adapter_gives_ours_curves_on_torchcams_protocol(ties):
    """torchcam's metric through the adapter = ours with zeros for both curves and stable
    ties (the same definition); a job-order change in torchcam would break this."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
    images = torch.randn(3, 3, 8, 8)
    reference = torch.randn(3, 5)
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    maps = torch.rand(6, 8, 8)
    if ties == "tied":
        maps = (maps * 3).round()
    maps[3] = torch.nan  # an explainer's failed map: nan curves, the others unaffected

    def score_fn(batch, index):
        return F.cosine_similarity(net(batch), reference[index], dim=1)

    common = dict(step=8, batch_size=5, model=net, image_index=image_index)
    theirs = torchcam_deletion_insertion(score_fn, images, maps, **common)
    ours = deletion_insertion(
        score_fn,
        images,
        maps,
        deletion_substrate="zeros",
        insertion_substrate="zeros",
        ties="stable",
        **common,
    )
    for name in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
        torch.testing.assert_close(getattr(theirs, name), getattr(ours, name), equal_nan=True)
    assert theirs.deletion_curve[3].isnan().all() and not theirs.deletion_curve[2].isnan().any()
    torch.testing.assert_close(theirs.fractions, ours.fractions)


def test_torchcam_adapter_refuses_a_step_torchcam_cannot_space():
    images = torch.zeros(1, 3, 10, 10)
    with pytest.raises(ValueError, match="cannot space points 30 pixels apart"):
        torchcam_deletion_insertion(lambda x, i: x.sum((1, 2, 3)), images, images[:, 0], step=30)


def _script(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )


def test_gpu_check_refuses_a_target_that_is_not_fresh(wheels, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "left-over.py").write_text("")
    done = _script("--smoke", "--out", str(tmp_path / "out"), "--target", str(tmp_path / "site"))
    assert done.returncode == 2
    assert "is not empty: give a fresh folder" in done.stderr


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_from_a_fresh_target_install(wheels, tmp_path):
    out, target = tmp_path / "out", tmp_path / "site"
    done = _script("--smoke", "--out", str(out), "--target", str(target))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for name in ("install", "cuda-tests", "benchmarks", "protocol", "torchcam"):
        assert f"| {name} | ok |" in summary, summary
    # every wheel's packages were imported from the fresh target, not from the venv
    log = (out / "gpu_check.log").read_text()
    installed = {gpu_wheels.canonical(p.name.split("-")[0]) for p in target.glob("*.dist-info")}
    assert installed == {gpu_wheels.canonical(n) for n, _, _ in gpu_wheels.WHEELS}
    for module in ("torchcam", "pytorch_grad_cam", "hydra", "omegaconf", "lightly", "zennit"):
        assert f"import {module}: {target.resolve()}/{module}/__init__.py" in log
    assert re.search(r"\d+ skipped, \d+ deselected", log)  # the CUDA tests, skipped on CPU
    # what a device machine sends back: at most 8 files, plain names, one folder deep
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    rows = json.loads((out / "protocol-cpu.json").read_text())
    for kind in ("ours", "torchcam"):
        row = rows[kind]
        assert row["units_done"] >= 1
        # one deletion/insertion call an episode, and one more where a query is misclassified
        # (deletion/insertion explain the prediction: its own map and curve)
        assert len(row["di_each"]) >= row["units_done"]
        assert len(row["unit_seconds"]) == row["units_done"]
        assert row["full_episodes"] == 600
        assert row["full_how"].startswith("extrapolated from")
        assert row["images"] > 0 and row["bare_s"] > 0
    assert rows["torchcam"]["episodes"] == 3 and rows["ours"]["episodes"] == 600
    assert set(rows["ours"]["throughput"]) == {"fp32", "bf16"}
    table = (out / "protocol-cpu.md").read_text()
    assert "torchcam / ours" in table and "extrapolated from" in table
    assert "## protocol" in summary and "## bench_metrics" in summary
