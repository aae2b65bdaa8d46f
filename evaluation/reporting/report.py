"""Report files: one run's ``report.html``, and a leaderboard's CSV, Markdown and HTML.

``python -m evaluation.reporting.report RUN_DIR [--out FILE]`` writes
``RUN_DIR/report.html`` (:func:`write_run_report`): the run's table (the leaderboard rules
applied to this one run: intervals, paired tests, the ground-truth oracle, identical
methods), the task's own accuracy, the sanity cascade per layer, the warnings and notes,
and every figure (``maps.png``, ``curves.png``, ``summary.png``, ``sanity.png``; the last
two are drawn from the data when the run folder lacks them), on one self-contained page
(:mod:`evaluation.reporting.page`). :func:`write_leaderboard` writes ``leaderboard.csv``,
``leaderboard.md`` and ``leaderboard.html`` (:func:`write_leaderboard_report`: every table
with its forest plot).
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.reporting.figures import plot_sanity, plot_summary
from evaluation.reporting.loading import load_results
from evaluation.reporting.page import render
from evaluation.reporting.render import table_view, to_markdown, views
from evaluation.reporting.tables import build_leaderboard
from evaluation.summary import summarise, summarise_sanity
from fam.errors import FamBenchError, exit_on_user_error

RUN_FIGURES: tuple[tuple[str, str], ...] = (
    ("maps.png", "Explanation maps (ground truth outlined)"),
    ("curves.png", "Deletion and insertion curves"),
    ("summary.png", "Mean and 95% interval per method and metric"),
    ("sanity.png", "Model randomisation cascade"),
)


def _png(path: Path, alt: str) -> dict[str, str]:
    return {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "alt": alt}


def _frame_table(title: str, frame: pd.DataFrame, digits: int = 3) -> dict:
    def cell(v: Any) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return {
        "title": title,
        "header": list(frame.columns),
        "rows": [[cell(v) for v in row] for row in frame.itertuples(index=False)],
    }


def _draw(
    kind: str, data: Any, groups: list[list[str]] | None = None, reference: str | None = None
) -> dict | None:
    """A figure drawn from data into a temporary PNG, embedded; None if nothing to draw."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.png"
        try:
            if kind == "summary":
                plot_summary(data, path, groups=groups, reference=reference)
            else:
                plot_sanity(data, path)
        except FamBenchError:
            return None
        caption = dict(RUN_FIGURES)[f"{kind}.png"]
        return _png(path, caption)


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of one run folder (module docstring); returns its path.

    ``out`` defaults to ``RUN_DIR/report.html``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.csv").is_file():
        raise FamBenchError(
            f"{run_dir} has no results.csv; pass a finished run's output folder "
            "(outputs/<experiment>/<time>)."
        )
    results = load_results([run_dir / "results.csv"])
    board = build_leaderboard(results)
    summary_path = run_dir / "summary.csv"
    sanity = results.attrs.get("sanity")
    if summary_path.is_file():
        summary = pd.read_csv(summary_path)
    else:
        summary = summarise(results.drop(columns=["run"]), sanity)
    tables = views(board)
    groups = [g.split(" = ") for g in set(board["identical_to"].dropna()) if g]
    figures = []
    for name, caption in RUN_FIGURES:
        if (run_dir / name).is_file():
            figures.append(_png(run_dir / name, caption))
        elif name == "summary.png":
            drawn = _draw("summary", summary, groups)
            figures += [drawn] if drawn else []
        elif name == "sanity.png" and sanity is not None and not sanity.empty:
            drawn = _draw("sanity", sanity)
            figures += [drawn] if drawn else []
    extras = []
    if (run_dir / "task_metrics.csv").is_file():
        task = pd.read_csv(run_dir / "task_metrics.csv")
        keep = [c for c in ("metric", "value", "untrained") if c in task.columns]
        extras.append(_frame_table("Task metrics", task[keep] if keep else task))
    if sanity is not None and not sanity.empty:
        cascade = summarise_sanity(sanity)
        extras.append(
            _frame_table(
                "Sanity: mean Spearman ρ per randomised layer",
                cascade[["method", "step", "layer", "mean", "ci95_low", "ci95_high", "n"]],
            )
        )
    intro = []
    run_json = run_dir / "run.json"
    if run_json.is_file():
        config = json.loads(run_json.read_text(encoding="utf-8")).get("config", {})
        keys = ("name", "seed", "data", "model", "task")
        intro.append(
            "Configuration: "
            + "; ".join(f"{k}: {json.dumps(config[k])}" for k in keys if k in config)
        )
    settings = run_dir / "settings.json"
    if settings.is_file():
        for note in json.loads(settings.read_text(encoding="utf-8")).get("notes", []):
            intro.append(f"note: {note}")
    title = f"fam-bench run: {tables[0]['heading']}" if tables else "fam-bench run"
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(title, tables, figures, extras=extras, intro=intro), encoding="utf-8")
    return out


def write_leaderboard_report(board: pd.DataFrame, out: str | Path) -> Path:
    """Write the HTML page of a :func:`evaluation.reporting.tables.build_leaderboard` frame: every
    table with its warnings and notes, and its forest plot; returns the path."""
    tables = []
    for _, table in board.groupby("table", sort=True):
        view = table_view(table)
        groups = [g.split(" = ") for g in set(table["identical_to"].dropna()) if g]
        reference = next((r for r in table["reference"].dropna() if r), None)
        drawn = _draw("summary", table, groups, reference)
        view["figures"] = [drawn] if drawn else []
        tables.append(view)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render("fam-bench leaderboard", tables), encoding="utf-8")
    return out


def write_leaderboard(board: pd.DataFrame, out: str | Path, html: bool = True) -> tuple[Path, Path]:
    """Write ``leaderboard.csv``, ``leaderboard.md`` (and ``leaderboard.html``) into ``out``.

    Returns the CSV and Markdown paths.
    """
    out = Path(out)
    csv_path, md_path = out / "leaderboard.csv", out / "leaderboard.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        board.to_csv(csv_path, index=False)
        md_path.write_text(to_markdown(board), encoding="utf-8")
        if html:
            write_leaderboard_report(board, out / "leaderboard.html")
    except OSError as err:
        raise FamBenchError(
            f"The leaderboard cannot be written to {out} ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}). Choose a writable folder "
            "with --out <folder>."
        ) from None
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.reporting.report",
        description="Write a self-contained HTML report (tables, figures, warnings) of a run.",
    )
    parser.add_argument("run_dir", help="a run's output folder (holding results.csv)")
    parser.add_argument("--out", default=None, help="where to write (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    print(write_run_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
