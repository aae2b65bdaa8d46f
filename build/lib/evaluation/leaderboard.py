"""Merge run outputs into a leaderboard with confidence intervals, ranks and paired tests.

``python -m evaluation.leaderboard OUTPUT_DIRS... [--out DIR] [--reference fam]`` finds every
``results.csv`` under the given folders (recursively, so a Hydra multirun folder works as one
argument), and writes ``leaderboard.csv`` (tidy: one row per table x method x metric) and
``leaderboard.md`` (one table per dataset / model / task / metric settings).

Decisions a reader of the numbers should know:

- A *table* is one ``(experiment, dataset, model, task, settings_id)``: results produced
  under different metric settings (step, substrate, tolerance, score, ...) never share a
  column, nor do different experiments on the same data (e.g. ``synthetic_5way`` and its
  two-object ``synthetic_5way_pairs``). ``experiment`` is optional in the input.
- Samples from all runs of a table are pooled; the 95% CI is the Student-t interval of the
  mean over samples (``t_{0.975, n-1} * sd / sqrt(n)``); NaN entries (metric not applicable,
  e.g. an empty mask) are left out and ``n`` counts what remains.
- Ranks are per table and metric, competition style (ties share the best rank: 1, 1, 3);
  lower is better for ``deletion_auc``, ``average_drop`` and the ``*_other`` metrics (hits
  on / energy in the wrong object of a two-object image), higher for every other metric.
- Paired tests: each method against the reference (FAM by default) with the Wilcoxon
  signed-rank test (scipy defaults: two-sided, zero differences dropped) on the samples both
  scored, paired by ``(run, episode, sample_id)``. If every paired difference is zero the
  p-value is 1. p-values are Holm-corrected over all comparisons (methods x metrics) of a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from evaluation.names import LOWER_IS_BETTER, OTHER_OBJECT_METRICS, SAMPLE_METRICS
from fam.errors import FamBenchError, exit_on_user_error

METRICS: tuple[str, ...] = (*SAMPLE_METRICS, *OTHER_OBJECT_METRICS)
TABLE_KEYS: tuple[str, ...] = ("experiment", "dataset", "model", "task", "settings_id")
PAIR_KEYS: tuple[str, ...] = ("run", "episode", "sample_id")
REQUIRED_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "episode",
    "method",
    "dataset",
    "model",
    "task",
    "settings_id",
)
# Significance markers on Holm-adjusted p-values, strictest first.
P_MARKERS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))

LEADERBOARD_COLUMNS: tuple[str, ...] = (
    *TABLE_KEYS,
    "method",
    "metric",
    "better",
    "mean",
    "ci95",
    "ci95_low",
    "ci95_high",
    "n",
    "rank",
    "reference",
    "n_pairs",
    "p_value",
    "p_holm",
    "degenerate_rate",
)


def metric_direction(metric: str) -> str:
    """``"lower"`` if a smaller value of ``metric`` is better, else ``"higher"``."""
    return "lower" if metric in LOWER_IS_BETTER else "higher"


def mean_ci95(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, Student-t 95% CI half-width and count of the finite entries of ``values``.

    The half-width is NaN with fewer than two values (no spread to estimate).
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values; NaN entries stay NaN and do not count in ``m``.

    ``p_holm[(i)] = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the sorted finite p-values.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def paired_wilcoxon(
    table: pd.DataFrame, method: str, reference: str, metric: str
) -> tuple[float, int]:
    """Wilcoxon signed-rank p-value of ``method`` vs ``reference`` on ``metric``, and pair count.

    Rows are matched on ``(run, episode, sample_id)``, whatever their order; only samples with
    a finite value for both methods count. NaN when there is no pair.
    """
    keys = list(PAIR_KEYS)
    ours = table.loc[table["method"] == method, [*keys, metric]]
    theirs = table.loc[table["method"] == reference, [*keys, metric]]
    pairs = ours.merge(theirs, on=keys, suffixes=("_m", "_r"))
    pairs = pairs.dropna(subset=[f"{metric}_m", f"{metric}_r"])
    x = pairs[f"{metric}_m"].to_numpy(float)
    y = pairs[f"{metric}_r"].to_numpy(float)
    if x.size == 0:
        return math.nan, 0
    if np.all(x == y):
        # scipy returns NaN with a warning here; identical scores are no evidence of a difference.
        return 1.0, int(x.size)
    return float(stats.wilcoxon(x, y).pvalue), int(x.size)


def _check_columns(results: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise FamBenchError(
            f"results are missing the column(s) {missing}; a results.csv written by run.py has "
            f"{list(REQUIRED_COLUMNS)} plus one column per metric. Pass run output folders, "
            "not other CSV files."
        )
    if not any(m in results.columns for m in METRICS):
        raise FamBenchError(
            f"results have no metric column; expected at least one of {list(METRICS)}."
        )


def _check_unique_pairs(table: pd.DataFrame, name: str) -> None:
    duplicated = table.duplicated(subset=[*PAIR_KEYS, "method"], keep=False)
    if duplicated.any():
        example = table.loc[duplicated, [*PAIR_KEYS, "method"]].iloc[0].to_dict()
        raise FamBenchError(
            f"table {name} has {int(duplicated.sum())} rows sharing (run, episode, sample_id, "
            f"method), e.g. {example}; each sample must be scored once per method and run. "
            "Was the same results.csv passed twice under different names, or a run resumed "
            "by hand into a copy? Remove the duplicate run folder."
        )


def build_leaderboard(results: pd.DataFrame, reference: str = "fam") -> pd.DataFrame:
    """Aggregate per-sample results into a tidy leaderboard.

    ``results``: one row per sample x method with the ``results.csv`` columns (``run`` and
    ``experiment`` are optional; without them all rows count as one run / experiment).
    Returns one row per ``(experiment, dataset, model, task, settings_id, method, metric)``
    with the columns :data:`LEADERBOARD_COLUMNS`; metrics that are NaN for every row of a
    table are omitted.
    """
    _check_columns(results)
    results = results.copy()
    # Optional columns: without them all rows count as one run / one experiment.
    for optional in ("run", "experiment"):
        present = optional in results.columns
        results[optional] = results[optional].astype(object).fillna("") if present else ""
    metrics = [m for m in METRICS if m in results.columns]
    results[metrics] = results[metrics].apply(pd.to_numeric, errors="coerce")

    rows: list[dict] = []
    for table_key, table in results.groupby(list(TABLE_KEYS), sort=True, dropna=False):
        name = "/".join(str(k) for k in table_key)
        _check_unique_pairs(table, name)
        methods = sorted(table["method"].unique())
        has_reference = reference in methods
        degenerate = (
            table.groupby("method")["degenerate"].apply(lambda s: s.astype(float).mean())
            if "degenerate" in table.columns
            else pd.Series(math.nan, index=methods)
        )
        table_rows: list[dict] = []
        for metric in metrics:
            if not table[metric].notna().any():
                continue
            for method in methods:
                mean, half, n = mean_ci95(table.loc[table["method"] == method, metric])
                if has_reference and method != reference:
                    p_value, n_pairs = paired_wilcoxon(table, method, reference, metric)
                else:
                    p_value, n_pairs = math.nan, 0
                table_rows.append(
                    dict(
                        zip(TABLE_KEYS, table_key, strict=True),
                        method=method,
                        metric=metric,
                        better=metric_direction(metric),
                        mean=mean,
                        ci95=half,
                        ci95_low=mean - half,
                        ci95_high=mean + half,
                        n=n,
                        reference=reference if has_reference else "",
                        n_pairs=n_pairs,
                        p_value=p_value,
                        degenerate_rate=float(degenerate.get(method, math.nan)),
                    )
                )
        adjusted = holm([r["p_value"] for r in table_rows])
        for row, p in zip(table_rows, adjusted, strict=True):
            row["p_holm"] = p
        rows.extend(table_rows)

    board = pd.DataFrame(rows, columns=[c for c in LEADERBOARD_COLUMNS if c != "rank"])
    # Rank by the signed mean so that "1" is always the best; NaN means (no data) get no rank.
    signed = board["mean"].where(board["better"] == "higher", -board["mean"])
    board["rank"] = signed.groupby([board[k] for k in (*TABLE_KEYS, "metric")], dropna=False).rank(
        method="min", ascending=False
    )
    return board[list(LEADERBOARD_COLUMNS)].reset_index(drop=True)


def find_results(dirs: Iterable[str | Path]) -> list[Path]:
    """Every ``results.csv`` under ``dirs`` (recursively), each file once, in a stable order."""
    found: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "results.csv":
            files = [d]
        elif d.is_dir():
            files = sorted(d.rglob("results.csv"))
        else:
            raise FamBenchError(
                f"{d} does not exist; pass run output folders (e.g. outputs/2026-01-01/12-00-00 "
                "or a multirun folder)."
            )
        if not files:
            raise FamBenchError(
                f"no results.csv under {d}: a finished run writes results.csv in its Hydra "
                "output folder (outputs/DATE/TIME, or one subfolder per job of a multirun). "
                "Check the path, or finish/resume the run first (python run.py ... again)."
            )
        for f in files:
            found.setdefault(f.resolve(), None)
    return list(found)


def load_results(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate the ``results.csv`` files under ``dirs``, with a ``run`` column (its folder)."""
    frames = []
    for path in find_results(dirs):
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise FamBenchError(f"{path} is not a readable CSV file ({err}).") from err
        try:
            _check_columns(frame)
        except FamBenchError as err:
            raise FamBenchError(f"{path}: {err}") from err
        frame["run"] = str(path.parent)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _format_cell(row: pd.Series) -> str:
    if not math.isfinite(row["mean"]):
        return "–"
    text = f"{row['mean']:.3f}"
    if math.isfinite(row["ci95"]):
        text += f" ± {row['ci95']:.3f}"
    if row["rank"] == 1:
        text = f"**{text}**"
    p = row["p_holm"]
    if math.isfinite(p):
        # The space keeps the markers literal next to a bold cell's closing "**".
        mark = next((mark for level, mark in P_MARKERS if p < level), "")
        text += f" {mark}" if mark else ""
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``); ``|`` is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(r) for r in rows)])


