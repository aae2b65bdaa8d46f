"""``python -m evaluation.reporting DIRS...``: the leaderboard (:mod:`evaluation.reporting.cli`)."""

from evaluation.reporting.cli import run

if __name__ == "__main__":
    run()
