"""What a run ran on: package versions, git commit, device, host, time, seed and settings.

``write_environment(run_dir / "environment.json", cfg_dict=..., device=..., seed=...)`` is
called once per run so that every number in ``results.csv`` can be traced to the code and
software that produced it. Everything is best effort: a missing package, no git, or a source
tree that is not a checkout gives ``None`` entries, never an error.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from evaluation.plain import plain_container
from experiments.atomic import atomic_write

# Label in environment.json -> distribution name on PyPI.
PACKAGES: dict[str, str] = {
    "fam-bench": "fam-bench",
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "zennit": "zennit",
    "lightly": "lightly",
    "pml": "pytorch-metric-learning",
    "pandas": "pandas",
    "numpy": "numpy",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
}
SOURCE_ROOT = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 10


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`PACKAGES` (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for label, dist in PACKAGES.items():
        try:
            versions[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[label] = None
    return versions


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(repo: str | Path = SOURCE_ROOT) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout rooted at ``repo``, or ``None``.

    ``None`` when git is missing or ``repo`` is not the top of a git work tree (an installed
    package inside some unrelated repository must not report that repository's commit).
    """
    repo = Path(repo).resolve()
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != repo:
        return None
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_info(device: Any = None) -> dict[str, Any]:
    """The device a run used and the CUDA devices visible (names, CUDA / cuDNN versions)."""
    try:
        import torch
    except ImportError:
        return {"device": None if device is None else str(device), "cuda_available": False}
    available = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": None if device is None else str(device),
        "device_name": None,
        "cuda_available": available,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if available else None,
        "cuda_devices": (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if available
            else []
        ),
    }
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and available:
            info["device_name"] = torch.cuda.get_device_name(dev)
        elif dev.type == "cpu":
            info["device_name"] = platform.processor() or platform.machine()
    return info


def _plain(cfg: Any) -> Any:
    """A JSON-safe copy of ``cfg`` (OmegaConf configs resolved; unknown objects as strings)."""
    return json.loads(json.dumps(plain_container(cfg), default=str))


def collect_environment(
    cfg_dict: Any = None,
    device: Any = None,
    seed: int | None = None,
    repo: str | Path = SOURCE_ROOT,
) -> dict[str, Any]:
    """A JSON-safe record of the software, hardware, code version and settings of a run.

    Keys: ``python``, ``platform``, ``packages`` (label -> version or ``None``), ``cuda``
    (:func:`device_info`), ``git`` (:func:`git_state` of ``repo``, the source checkout by
    default), ``hostname``, ``time`` (UTC, ISO 8601), ``seed``, ``argv``, ``settings``
    (``cfg_dict`` resolved).
    """
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": device_info(device),
        "git": git_state(repo),
        "hostname": socket.gethostname(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "argv": list(sys.argv),
        "settings": _plain(cfg_dict),
    }


def write_environment(path: str | Path, **kw: Any) -> dict[str, Any]:
    """Write :func:`collect_environment` (``**kw`` passed on) to ``path`` atomically.

    The JSON goes to a temporary file in the same folder first and is renamed over ``path``,
    so an interrupted run never leaves a half-written file. Returns the record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = collect_environment(**kw)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(env, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)
    return env
