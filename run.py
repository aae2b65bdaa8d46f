"""fam-bench entry point: ``python run.py [experiment=NAME] [overrides...]``.

``python run.py`` alone runs ``experiment=synthetic_5way`` (trains or reuses a Conv-4
ProtoNet on synthetic shapes and evaluates every method with every metric). Results go to
the Hydra run folder (``outputs/<experiment>/<time>``, or ``hydra.run.dir=...``; the same
folder again resumes). Sweeps: ``python run.py -m experiment=a,b hydra/launcher=joblib``.

User mistakes (unknown experiment, method or metric, missing dataset, a checkpoint that
does not fit, an impossible episode shape) print one paragraph to stderr and exit with
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fam.errors import FamBenchError

CONF_DIR = Path(__file__).resolve().parent / "conf"
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    print(f"fam-bench: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run one experiment into the Hydra output folder (or ``cfg.output_dir``)."""
    from experiments.pipeline import run

    if HydraConfig.initialized():
        out = HydraConfig.get().runtime.output_dir
    else:  # called directly with a composed config (tests, notebooks)
        out = cfg.get("output_dir") or "outputs/direct"
    try:
        run(cfg, out)
    except FamBenchError as err:
        fail(str(err))
    except KeyboardInterrupt:
        print(
            f"fam-bench: interrupted; finished units are kept in {out}. Run the same command "
            f"with hydra.run.dir={out} to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as err:
        # A user mistake raised inside a spawned evaluation process (trainer.devices > 1)
        # arrives wrapped, with the worker's traceback as text: show only its message.
        message = _worker_user_error(err)
        if message is None:
            raise
        fail(message)


def _worker_user_error(err: BaseException) -> str | None:
    marker = f"{FamBenchError.__module__}.{FamBenchError.__name__}: "
    text = str(err)
    if type(err).__name__ != "ProcessRaisedException" or marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip()


def check_overrides(args: list[str]) -> None:
    """Compose the config once before Hydra runs, so that a bad override (an unknown
    experiment, model or key) is a one-paragraph error with exit status 2.

    Skipped when flags are given (``-m``, ``--cfg``, ``--help``...): Hydra handles those
    (sweep values cannot be composed as one config).
    """
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("Config search path:")[0]
        head, _, options = text.partition("Available options in")
        message = " ".join(head.split()).rstrip(".") + "."
        if options:
            group, _, names = options.partition(":")
            message += f" Available options in {group.strip()}: {', '.join(names.split())}."
        fail(f"{message} (python run.py --help lists the config groups and their options.)")


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
