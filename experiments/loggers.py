"""Run loggers on Lightning's logger classes: ``logger=csv`` (default), ``wandb``,
``tensorboard``.

Each receives, once per run: the resolved config as hyperparameters, the summary means as
metrics named ``<method>/<metric>``, the task metrics as ``task/<name>``, and (wandb,
TensorBoard) the figures as images. Everything goes under ``<run dir>/logs``. wandb and
TensorBoard are imported only when chosen; a missing package is a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fam.errors import FamBenchError

LOGGERS = ("csv", "wandb", "tensorboard")


class RunLogger:
    """Wraps one Lightning logger; ``log_run`` writes everything at the end of a run."""

    def __init__(self, logger: Any, kind: str) -> None:
        self.logger, self.kind = logger, kind

    def log_run(
        self,
        cfg: dict[str, Any],
        summary: pd.DataFrame,
        task_metrics: pd.DataFrame,
        figures: Sequence[Path],
    ) -> None:
        self.logger.log_hyperparams(cfg)
        metrics = {
            f"{r.method}/{r.metric}": float(r.mean)
            for r in summary.itertuples()
            if not math.isnan(float(r.mean))
        }
        metrics.update({f"task/{r.metric}": float(r.value) for r in task_metrics.itertuples()})
        self.logger.log_metrics(metrics, step=0)
        for path in figures:
            self._log_image(Path(path))
        self.logger.finalize("success")

    def _log_image(self, path: Path) -> None:
        if self.kind == "wandb":
            self.logger.log_image(key=path.stem, images=[str(path)])
        elif self.kind == "tensorboard":
            from matplotlib.image import imread

            image = imread(path)[..., :3]
            self.logger.experiment.add_image(path.stem, image, 0, dataformats="HWC")


def _require(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise FamBenchError(
            f"logger={extra} needs the {module!r} package, which is not installed: "
            f"pip install 'fam-bench[{extra}]' (or use logger=csv)."
        ) from err


def log_version(logs: Path) -> str:
    """Where this run's logs go below ``logs``: ``logs`` itself for the first run of the
    folder, ``logs/run_<k>`` for the k-th (a resumed or repeated run), so the training
    curves of an earlier run are kept beside the new ones, never replaced (Lightning's
    CSV logger would rewrite ``metrics.csv``)."""
    if not logs.is_dir() or not any(p.is_file() for p in logs.iterdir()):
        return ""
    k = 2
    while (logs / f"run_{k}").exists():
        k += 1
    return f"run_{k}"


def build_logger(cfg: dict[str, Any], out: Path, run_name: str) -> RunLogger:
    """The logger named by ``cfg.name`` writing under ``out / "logs"`` (:func:`log_version`)."""
    kind = str(cfg.get("name", "csv"))
    save_dir = str(Path(out) / "logs")
    version = log_version(Path(save_dir))
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return RunLogger(CSVLogger(save_dir, name="", version=version), kind)
    if kind == "tensorboard":
        _require("tensorboard", "tensorboard")
        from pytorch_lightning.loggers import TensorBoardLogger

        return RunLogger(TensorBoardLogger(save_dir, name="", version=version), kind)
    if kind == "wandb":
        _require("wandb", "wandb")
        from pytorch_lightning.loggers import WandbLogger

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        return RunLogger(
            WandbLogger(
                name=run_name,
                save_dir=save_dir,
                project=str(cfg.get("project", "fam-bench")),
                entity=cfg.get("entity"),
                offline=bool(cfg.get("offline", True)),
            ),
            kind,
        )
    raise FamBenchError(f"Unknown logger {kind!r}; use one of {list(LOGGERS)} (logger=...).")
