"""``make gpu-wheels``: the wheels a GPU machine without registry access lacks, in ``.whl/``.

The GPU machine (Python 3.12, x86-64 Linux) has torch, torchvision, Lightning, scikit-learn,
statsmodels, pandas, matplotlib, jinja2, timm, opencv-python-headless and their
dependencies (``benchmarks/gpu_packages.txt``), but none of :data:`WHEELS`. This script
downloads those for CPython 3.12 manylinux x86-64 without dependencies, one version each,
and builds the ones published only as a source archive (grad-cam, antlr4-python3-runtime)
with ``pip wheel --no-deps``. It is idempotent: a wheel already there is kept, another
version of a listed package is removed, and so is any wheel that is not listed (``.whl/``
belongs to this script; ``benchmarks/gpu_check.sh`` installs every wheel in it).

``--check`` only checks the set: wheel tags (``py3-none-any`` or cp312 manylinux x86-64),
one wheel per listed package at its listed version, under 60 MiB in all, and every
``Requires-Dist`` (markers evaluated for CPython 3.12 on x86-64 Linux, no extras) and
every dependency of fam-bench itself met by the GPU package list or the wheel set.

Standard library plus ``packaging`` (which pip's own Python has); run it as a script, not
through the ``benchmarks`` package (that imports torch).
"""

from __future__ import annotations

import argparse
import email.parser
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".whl"
GPU_PACKAGES = Path(__file__).resolve().parent / "gpu_packages.txt"

#: (distribution, version, how): "download" a published wheel, or "build" it from the
#: source archive. The versions are the ones the suite is tested with here.
WHEELS = [
    ("antlr4-python3-runtime", "4.9.3", "build"),  # sdist only; omegaconf's parser
    ("grad-cam", "1.5.7", "build"),  # sdist only; reference CAMs in tests and benchmarks
    ("hydra-core", "1.3.8", "download"),
    ("lightly", "1.6.0", "download"),
    ("omegaconf", "2.3.1", "download"),
    ("pytorch-metric-learning", "2.9.0", "download"),
    ("torchcam", "0.5.0", "download"),  # deletion/insertion reference in the benchmarks
    ("ttach", "0.0.3", "download"),  # grad-cam's test-time augmentation dependency
    ("zennit", "0.5.1", "download"),
]
#: What runs on the GPU machine besides fam-bench's own dependencies.
EXTRA_NEEDS = ["pytest", "grad-cam", "torchcam"]
LIMIT_BYTES = 60 * 2**20  # the GPU machine takes 64 MiB per call, the repository included
PYTHON_TAG = "cp312"
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
#: The GPU machine's interpreter, for evaluating environment markers.
GPU_ENVIRONMENT = {
    **default_environment(),
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",
}


def canonical(name: str) -> str:
    """PEP 503 name: ``Grad_CAM`` and ``grad-cam`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def wheel_tags(path: Path) -> list[str]:
    """The ``python-abi-platform`` tags a wheel's file name declares, expanded."""
    python, abi, platform = path.stem.split("-")[-3:]
    return [
        f"{p}-{a}-{q}"
        for p in python.split(".")
        for a in abi.split(".")
        for q in platform.split(".")
    ]


def tag_ok(tag: str) -> bool:
    """Installable by CPython 3.12 on manylinux x86-64."""
    python, abi, platform = tag.split("-")
    if platform == "any":
        return python in ("py3", "py312", PYTHON_TAG) and abi == "none"
    return (
        python == PYTHON_TAG
        and abi in (PYTHON_TAG, "abi3", "none")
        and re.fullmatch(r"manylinux(1|2010|2014|_\d+_\d+)_x86_64", platform) is not None
    )


