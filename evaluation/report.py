"""Self-contained HTML reports: one page per run folder, one per leaderboard.

``python -m evaluation.report RUN_DIR [--out FILE]`` writes ``RUN_DIR/report.html``: the
run's table (the leaderboard rules applied to this one run: intervals, paired tests, the
ground-truth oracle, identical methods), the task's own accuracy, the sanity cascade per
layer, the warnings and notes, and every figure (``maps.png``, ``curves.png``,
``summary.png``, ``sanity.png``; the last two are drawn from the data when the run folder
lacks them). Figures are embedded as base64 PNG and the page has no script and no
external resource, so it opens anywhere, offline, as one file. The template is Jinja2
(autoescaped).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from fam.errors import FamBenchError, exit_on_user_error

RUN_FIGURES: tuple[tuple[str, str], ...] = (
    ("maps.png", "Explanation maps (ground truth outlined)"),
    ("curves.png", "Deletion and insertion curves"),
    ("summary.png", "Mean and 95% interval per method and metric"),
    ("sanity.png", "Model randomisation cascade"),
)

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
td { white-space: nowrap; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.warning { color: #8a4b00; background: #fff4e0; padding: 0.3em 0.6em; margin: 0.2em 0;
           border-left: 4px solid #e69500; }
.note { color: #444; }
.legend { font-size: 0.85em; color: #555; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f5f5f5; padding: 0 0.2em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% for line in intro %}<p class="note">{{ line }}</p>
{% endfor %}
{% for w in warnings %}<p class="warning">⚠ {{ w }}</p>
{% endfor %}
{% for t in tables %}
<section class="board">
<h2>{{ t.heading }}</h2>
<p class="note">table <code>{{ t.table_id }}</code>{% if t.seed %}, seed {{ t.seed }}{% endif %}</p>
{% for w in t.warnings %}<p class="warning">⚠ {{ w }}</p>
{% endfor %}
<div class="scroll"><table class="results">
<thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell | cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table></div>
<p class="legend">{{ t.legend | md }}</p>
{% for line in t.oracle %}
<p class="{{ 'warning' if line.startswith('⚠') else 'note' }}">{{ line | md }}</p>
{% endfor %}
{% for n in t.notes %}<p class="note">note: {{ n | md }}</p>
{% endfor %}
{% for f in t.figures %}<figure><img src="data:image/png;base64,{{ f.data }}" alt="{{ f.alt }}">
<figcaption>{{ f.alt }}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}
{% for extra in extras %}
<section class="extra">
<h2>{{ extra.title }}</h2>
<table class="results">
<thead><tr>{% for h in extra.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in extra.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
</section>
{% endfor %}
{% for f in figures %}<figure><img src="data:image/png;base64,{{ f.data }}" alt="{{ f.alt }}">
<figcaption>{{ f.alt }}</figcaption></figure>
{% endfor %}
</body>
</html>
"""


def _markdown(text: Any) -> str:
    """```code``` in a line as HTML; the rest escaped (stars stay: they are p-value marks)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text))))


def _cell(text: Any) -> str:
    """A table cell: a leading ``**mean**`` (the best entry) in bold, the rest as text."""
    escaped = html.escape(str(text))
    return Markup(re.sub(r"^\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["md"] = _markdown
    env.filters["cell"] = _cell
    return env


def _png(path: Path, alt: str) -> dict[str, str]:
    return {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "alt": alt}


def render(
    title: str,
    tables: Sequence[dict],
    figures: Sequence[dict] = (),
    warnings: Sequence[str] = (),
    extras: Sequence[dict] = (),
    intro: Sequence[str] = (),
) -> str:
    """The page: ``tables`` as :func:`evaluation.leaderboard.table_view` dicts (each may carry
    ``figures``), ``figures`` ``{"data": base64 PNG, "alt": caption}``, ``extras`` plain
    tables ``{"title", "header", "rows"}``."""
    tables = [{**t, "figures": t.get("figures", [])} for t in tables]
    return (
        _environment()
        .from_string(TEMPLATE)
        .render(
            title=title,
            tables=tables,
            figures=list(figures),
            warnings=list(warnings),
            extras=list(extras),
            intro=list(intro),
        )
    )


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
    from experiments.figures import plot_sanity, plot_summary

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
    from evaluation.leaderboard import build_leaderboard, load_results, views
    from evaluation.summary import summarise, summarise_sanity

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
    """Write the HTML page of a :func:`evaluation.leaderboard.build_leaderboard` frame: every
    table with its warnings and notes, and its forest plot; returns the path."""
    from evaluation.leaderboard import table_view

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.report",
        description="Write a self-contained HTML report (tables, figures, warnings) of a run.",
    )
    parser.add_argument("run_dir", help="a run's output folder (holding results.csv)")
    parser.add_argument("--out", default=None, help="where to write (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    print(write_run_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
