"""README results tables cannot drift from the suite (issue 25).

Every leaderboard table in README.md and docs/**/*.md carries the line the leaderboard
writes above it (``Table: experiment=NAME n=N score=SCORE``,
:data:`evaluation.reporting.render.TABLE_LABEL`). The experiment it names must exist in
``conf/experiment`` and ``n`` must be the number of samples that experiment explains,
computed from its composed config. A README without a labelled table fails: its tables
are regenerated from runs with ``python -m evaluation.reporting``, which labels them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.reporting.render import TABLE_LABEL, table_label

REPO = Path(__file__).resolve().parents[1]


def documents() -> list[Path]:
    docs = sorted((REPO / "docs").rglob("*.md")) if (REPO / "docs").is_dir() else []
    return [REPO / "README.md", *docs]


def is_results_table(line: str) -> bool:
    """A leaderboard results table's header row (method, metrics, n, degenerate)."""
    return line.startswith("| method |") and line.rstrip().endswith("| n | degenerate |")


def labels_and_tables(text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, bool]]]:
    """Label lines (line number, fields) and results tables (line number, labelled?): a
    table is labelled when the label is the last non-blank line before its header."""
    labels, tables = [], []
    previous = ""
    for number, line in enumerate(text.splitlines(), start=1):
        found = TABLE_LABEL.match(line.strip())
        if found:
            labels.append((number, found.groupdict()))
        if is_results_table(line):
            tables.append((number, bool(TABLE_LABEL.match(previous.strip()))))
        if line.strip():
            previous = line
    return labels, tables


def experiment_samples(name: str) -> int:
    """Samples the experiment explains, from its composed config: few-shot episodes x
    ways x queries; neighbour tasks (retrieval, contrastive) ``eval.num_queries``."""
    from experiments.config import compose_config

    cfg = compose_config([f"experiment={name}"])
    if cfg.task.name == "fewshot":
        return int(cfg.eval.num_episodes * cfg.eval.n_way * cfg.eval.n_query)
    if cfg.eval.num_queries is None:
        pytest.fail(
            f"experiment {name} explains its whole split (eval.num_queries: null), whose size "
            "only the data knows; label README tables from experiments with num_queries set."
        )
    return int(cfg.eval.num_queries)


def test_label_lines_parse_back():
    line = table_label("synthetic_5way", 50, "probability")
    assert line == "Table: experiment=synthetic_5way n=50 score=probability"
    assert TABLE_LABEL.match(line).groupdict() == {
        "experiment": "synthetic_5way", "n": "50", "score": "probability", "seeds": None,
    }  # fmt: skip
    pooled = TABLE_LABEL.match(table_label("synthetic_5way", 50, "probability", seeds=3))
    assert pooled["seeds"] == "3"


def test_scanner_finds_labelled_and_unlabelled_tables():
    header = "| method | deletion_auc ↓ | n | degenerate |"
    text = "\n".join(
        [
            "Table: experiment=synthetic_5way n=50 score=probability", "", header, "|---|",
            "", "## other", "", header,
        ]
    )  # fmt: skip
    labels, tables = labels_and_tables(text)
    assert [f["experiment"] for _, f in labels] == ["synthetic_5way"]
    assert tables == [(3, True), (8, False)]
    assert experiment_samples("synthetic_5way") == 5 * 5 * 2


def test_every_readme_results_table_names_an_existing_experiment_and_its_n():
    experiments = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    problems, count = [], 0
    samples: dict[str, int] = {}
    for path in documents():
        labels, tables = labels_and_tables(path.read_text(encoding="utf-8"))
        where = path.relative_to(REPO)
        problems += [
            f"{where}:{line}: results table without a `Table: experiment=... n=... score=...` "
            "line above it"
            for line, labelled in tables
            if not labelled
        ]
        for line, fields in labels:
            count += path.name == "README.md"
            name = fields["experiment"]
            if name not in experiments:
                problems.append(f"{where}:{line}: experiment {name!r} is not in conf/experiment")
                continue
            if name not in samples:
                samples[name] = experiment_samples(name)
            if int(fields["n"]) != samples[name]:
                problems.append(
                    f"{where}:{line}: n={fields['n']} but experiment {name} explains "
                    f"{samples[name]} samples"
                )
    assert count > 0, "README.md has no labelled results table (Table: experiment=... n=...)"
    assert not problems, "\n".join(problems)