def requires_dist(path: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        if len(metadata) != 1:
            raise ValueError(f"{path.name}: {len(metadata)} METADATA files, expected 1")
        message = email.parser.Parser().parsestr(archive.read(metadata[0]).decode())
    return message.get_all("Requires-Dist") or []


def gpu_packages(path: Path = GPU_PACKAGES) -> set[str]:
    """Canonical names in the GPU machine's package list (``#`` starts a comment)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonical(line))
    return names


def project_dependencies() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def problems(
    dest: Path,
    available: set[str],
    expected: list[tuple[str, str, str]] = WHEELS,
    needs: list[str] | None = None,
    limit_bytes: int = LIMIT_BYTES,
) -> list[str]:
    """Everything that would stop the wheel set installing and importing on the GPU machine.

    ``available``: canonical names already on that machine; ``needs``: requirements that
    must be met there besides the wheels' own (default: fam-bench's dependencies and
    :data:`EXTRA_NEEDS`).
    """
    if needs is None:
        needs = project_dependencies() + EXTRA_NEEDS
    found: list[str] = []
    wheels = sorted(dest.glob("*.whl"))
    versions: dict[str, list[str]] = {}
    for path in wheels:
        name, version = wheel_name_version(path)
        versions.setdefault(name, []).append(version)
        bad = [t for t in wheel_tags(path) if not tag_ok(t)]
        if bad and not any(tag_ok(t) for t in wheel_tags(path)):
            found.append(f"{path.name}: tag {bad[0]} is not py3-none-any or cp312 manylinux x86_64")
    for name, vs in versions.items():
        if len(vs) > 1:
            found.append(f"{name}: {len(vs)} versions ({', '.join(vs)}); pip installs one")
    for name, version, _ in expected:
        have = versions.get(canonical(name))
        if have is None:
            found.append(f"{name}=={version}: no wheel in {dest}")
        elif version not in have:
            found.append(f"{name}: wheel version {have[0]}, listed {version}")
    listed = {canonical(n) for n, _, _ in expected}
    for name in sorted(set(versions) - listed):
        found.append(f"{name}: a wheel that benchmarks/gpu_wheels.py does not list")
    total = sum(p.stat().st_size for p in wheels)
    if total >= limit_bytes:
        found.append(f"the wheels take {total / 2**20:.1f} MiB, over {limit_bytes / 2**20:.0f}")

    wheel_versions = {n: Version(vs[0]) for n, vs in versions.items()}
    requirements = [(p.name, r) for p in wheels for r in requires_dist(p)]
    requirements += [("fam-bench", r) for r in needs]
    for owner, line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(GPU_ENVIRONMENT):
            continue  # another Python, or an extra
        name = canonical(req.name)
        if name in wheel_versions:
            if req.specifier and not req.specifier.contains(wheel_versions[name], True):
                found.append(
                    f"{owner} requires {line!r}; the wheel set has {name} {wheel_versions[name]}"
                )
        elif name not in available:
            found.append(
                f"{owner} requires {name} ({line!r}), which neither the GPU machine's "
                "package list nor the wheel set has"
            )
    return found


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def fetch(dest: Path) -> None:
    """Bring ``dest`` to exactly the listed wheels, fetching only what is missing."""
    dest.mkdir(exist_ok=True)
    listed = {canonical(n): v for n, v, _ in WHEELS}
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path)
        if listed.get(name) != version:
            print(f"gpu-wheels: removing {path.name} (not listed at this version)")
            path.unlink()
    present = {wheel_name_version(p) for p in dest.glob("*.whl")}
    for name, version, how in WHEELS:
        if (canonical(name), version) in present:
            continue
        with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
            if how == "download":
                platforms = [a for p in PLATFORMS for a in ("--platform", p)]
                _pip(
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--python-version",
                    "3.12",
                    "--implementation",
                    "cp",
                    *platforms,
                    "-d",
                    tmp,
                    f"{name}=={version}",
                )
            else:  # from the source archive, even if a wheel appears on the index later
                _pip(
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    name,
                    "-w",
                    tmp,
                    f"{name}=={version}",
                )
            built = list(Path(tmp).glob("*.whl"))
            if len(built) != 1:
                raise SystemExit(f"gpu-wheels: {name}=={version} gave {len(built)} wheels")
            shutil.move(built[0], dest / built[0].name)
            print(f"gpu-wheels: {built[0].name} ({how})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--check", action="store_true", help="only check the wheel set")
    args = parser.parse_args(argv)
    if not args.check:
        fetch(args.dest)
    found = problems(args.dest, gpu_packages())
    for line in found:
        print(f"gpu-wheels: error: {line}", file=sys.stderr)
    if found:
        return 1
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    print(f"gpu-wheels: {len(wheels)} wheels, {total / 2**20:.2f} MiB in {args.dest}: complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
