"""Command-line entry points: ``fam-bench`` (= ``python run.py``) and
``fam-bench-leaderboard`` (= ``python -m evaluation.leaderboard``).

``fam-bench [experiment=NAME] [overrides...]`` alone runs ``experiment=synthetic_5way``.
Results go to the Hydra run folder (``outputs/<experiment>/<time>``, or
``hydra.run.dir=...``; the same folder again resumes). Sweeps: ``fam-bench -m
experiment=a,b hydra/launcher=joblib``.

User mistakes (an unknown experiment, method, metric or key, a value of the wrong type, a
missing dataset, a checkpoint that does not fit, an impossible episode shape, an image
too small for the model, an unwritable folder) print one paragraph to stderr, prefixed
``fam-bench: error:``, and exit with status 2, without a traceback; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from experiments.config import CONF_DIR, compose_config, print_notes, with_method_defaults
from fam.errors import PREFIX, FamBenchError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    print(f"{PREFIX}{message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _worker_user_error(err: BaseException) -> str | None:
    """A user mistake raised in a spawned evaluation process arrives wrapped, with the
    worker's traceback as text: its message, or ``None`` if it is not one."""
    marker = f"{FamBenchError.__module__}.{FamBenchError.__name__}: "
    text = str(err)
    if type(err).__name__ != "ProcessRaisedException" or marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip()


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.pipeline import run

    out = HydraConfig.get().runtime.output_dir
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
        message = _worker_user_error(err)
        if message is None:
            raise
        fail(message)


def main(argv: list[str] | None = None) -> None:
    """``fam-bench [overrides...]``: compose once to report config mistakes as one
    paragraph, then hand the (method-complete) overrides to Hydra."""
    import hydra

    from experiments.own_data import with_own_data

    args = with_method_defaults(list(sys.argv[1:] if argv is None else argv))
    if not any(a.startswith("-") for a in args):  # -m, --cfg, --help: Hydra handles those
        args, notes = with_own_data(args)  # another data= under an experiment: E@X
        print_notes(notes)
        try:
            compose_config(args)
        except FamBenchError as err:
            fail(str(err))
    sys.argv = [sys.argv[0], *args]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


def leaderboard() -> None:
    """``fam-bench-leaderboard DIRS... [--out DIR] [--reference fam]``."""
    from evaluation.leaderboard import main as board
    from fam.errors import exit_on_user_error

    exit_on_user_error(lambda: board(sys.argv[1:]))
