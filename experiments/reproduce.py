"""Run every experiment whose data is present, then build the leaderboard over them.

``python -m experiments.reproduce --data-root DIR [--out DIR] [hydra overrides...]`` looks for
each experiment's dataset folder directly under ``DIR`` (names in :data:`EXPERIMENT_DATA`),
runs ``python run.py experiment=X data.root=... hydra.run.dir=OUT/X [overrides]`` for those
found and for every synthetic experiment (no data needed), prints a note naming what is
missing and where it was looked for for the others, and finally writes ``leaderboard.csv`` /
``leaderboard.md`` into ``OUT`` from the runs that finished. Re-running resumes: each
experiment keeps its output folder, and the runner continues where it stopped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.reporting.loading import load_results
from evaluation.reporting.report import write_leaderboard
from evaluation.reporting.tables import build_leaderboard
from fam.errors import FamBenchError, exit_on_user_error


@dataclass(frozen=True)
class DataSpec:
    """Where an experiment's data lives under ``--data-root``.

    ``folders``: accepted names of the dataset folder (first match wins, case-insensitive).
    ``root_is_parent``: pass the folder's parent as ``data.root`` (torchvision-style layouts
    such as ``cifar-10-batches-py`` are found inside the root), otherwise the folder itself.
    """

    folders: tuple[str, ...]
    root_is_parent: bool = False


# The one place that says which experiment needs which data. Experiments in conf/experiment
# that are not listed here run without data if their config uses the synthetic dataset.
EXPERIMENT_DATA: dict[str, DataSpec] = {
    "miniimagenet_5way": DataSpec(("miniimagenet", "mini-imagenet", "mini_imagenet")),
    "tieredimagenet_5way": DataSpec(("tieredimagenet", "tiered-imagenet", "tiered_imagenet")),
    "cub_5way": DataSpec(("CUB_200_2011",)),
    "retrieval_cub": DataSpec(("CUB_200_2011",)),
    "simclr_cifar10": DataSpec(("cifar-10-batches-py",), root_is_parent=True),
    "simclr_stl10": DataSpec(("stl10_binary",), root_is_parent=True),
    "retrieval_sop": DataSpec(("Stanford_Online_Products",)),
    "retrieval_cars": DataSpec(("cars196",)),
}
SOURCE_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = SOURCE_ROOT / "conf" / "experiment"


@dataclass(frozen=True)
class Planned:
    """One experiment's fate: run it (``skip is None``) with ``data_root``, or skip it."""

    experiment: str
    data_root: Path | None
    skip: str | None = None


Runner = Callable[[str, Path | None, Path, Sequence[str]], int]


def find_data(data_root: Path, spec: DataSpec) -> Path | None:
    """The ``data.root`` to pass for ``spec`` under ``data_root``, or ``None`` if absent."""
    children = {p.name.lower(): p for p in data_root.iterdir() if p.is_dir()}
    for name in spec.folders:
        folder = children.get(name.lower())
        if folder is not None:
            return data_root if spec.root_is_parent else folder
    return None


def uses_synthetic_data(config_path: Path, _seen: frozenset[Path] = frozenset()) -> bool:
    """Whether an experiment config selects the synthetic dataset.

    Looks at ``override /data: synthetic`` (or ``data: synthetic``) in the defaults list,
    ``data.name``, and, recursively, at sibling experiment configs it extends
    (``defaults: [synthetic_5way, _self_]``); the last selection wins, as in Hydra.
    """
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.load(config_path)
    if not isinstance(cfg, DictConfig):
        return False
    synthetic = False
    for entry in cfg.get("defaults", None) or []:
        if isinstance(entry, DictConfig):
            for key, value in entry.items():
                if str(key).split()[-1].strip("/") == "data":
                    synthetic = value == "synthetic"
        else:
            parent = config_path.parent / f"{entry}.yaml"
            if entry != "_self_" and parent.is_file() and parent not in _seen:
                synthetic = uses_synthetic_data(parent, _seen | {config_path})
    data = cfg.get("data", None)
    if isinstance(data, DictConfig) and "name" in data:
        synthetic = data.get("name") == "synthetic"
    return synthetic


