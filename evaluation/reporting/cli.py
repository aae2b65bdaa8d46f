"""The leaderboard command: ``python -m evaluation.reporting`` (``fam-bench-leaderboard``).

``python -m evaluation.reporting OUTPUT_DIRS... [--out DIR] [--reference fam]
[--pool-seeds]`` finds every ``results.csv`` under the given folders (recursively, so a
Hydra multirun folder works as one argument) and writes ``leaderboard.csv`` (tidy: one
row per table x method entry x metric), ``leaderboard.md`` and ``leaderboard.html``
(rules: :mod:`evaluation.reporting.pooling`, :mod:`evaluation.reporting.tables`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from evaluation.reporting.loading import load_results
from evaluation.reporting.report import write_leaderboard
from evaluation.reporting.tables import build_leaderboard
from fam.errors import exit_on_user_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.reporting",
        description="Merge run outputs (folders holding results.csv) into a leaderboard.",
    )
    parser.add_argument("dirs", nargs="+", help="run output folders, searched recursively")
    parser.add_argument("--out", default="outputs/leaderboard", help="where to write")
    parser.add_argument("--reference", default="fam", help="method the others are tested against")
    parser.add_argument(
        "--pool-seeds",
        action="store_true",
        help="pool the seeds of one configuration as a seed level (mean and interval over seeds)",
    )
    args = parser.parse_args(argv)
    board = build_leaderboard(
        load_results(args.dirs), reference=args.reference, pool_seeds=args.pool_seeds
    )
    if args.reference not in set(board["method"]):
        print(
            f"note: reference method {args.reference!r} is in none of the runs; "
            "no paired tests (choose one with --reference).",
            file=sys.stderr,
        )
    csv_path, md_path = write_leaderboard(board, args.out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path}, {md_path} and leaderboard.html", file=sys.stderr)
    return 0


def run() -> NoReturn:
    """The ``fam-bench-leaderboard`` console script: :func:`main` on ``sys.argv``, a user
    error printed as one paragraph with exit status 2."""
    exit_on_user_error(main)
