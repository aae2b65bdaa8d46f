"""Command-line entry point ``fam-bench`` (= ``python run.py``); ``fam-bench-leaderboard``
(= ``python -m evaluation.reporting``) is :func:`evaluation.reporting.cli.run`.

``fam-bench [experiment=NAME] [overrides...]`` alone runs ``experiment=synthetic_5way``.
Results go to the Hydra run folder (``outputs/<experiment>/<time>``, or
``hydra.run.dir=...``; the same folder again resumes). Sweeps: ``fam-bench -m
experiment=a,b hydra/launcher=joblib``.

User mistakes (an unknown experiment, method, metric or key, a value of the wrong type, a
missing dataset, a checkpoint that does not fit, an impossible episode shape, an image
too small for the model, an output folder that cannot be written, memory that runs out)
print one paragraph to stderr, prefixed ``fam-bench: error:``, and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback. Every value of a
``-m`` sweep is checked the same way before the first job starts.

Signals: SIGINT exits 130 and SIGTERM 143 (also during Lightning training, which would
otherwise turn SIGTERM into a successful exit), each with one line saying what was kept.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from pathlib import Path

from experiments.config import (
    CONF_DIR,
    compose_config,
    method_dirs,
    print_notes,
    with_method_defaults,
)
from experiments.own_data import with_own_data
from experiments.pipeline import run
from experiments.store import SHARD_DIR, check_output_folder
from fam.errors import PREFIX, FamBenchError, out_of_memory_message

EXIT_USER_ERROR = 2
EXIT_SIGTERM = 128 + signal.SIGTERM
#: write failures a user fixes by choosing another folder or freeing space
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
_MULTIRUN_FLAGS = ("-m", "--multirun")


class Terminated(BaseException):
    """SIGTERM arrived; a ``BaseException`` so that no ``except Exception`` swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


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


def _unwritable_message(err: OSError, out: str) -> str:
    where = err.filename or out
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        head, fix = f"Cannot write {where}", "Free some space, or choose folders on another disk"
    elif err.errno == errno.EROFS:
        head, fix = f"Cannot write {where}", "Choose writable folders"
    else:  # permissions, or a file where a folder should be: reading or writing
        head, fix = f"Cannot access {where}", "Check that path (or choose other folders)"
    return (
        f"{head} ({err.strerror or err}). {fix}: the run folder is hydra.run.dir={out}, the "
        "model cache cache_dir=...; finished units are kept and the same command resumes."
    )


def _kept_note(out: str) -> str:
    units = len(list(Path(out, SHARD_DIR).glob("unit_*.pt")))
    return (
        f"fam-bench: terminated (SIGTERM); kept in {out}: {units} finished evaluation "
        f"unit(s) (an interrupted training is not kept). Run the same command with "
        f"hydra.run.dir={out} to resume."
    )


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

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
    except Terminated:
        print(_kept_note(out), file=sys.stderr)
        sys.exit(EXIT_SIGTERM)
    except SystemExit as err:
        # Lightning ends fit() on SIGTERM with its SIGTERMException, a bare SystemExit (0)
        if type(err).__name__ == "SIGTERMException":
            print(_kept_note(out), file=sys.stderr)
            sys.exit(EXIT_SIGTERM)
        raise
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        fail(_unwritable_message(err, out))
    except Exception as err:
        message = _worker_user_error(err) or out_of_memory_message(err)
        if message is None:
            raise
        fail(message)


def _empty_path_override(args: list[str]) -> str | None:
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir"):
            if not value.strip().strip("'\"").strip():
                return key.lstrip("+~")
    return None


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The override lists that check every value of a ``-m`` sweep: one per swept value,
    the other sweeps at their first value (a wrong value is named on its own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        raise FamBenchError(f"{' '.join(str(err).split())}") from None
    first = [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]
    jobs = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                jobs.append([*first[:i], f"{o.get_key_element()}={value}", *first[i + 1 :]])
    return jobs


def _check_before_hydra(args: list[str]) -> None:
    """Compose each job as Hydra will and check its output folder, so that a config
    mistake or an unwritable folder is one paragraph, never Hydra's own traceback."""
    empty = _empty_path_override(args)
    if empty:
        raise FamBenchError(f"{empty} is empty; give a folder, e.g. {empty}=outputs/run1.")
    if any(a.startswith("-") and a not in _MULTIRUN_FLAGS for a in args):
        return  # --help, --cfg, --config-dir ...: Hydra handles those
    multirun = any(a in _MULTIRUN_FLAGS for a in args)
    overrides = [a for a in args if a not in _MULTIRUN_FLAGS]
    jobs = sweep_jobs(overrides) if multirun else [overrides]
    for job in jobs:
        cfg = compose_config(job, return_hydra_config=True)
    flag = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    if not folder.strip():
        raise FamBenchError(f"{flag} is empty; give a folder, e.g. {flag}=outputs/run1.")
    if multirun:  # the jobs' folders are new subfolders of the sweep folder
        check_output_folder(Path(folder) / "__probe__", flag)
    else:
        job = str(cfg.hydra.job.name)  # "app" unless hydra.job.name is given
        check_output_folder(folder, flag, None if job == "app" else f"{job}.log")


def main(argv: list[str] | None = None) -> None:
    """``fam-bench [overrides...]``: compose once to report config mistakes as one
    paragraph, then hand the (method-complete) overrides to Hydra."""
    import hydra

    signal.signal(signal.SIGTERM, _raise_terminated)
    # A log file on a disk that fills would print a traceback per log line ("--- Logging
    # error ---"); the run's own next write reports the full disk as one paragraph.
    logging.raiseExceptions = False
    try:
        args = with_method_defaults(list(sys.argv[1:] if argv is None else argv))
        try:
            if not any(a.startswith("-") for a in args):  # -m, --cfg, --help: Hydra's
                args, notes = with_own_data(args, method_dirs(args))  # data= not E's: E@X
                print_notes(notes)
            _check_before_hydra(args)
        except FamBenchError as err:
            fail(str(err))
        sys.argv = [sys.argv[0], *args]
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    except Terminated:
        print(
            "fam-bench: terminated (SIGTERM) before the run started; nothing was kept.",
            file=sys.stderr,
        )
        sys.exit(EXIT_SIGTERM)