def plan(data_root: str | Path, conf_dir: str | Path = CONF_DIR) -> list[Planned]:
    """Decide, for every known experiment, whether it can run under ``data_root``.

    Known experiments: the keys of :data:`EXPERIMENT_DATA` and every config in ``conf_dir``.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FamBenchError(
            f"--data-root {data_root} is not a folder; pass the folder that holds the datasets "
            f"(e.g. {data_root}/CUB_200_2011, {data_root}/cifar-10-batches-py)."
        )
    conf_dir = Path(conf_dir)
    configs = {p.stem: p for p in sorted(conf_dir.glob("*.yaml"))}
    planned = []
    for experiment in sorted(set(EXPERIMENT_DATA) | set(configs)):
        if experiment not in configs:
            planned.append(
                Planned(
                    experiment,
                    None,
                    f"skipped {experiment}: no config {conf_dir / (experiment + '.yaml')}",
                )
            )
        elif experiment in EXPERIMENT_DATA:
            spec = EXPERIMENT_DATA[experiment]
            root = find_data(data_root, spec)
            if root is None:
                where = " or ".join(str(data_root / f) for f in spec.folders)
                planned.append(
                    Planned(
                        experiment,
                        None,
                        f"skipped {experiment}: its data is missing (looked for {where})",
                    )
                )
            else:
                planned.append(Planned(experiment, root))
        elif uses_synthetic_data(configs[experiment]):
            planned.append(Planned(experiment, None))
        else:
            planned.append(
                Planned(
                    experiment,
                    None,
                    f"skipped {experiment}: it is not synthetic and experiments/reproduce.py "
                    "EXPERIMENT_DATA does not say which data folder it needs (add it there)",
                )
            )
    return planned


def _override_value(path: Path) -> str:
    # Hydra's override grammar needs quotes around values with spaces, commas, '=' etc.
    text = str(path.resolve())
    return text if re.fullmatch(r"[\w/.:+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def command(
    experiment: str, data_root: Path | None, out_dir: Path, overrides: Sequence[str]
) -> list[str]:
    """The ``run.py`` command line for one experiment."""
    cmd = [sys.executable, "run.py", f"experiment={experiment}"]
    if data_root is not None:
        cmd.append(f"data.root={_override_value(data_root)}")
    cmd.append(f"hydra.run.dir={_override_value(out_dir)}")
    return [*cmd, *overrides]


def run_experiment(
    experiment: str, data_root: Path | None, out_dir: Path, overrides: Sequence[str]
) -> int:
    """Run one experiment as a subprocess of ``run.py`` in the source tree; its exit code."""
    return subprocess.run(
        command(experiment, data_root, out_dir, overrides), cwd=SOURCE_ROOT, check=False
    ).returncode


def reproduce(
    data_root: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    runner: Runner = run_experiment,
    conf_dir: str | Path = CONF_DIR,
    echo: Callable[[str], None] = print,
    reference: str = "fam",
) -> dict[str, str]:
    """Run what can run, then write the leaderboard of the finished runs into ``out``.

    Returns experiment -> ``"done"``, ``"failed (exit N)"``, ``"no results"`` or the skip note.
    """
    out = Path(out)
    status: dict[str, str] = {}
    finished: list[Path] = []
    for item in plan(data_root, conf_dir):
        if item.skip is not None:
            echo(f"note: {item.skip}")
            status[item.experiment] = item.skip
            continue
        run_dir = out / item.experiment
        echo(
            f"running {item.experiment}"
            + (f" on {item.data_root}" if item.data_root is not None else " (synthetic data)")
            + f" -> {run_dir}"
        )
        code = runner(item.experiment, item.data_root, run_dir, overrides)
        if code != 0:
            status[item.experiment] = f"failed (exit {code})"
            echo(
                f"note: {item.experiment} failed with exit code {code}; left out of the "
                "leaderboard (re-run to resume it)"
            )
        elif not any(run_dir.rglob("results.csv")):
            status[item.experiment] = "no results"
            echo(f"note: {item.experiment} finished but wrote no results.csv under {run_dir}")
        else:
            status[item.experiment] = "done"
            finished.append(run_dir)
    if finished:
        board = build_leaderboard(load_results(finished), reference=reference)
        csv_path, md_path = write_leaderboard(board, out)
        echo(f"leaderboard over {len(finished)} experiment(s): {csv_path}, {md_path}")
    else:
        echo("note: no experiment finished, so there is no leaderboard")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description="Run every experiment whose data is under --data-root, then the "
        "leaderboard. Extra arguments are Hydra overrides passed to every run.",
    )
    parser.add_argument("--data-root", required=True, help="folder holding the datasets")
    parser.add_argument("--out", default="outputs/reproduce", help="one subfolder per run")
    parser.add_argument("--reference", default="fam", help="leaderboard reference method")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    status = reproduce(args.data_root, args.out, args.overrides, reference=args.reference)
    ran = [s for s in status.values() if not s.startswith("skipped")]
    return 0 if ran and all(s == "done" for s in ran) else 1


if __name__ == "__main__":
    exit_on_user_error(main)