def to_markdown(df: pd.DataFrame) -> str:
    """Render a :func:`build_leaderboard` frame (or its CSV read back) as Markdown.

    One table per experiment / dataset / model / task / metric settings.

    Cells read ``mean ± CI half-width``; the best mean per column is bold; ``*``, ``**``,
    ``***`` mark Holm-adjusted p < 0.05, 0.01, 0.001 against the reference. Methods are
    ordered by their mean rank over the table's metrics.
    """
    if df.empty:
        return "No results.\n"
    # A CSV read back has NaN where the frame had empty strings.
    df = df.assign(**{c: df[c].astype(object).fillna("") for c in ("experiment", "reference")})
    parts = ["# Leaderboard", ""]
    for table_key, table in df.groupby(list(TABLE_KEYS), sort=True, dropna=False):
        experiment, dataset, model, task, settings_id = table_key
        reference = next((r for r in table["reference"] if r), "")
        metrics = list(dict.fromkeys(table["metric"]))
        order = table.groupby("method")["rank"].mean().sort_values(kind="stable").index
        header = [
            "method",
            *(f"{m} {'↓' if metric_direction(m) == 'lower' else '↑'}" for m in metrics),
            "n",
            "degenerate",
        ]
        cells = table.set_index(["method", "metric"])
        body = []
        for method in order:
            mine = table[table["method"] == method]
            label = f"{method} (ref)" if method == reference else method
            values = [
                _format_cell(cells.loc[(method, m)]) if (method, m) in cells.index else "–"
                for m in metrics
            ]
            degenerate = mine["degenerate_rate"].iloc[0]
            body.append(
                [
                    label,
                    *values,
                    str(int(mine["n"].max())),
                    f"{degenerate:.1%}" if math.isfinite(degenerate) else "–",
                ]
            )
        parts += [
            f"## {f'{experiment}: ' if experiment else ''}{dataset} / {model} / {task}",
            "",
            f"Metric settings: `{settings_id}`.",
            "",
            markdown_table(header, body),
            "",
        ]
        if reference:
            parts += [
                f"Mean ± 95% CI half-width; bold: best. Wilcoxon signed-rank vs `{reference}` "
                "on paired samples, Holm-corrected over this table: * p<0.05, ** p<0.01, "
                "*** p<0.001.",
                "",
            ]
        else:
            parts += [
                "Mean ± 95% CI half-width; bold: best. No reference method in this "
                "table, so no paired tests.",
                "",
            ]
    return "\n".join(parts)


def write_leaderboard(board: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Write ``leaderboard.csv`` and ``leaderboard.md`` into ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "leaderboard.csv", out / "leaderboard.md"
    board.to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(board), encoding="utf-8")
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.leaderboard",
        description="Merge run outputs (folders holding results.csv) into leaderboard.csv/.md.",
    )
    parser.add_argument("dirs", nargs="+", help="run output folders, searched recursively")
    parser.add_argument("--out", default="outputs/leaderboard", help="where to write")
    parser.add_argument("--reference", default="fam", help="method the others are tested against")
    args = parser.parse_args(argv)
    board = build_leaderboard(load_results(args.dirs), reference=args.reference)
    if args.reference not in set(board["method"]):
        print(
            f"note: reference method {args.reference!r} is in none of the runs; "
            "no paired tests (choose one with --reference).",
            file=sys.stderr,
        )
    csv_path, md_path = write_leaderboard(board, args.out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_on_user_error(main)
