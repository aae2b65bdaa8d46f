"""What a leaderboard table shows, and the board as Markdown.

:func:`table_view` turns one table of a :func:`evaluation.reporting.tables.build_leaderboard`
frame (or its CSV read back) into header, rows (cells as text: ``mean [low, high]``, bold
for the best, ``n=`` when a metric used fewer samples, ``better/worse`` and stars against
the reference), legend, ground-truth lines, notes and warnings; the Markdown
(:func:`to_markdown`) and the HTML page (:mod:`evaluation.reporting.page`) both draw it.
Above every table sits the parseable label line :data:`TABLE_LABEL`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from evaluation import registry

# Significance markers on Holm-adjusted p-values, strictest first.
P_MARKERS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
#: how each paired test reads in a table's legend (:func:`evaluation.stats.paired_test`)
TEST_WORDS: dict[str, str] = {
    "t-episodes": "paired t over the episode means of the differences, G-1 df (queries of "
    "one episode share prototypes)",
    "wilcoxon": "Wilcoxon signed-rank over independent samples",
    "mcnemar-exact": "exact McNemar over independent samples",
}


def _is_true(value: Any) -> bool:
    return str(value).lower() in ("true", "1", "1.0")


def _json_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value:
        return []
    return list(json.loads(value))


def display_decimals(means: pd.Series) -> int:
    """Decimals the means of one metric are shown with: 1 when a finite mean reaches 10
    (percentages), else 3."""
    finite = means[np.isfinite(means.astype(float))]
    return 1 if len(finite) and finite.abs().max() >= 10 else 3


def format_cell(row: pd.Series | dict, decimals: int, n_common: int | None = None) -> str:
    """``mean [low, high]`` (bold when best), ``n=`` when fewer samples, ``worse ***``."""
    mean = float(row["mean"])
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.{decimals}f}"
    if _is_true(row["best"]):
        text = f"**{text}**"
    low, high = float(row["ci95_low"]), float(row["ci95_high"])
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{decimals}f}, {high:.{decimals}f}]"
    if n_common is not None and int(row["n"]) != n_common:
        text += f" (n={int(row['n'])})"
    p = float(row["p_holm"]) if row["p_holm"] == row["p_holm"] else math.nan
    if math.isfinite(p):
        mark = next((mark for level, mark in P_MARKERS if p < level), "")
        if mark and row["versus"] in ("better", "worse"):
            text += f" {row['versus']} {mark}"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``); ``|`` is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(r) for r in rows)])


def table_view(table: pd.DataFrame) -> dict[str, Any]:
    """What one leaderboard table shows (shared by Markdown and HTML).

    ``header`` and ``rows`` (cells as text, ``**`` marking bold), ``legend``, ``oracle``
    (lines), ``notes`` and ``warnings``. Entries that are identical on every sample are one
    row labelled ``a = b``.
    """
    table = table.assign(
        **{
            c: table[c].astype(object).where(table[c].notna(), "")
            for c in ("reference", "identical_to", "versus")
        }
    )
    reference = next((r for r in table["reference"] if r), "")
    metrics = list(dict.fromkeys(table["metric"]))
    flagged = {
        r.metric
        for r in table.itertuples()
        if r.oracle_separates is not None
        and str(r.oracle_separates) in ("False", "false", "0", "0.0")
    }
    order = table.groupby("method", sort=False)["rank"].mean().sort_values(kind="stable").index
    header = ["method"]
    for m in metrics:
        arrow = "↓" if registry.direction(m) == "lower" else "↑"
        name = "sanity ρ (fully randomised)" if m == "sanity" else m
        header.append(f"{name} {arrow}" + (" ⚠" if m in flagged else ""))
    header += ["n", "degenerate"]
    cells = table.set_index(["method", "metric"])
    decimals = {m: display_decimals(table.loc[table["metric"] == m, "mean"]) for m in metrics}
    body, shown = [], set()
    for method in order:
        if method in shown:
            continue
        mine = table[table["method"] == method]
        group = mine["identical_to"].iloc[0]
        members = group.split(" = ") if group else [method]
        shown.update(members)
        label = " = ".join(f"{m} (ref)" if m == reference else m for m in members)
        per_sample = mine[mine["metric"] != "sanity"]
        n_common = int(per_sample["n_samples"].max()) if len(per_sample) else None
        values = [
            format_cell(cells.loc[(method, m)], decimals[m], None if m == "sanity" else n_common)
            if (method, m) in cells.index
            else "–"
            for m in metrics
        ]
        degenerate = float(mine["degenerate_rate"].astype(float).max())
        count = int(pd.to_numeric(mine["n_degenerate"], errors="coerce").fillna(0).max())
        body.append(
            [
                label,
                *values,
                str(n_common) if n_common is not None else "–",
                f"{count} ({degenerate:.1%})" if math.isfinite(degenerate) else "–",
            ]
        )
    kinds = sorted(set(table.loc[table["metric"] != "sanity", "interval"]))
    legend = (
        f"Mean [95% interval: {', '.join(kinds)}]; bold: best, unless tied at the shown "
        "rounding; (n=k): the metric used k of the n samples."
    )
    legend += " degenerate: rows whose map is constant or non-finite (share of n)."
    if reference:
        tests = sorted({t for t in table["test"] if isinstance(t, str) and t})
        words = "; ".join(f"`{t}`: {TEST_WORDS.get(t, t)}" for t in tests)
        legend += (
            f" better/worse than `{reference}` with Holm-corrected p-values on paired "
            f"samples ({words}): * p<0.05, ** p<0.01, *** p<0.001 (none where the means "
            "are equal at the shown rounding)."
        )
    else:
        legend += " No reference method in this table, so no paired tests."
    oracle = []
    checked = table.drop_duplicates("metric")
    checked = checked[
        checked["oracle_separates"].map(lambda v: v is not None and v == v and v != "")
    ]
    if len(checked):
        good = [r.metric for r in checked.itertuples() if _is_true(r.oracle_separates)]
        bad = [r.metric for r in checked.itertuples() if not _is_true(r.oracle_separates)]
        if good:
            oracle.append(
                "Ground-truth check: `mask` beats `random` (paired, p<0.05) on "
                + ", ".join(good)
                + "."
            )
        if bad:
            oracle.append(
                "⚠ " + ", ".join(bad) + ": does not separate the ground truth from random "
                "here; do not trust its ranking on this setup."
            )
    first = table.iloc[0]
    per_sample = table[table["metric"] != "sanity"]
    seeds = pd.to_numeric(per_sample["n_seeds"], errors="coerce").fillna(1).clip(lower=1)
    samples = pd.to_numeric(per_sample["n_samples"], errors="coerce").fillna(0)
    n = int((samples / seeds).max()) if len(per_sample) else 0
    score = first["score"] if "score" in table.columns else ""
    return {
        "label": table_label(
            str(first["experiment"]), n, "" if score != score else str(score), int(seeds.max())
        ),
        "heading": str(first["heading"]),
        "table_id": str(first["table_id"]),
        "seed": str(first["seed"]) if first["seed"] == first["seed"] else "",
        "header": header,
        "rows": body,
        "legend": legend,
        "oracle": oracle,
        "notes": _json_list(first["notes"]),
        "warnings": _json_list(first["warnings"]),
    }


#: the line above every results table, ``Table: experiment=NAME n=N score=SCORE`` (plus
#: `` seeds=K`` when seeds are pooled; ``n`` is then per seed): README tests parse it
TABLE_LABEL = re.compile(
    r"^Table: experiment=(?P<experiment>\S+) n=(?P<n>\d+) score=(?P<score>\S*)"
    r"(?: seeds=(?P<seeds>\d+))?$"
)


def table_label(experiment: str, n: int, score: str, seeds: int = 1) -> str:
    """The parseable line that labels a results table (:data:`TABLE_LABEL`): the
    experiment (``conf/experiment/<name>.yaml``), samples per seed, and the score the
    metrics read (``metric.score``)."""
    text = f"Table: experiment={experiment or '-'} n={n} score={score or '-'}"
    return text + (f" seeds={seeds}" if seeds > 1 else "")


def views(board: pd.DataFrame) -> list[dict[str, Any]]:
    """:func:`table_view` of every table of a board, in table order."""
    return [table_view(t) for _, t in board.groupby("table", sort=True)]


def to_markdown(board: pd.DataFrame) -> str:
    """Render a :func:`build_leaderboard` frame (or its CSV read back) as Markdown."""
    if board.empty:
        return "No results.\n"
    parts = ["# Leaderboard", ""]
    for view in views(board):
        ident = f"table `{view['table_id']}`" + (f", seed {view['seed']}" if view["seed"] else "")
        parts += [f"## {view['heading']}", "", f"{ident}.", "", view["label"], ""]
        parts += [markdown_table(view["header"], view["rows"]), "", view["legend"], ""]
        parts += [f"{line}" for line in view["oracle"]] + ([""] if view["oracle"] else [])
        parts += [f"- note: {n}" for n in view["notes"]] + ([""] if view["notes"] else [])
        parts += [f"- **warning** {w}" for w in view["warnings"]]
        parts += [""] if view["warnings"] else []
    return "\n".join(parts)
