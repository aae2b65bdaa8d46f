"""HTML reports: self-contained pages, checked in a real headless browser (Chromium)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from browser import chromium_path, load_page
from results_fixtures import config, results_frame, sanity_frame, write_run

from evaluation.reporting.figures import plot_curves
from evaluation.reporting.loading import load_results
from evaluation.reporting.map_grid import plot_map_grid
from evaluation.reporting.page import render
from evaluation.reporting.report import (
    RUN_FIGURES,
    write_leaderboard,
    write_leaderboard_report,
    write_run_report,
)
from evaluation.reporting.tables import build_leaderboard
from fam.errors import FamBenchError

REPO = Path(__file__).resolve().parents[1]
needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason="Chromium is not installed (apt-get install chromium); the HTML report is "
    "checked in a real headless browser",
)
WARNING = {"code": "degenerate_maps", "message": "gradcam: 62% of maps are degenerate"}
METHODS = ("fam", "fam_product", "gradcam", "mask", "random")


def make_run(folder: Path, table_id: str = "t1", max_steps: int = 300) -> Path:
    frame = results_frame(methods=METHODS, identical={"fam_product": "fam"}, table_id=table_id)
    write_run(folder, frame, config(max_steps=max_steps), [WARNING], sanity_frame())
    pd.DataFrame(
        [{"metric": "fewshot_accuracy", "value": 0.76}, {"metric": "episodes", "value": 5}]
    ).to_csv(folder / "task_metrics.csv", index=False)
    g = torch.Generator().manual_seed(0)
    maps = {m: torch.rand(3, 16, 16, generator=g) for m in METHODS}
    plot_map_grid(
        torch.randn(3, 3, 16, 16, generator=g),
        maps,
        None,
        folder / "maps.png",
        (0.5,) * 3,
        (0.25,) * 3,
    )
    rng = np.random.default_rng(0)
    curves = {m: {"deletion": rng.random((4, 9)), "insertion": rng.random((4, 9))} for m in METHODS}
    plot_curves(curves, folder / "curves.png", score_label="episode softmax probability")
    return folder


def test_run_report_is_one_self_contained_file(tmp_path):
    path = write_run_report(make_run(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == len(RUN_FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "62% of maps are degenerate" in page
    assert "fam (ref) = fam_product" in page  # identical methods: one row


def test_run_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FamBenchError, match="no results.csv"):
        write_run_report(tmp_path)


def test_report_cli_writes_the_page(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "elsewhere" / "r.html"
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.reporting.report", str(run), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and done.stdout.strip() == str(out)
    missing = subprocess.run(
        [sys.executable, "-m", "evaluation.reporting.report", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


@needs_chromium
def test_run_report_loads_in_chromium_with_every_figure_and_table(tmp_path):
    page = load_page(write_run_report(make_run(tmp_path / "run")))
    assert page.errors == []
    assert sorted(i["alt"] for i in page.images) == sorted(c for _, c in RUN_FIGURES)
    assert all(i["complete"] and i["width"] > 0 for i in page.images)  # every PNG decoded
    headers = [t["header"][:2] for t in page.tables]
    assert headers == [["method", "deletion_auc ↓"], ["metric", "value"], ["method", "step"]]
    results, task, sanity = page.tables
    assert results["rows"] == len(METHODS) - 1  # fam = fam_product share a row
    assert "sanity ρ (fully randomised) ↓" in results["header"]
    assert task["rows"] == 2 and sanity["rows"] == 3 * 4
    assert "62% of maps are degenerate" in page.text
    assert "Ground-truth check" in page.text


@needs_chromium
def test_leaderboard_report_loads_in_chromium_with_every_table_and_its_figure(tmp_path):
    make_run(tmp_path / "runs" / "long", "t300", 300)
    make_run(tmp_path / "runs" / "short", "t20", 20)
    board = build_leaderboard(load_results([tmp_path / "runs"]))
    write_leaderboard(board, tmp_path / "board")
    page = load_page(tmp_path / "board" / "leaderboard.html")
    assert page.errors == []
    assert len(page.tables) == board["table"].nunique() == 2
    assert len(page.images) == 2 and all(i["width"] > 0 for i in page.images)
    assert "300 training steps" in page.text and "20 training steps" in page.text
    assert page.text.count("62% of maps are degenerate") == 2


@needs_chromium
def test_the_browser_check_catches_console_errors_and_broken_images(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><script>console.error("boom")</script><img src="missing.png" alt="x">'
        "</body></html>"
    )
    page = load_page(bad)
    assert any("boom" in e for e in page.errors)
    assert any("missing.png" in e for e in page.errors)
    assert page.images[0]["width"] == 0


def test_leaderboard_report_writes_without_a_browser(tmp_path):
    board = build_leaderboard(results_frame())
    path = write_leaderboard_report(board, tmp_path / "lb.html")
    text = path.read_text(encoding="utf-8")
    assert text.count("<table") == 1 and "data:image/png;base64," in text


def test_bold_marks_only_the_best_cell_and_stars_stay_text(tmp_path):
    view = {
        "heading": "h",
        "table_id": "t",
        "seed": "",
        "header": ["method", "m"],
        "rows": [["a", "**0.5** [0.4, 0.6]"], ["b", "0.3 [0.2, 0.4] worse ***"]],
        "legend": "* p<0.05, ** p<0.01, *** p<0.001 against `fam`",
        "oracle": [],
        "notes": [],
        "warnings": ["<script>alert(1)</script>"],
    }
    page = render("t", [view])
    assert "<strong>0.5</strong> [0.4, 0.6]" in page
    assert "worse ***" in page and "* p&lt;0.05, ** p&lt;0.01, *** p&lt;0.001" in page
    assert "<code>fam</code>" in page
    assert "<script>" not in page  # autoescaped
