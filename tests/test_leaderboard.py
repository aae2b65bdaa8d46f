"""Leaderboard: known means/CIs, ranks, paired Wilcoxon tests, Holm correction, CLI."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from evaluation.leaderboard import (
    build_leaderboard,
    holm,
    load_results,
    main,
    markdown_table,
    mean_ci95,
    metric_direction,
    to_markdown,
)
from fam.errors import FamBenchError

REPO = Path(__file__).resolve().parents[1]
T_975_DF3 = 3.182446305284263  # Student t 0.975 quantile, 3 degrees of freedom (table value)


def results_frame(values: dict[str, dict[str, list[float]]], **table) -> pd.DataFrame:
    """results.csv-shaped rows: method -> metric -> one value per sample (sample_id = position)."""
    defaults = dict(dataset="synthetic", model="conv4", task="fewshot", settings_id="s1")
    defaults.update(table)
    rows = []
    for method, metrics in values.items():
        n = len(next(iter(metrics.values())))
        for i in range(n):
            row = dict(
                sample_id=i,
                episode=i // 3,
                label=i % 5,
                method=method,
                degenerate=False,
                **defaults,
            )
            row.update({metric: vals[i] for metric, vals in metrics.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def row(board: pd.DataFrame, method: str, metric: str, **table) -> pd.Series:
    mask = (board["method"] == method) & (board["metric"] == metric)
    for key, value in table.items():
        mask &= board[key] == value
    assert mask.sum() == 1
    return board[mask].iloc[0]


def test_mean_and_ci_match_hand_computation():
    board = build_leaderboard(results_frame({"fam": {"deletion_auc": [1.0, 2.0, 3.0, 4.0]}}))
    r = row(board, "fam", "deletion_auc")
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    assert r["mean"] == pytest.approx(2.5)
    assert r["ci95"] == pytest.approx(T_975_DF3 * sd / 2)
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((2.5 - r["ci95"], 2.5 + r["ci95"]))
    assert r["n"] == 4


def test_nan_entries_are_left_out_of_mean_and_count():
    mean, half, n = mean_ci95(np.array([1.0, np.nan, 3.0]))
    assert (mean, n) == (2.0, 2)
    assert half == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(mean_ci95(np.array([5.0]))[1])


def test_ranks_respect_direction_and_share_ties():
    board = build_leaderboard(
        results_frame(
            {
                "fam": {
                    "deletion_auc": [0.1, 0.1],
                    "insertion_auc": [0.5, 0.5],
                    "average_drop": [3, 3],
                },
                "gradcam": {
                    "deletion_auc": [0.1, 0.1],
                    "insertion_auc": [0.7, 0.7],
                    "average_drop": [1, 1],
                },
                "random": {
                    "deletion_auc": [0.3, 0.3],
                    "insertion_auc": [0.7, 0.7],
                    "average_drop": [2, 2],
                },
            }
        )
    )
    ranks = {(r.method, r.metric): r.rank for r in board.itertuples()}
    # deletion: lower is better, tie for best
    assert [ranks[m, "deletion_auc"] for m in ("fam", "gradcam", "random")] == [1, 1, 3]
    # insertion: higher is better, tie for best
    assert [ranks[m, "insertion_auc"] for m in ("fam", "gradcam", "random")] == [3, 1, 1]
    assert [ranks[m, "average_drop"] for m in ("fam", "gradcam", "random")] == [3, 1, 2]
    assert set(board.loc[board["metric"] == "average_drop", "better"]) == {"lower"}
    assert metric_direction("pointing_game_other") == "lower"  # hits on the wrong object
    assert metric_direction("energy_pointing_game") == "higher"
    assert set(board.loc[board["metric"] == "insertion_auc", "better"]) == {"higher"}


def test_wilcoxon_p_value_matches_scipy_on_paired_samples():
    rng = np.random.default_rng(0)
    fam = rng.random(20)
    gradcam = fam + rng.normal(0.1, 0.1, 20)
    board = build_leaderboard(
        results_frame(
            {"fam": {"insertion_auc": list(fam)}, "gradcam": {"insertion_auc": list(gradcam)}}
        )
    )
    r = row(board, "gradcam", "insertion_auc")
    assert r["p_value"] == pytest.approx(stats.wilcoxon(gradcam, fam).pvalue, rel=1e-12)
    assert r["n_pairs"] == 20
    assert math.isnan(row(board, "fam", "insertion_auc")["p_value"])  # no test against itself


def test_pairing_uses_sample_ids_not_row_order():
    rng = np.random.default_rng(1)
    fam = rng.random(15)
    other = fam + rng.normal(0.05, 0.2, 15)
    frame = results_frame(
        {"fam": {"deletion_auc": list(fam)}, "gradcam": {"deletion_auc": list(other)}}
    )
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    p_sorted = row(build_leaderboard(frame), "gradcam", "deletion_auc")["p_value"]
    p_shuffled = row(build_leaderboard(shuffled), "gradcam", "deletion_auc")["p_value"]
    assert p_shuffled == pytest.approx(p_sorted, rel=1e-12)
    assert p_sorted == pytest.approx(stats.wilcoxon(other, fam).pvalue, rel=1e-12)
    # Pairing in the wrong (row) order would give another p-value: the test is not vacuous.
    wrong = shuffled[shuffled["method"] == "gradcam"]["deletion_auc"].to_numpy()
    assert stats.wilcoxon(wrong, fam).pvalue != pytest.approx(p_sorted, rel=1e-6)


def test_pairs_never_cross_runs_or_missing_values():
    a = results_frame(
        {
            "fam": {"insertion_auc": [0.1, 0.2, 0.3, 0.4]},
            "gradcam": {"insertion_auc": [0.3, np.nan, 0.6, 0.9]},
        }
    )
    a["episode"] = np.nan  # tasks without episodes: pairing must still work
    b = a.copy()
    a["run"], b["run"] = "run_a", "run_b"
    b["insertion_auc"] = b["insertion_auc"] * 2
    board = build_leaderboard(pd.concat([a, b]))
    r = row(board, "gradcam", "insertion_auc")
    assert r["n_pairs"] == 6  # 3 finite pairs per run, never matched across runs
    x = np.array([0.3, 0.6, 0.9, 0.6, 1.2, 1.8])
    y = np.array([0.1, 0.3, 0.4, 0.2, 0.6, 0.8])
    assert r["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue, rel=1e-12)


def test_identical_scores_give_p_value_one():
    board = build_leaderboard(
        results_frame(
            {
                "fam": {"pointing_game": [1.0, 0.0, 1.0]},
                "center": {"pointing_game": [1.0, 0.0, 1.0]},
            }
        )
    )
    assert row(board, "center", "pointing_game")["p_value"] == 1.0


def test_holm_matches_hand_computation():
    # sorted: 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> monotone max 0.06
    adjusted = holm([0.01, 0.04, 0.03, np.nan])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1


def test_holm_runs_over_all_comparisons_of_one_table():
    rng = np.random.default_rng(2)
    fam = rng.random(12)
    values = {"fam": {"deletion_auc": list(fam), "insertion_auc": list(fam)}}
    for k, method in enumerate(("gradcam", "random")):
        values[method] = {
            "deletion_auc": list(fam + rng.normal(0.05 * k, 0.1, 12)),
            "insertion_auc": list(fam + rng.normal(0.2, 0.1, 12)),
        }
    board = build_leaderboard(results_frame(values))
    tested = board[board["method"] != "fam"]
    assert len(tested) == 4
    np.testing.assert_allclose(tested["p_holm"], holm(tested["p_value"].to_numpy()))
    assert (tested["p_holm"] >= tested["p_value"]).all()


def test_different_settings_never_share_a_table():
    s1 = results_frame(
        {"fam": {"deletion_auc": [0.1, 0.2]}, "gradcam": {"deletion_auc": [0.3, 0.5]}},
        settings_id="step16",
    )
    s2 = results_frame(
        {"fam": {"deletion_auc": [0.9, 0.9]}, "gradcam": {"deletion_auc": [0.1, 0.1]}},
        settings_id="step64",
    )
    board = build_leaderboard(pd.concat([s1, s2], ignore_index=True))
    assert row(board, "fam", "deletion_auc", settings_id="step16")["mean"] == pytest.approx(0.15)
    assert row(board, "fam", "deletion_auc", settings_id="step64")["mean"] == pytest.approx(0.9)
    assert row(board, "fam", "deletion_auc", settings_id="step16")["rank"] == 1
    assert row(board, "fam", "deletion_auc", settings_id="step64")["rank"] == 2
    assert row(board, "gradcam", "deletion_auc", settings_id="step16")["n_pairs"] == 2
    markdown = to_markdown(board)
    assert "`step16`" in markdown and "`step64`" in markdown
    assert markdown.count("## synthetic / conv4 / fewshot") == 2


def test_different_experiments_on_the_same_data_never_share_a_table():
    single = results_frame({"fam": {"pointing_game": [1.0, 1.0]}}, experiment="synthetic_5way")
    pairs = results_frame({"fam": {"pointing_game": [0.0, 1.0]}}, experiment="synthetic_5way_pairs")
    board = build_leaderboard(pd.concat([single, pairs], ignore_index=True))
    assert row(board, "fam", "pointing_game", experiment="synthetic_5way")["mean"] == 1.0
    assert row(board, "fam", "pointing_game", experiment="synthetic_5way_pairs")["mean"] == 0.5
    assert "## synthetic_5way_pairs: synthetic / conv4 / fewshot" in to_markdown(board)


def test_metric_absent_from_a_table_is_omitted_and_degenerate_rate_reported():
    frame = results_frame(
        {
            "fam": {"deletion_auc": [0.1, 0.2], "pointing_game": [np.nan] * 2},
            "random": {"deletion_auc": [0.4, 0.5], "pointing_game": [np.nan] * 2},
        }
    )
    frame.loc[(frame["method"] == "random") & (frame["sample_id"] == 0), "degenerate"] = True
    board = build_leaderboard(frame)
    assert set(board["metric"]) == {"deletion_auc"}
    assert row(board, "random", "deletion_auc")["degenerate_rate"] == 0.5
    assert row(board, "fam", "deletion_auc")["degenerate_rate"] == 0.0


def test_duplicate_samples_are_a_clear_error():
    frame = results_frame({"fam": {"deletion_auc": [0.1, 0.2]}})
    with pytest.raises(FamBenchError, match="sharing"):
        build_leaderboard(pd.concat([frame, frame]))


def test_markdown_bolds_best_marks_significance_and_needs_no_tabulate():
    rng = np.random.default_rng(4)
    fam = rng.random(30)
    board = build_leaderboard(
        results_frame(
            {
                "fam": {"deletion_auc": list(fam)},
                "random": {"deletion_auc": list(fam + 0.5 + rng.normal(0, 0.05, 30))},
            }
        )
    )
    text = to_markdown(board)
    fam_row = next(line for line in text.splitlines() if line.startswith("| fam (ref)"))
    random_row = next(line for line in text.splitlines() if line.startswith("| random"))
    assert f"**{fam.mean():.3f} ± " in fam_row
    assert random_row.split("|")[2].strip().endswith("***")  # p ~ 2e-9 after Holm
    assert "deletion_auc ↓" in text
    # method column left, numbers right; pipes escaped
    assert markdown_table(["a", "b"], [["x|y", "1"]]).splitlines() == [
        "| a | b |",
        "|---|---:|",
        "| x\\|y | 1 |",
    ]


def write_run(folder: Path, frame: pd.DataFrame) -> None:
    folder.mkdir(parents=True)
    frame.to_csv(folder / "results.csv", index=False)


def test_load_results_finds_multirun_subfolders_once(tmp_path):
    frame = results_frame(
        {"fam": {"deletion_auc": [0.1, 0.2]}, "gradcam": {"deletion_auc": [0.3, 0.4]}}
    )
    write_run(tmp_path / "multirun" / "0", frame)
    write_run(tmp_path / "multirun" / "1", frame)
    # the parent and one of its children: each file must be read once
    loaded = load_results([tmp_path / "multirun", tmp_path / "multirun" / "0"])
    assert len(loaded) == 2 * len(frame)
    assert loaded["run"].nunique() == 2
    r = row(build_leaderboard(loaded), "gradcam", "deletion_auc")
    assert r["n_pairs"] == 4 and r["n"] == 4


def test_folder_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FamBenchError, match="no results.csv under"):
        load_results([tmp_path / "empty"])
    with pytest.raises(FamBenchError, match="does not exist"):
        load_results([tmp_path / "nope"])
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad" / "results.csv", index=False)
    with pytest.raises(FamBenchError, match="missing the column"):
        load_results([tmp_path / "bad"])


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    frame = results_frame(
        {"fam": {"deletion_auc": [0.1, 0.2, 0.2]}, "gradcam": {"deletion_auc": [0.3, 0.4, 0.1]}}
    )
    write_run(tmp_path / "run", frame)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "board")]) == 0
    csv = pd.read_csv(tmp_path / "board" / "leaderboard.csv")
    assert set(csv["method"]) == {"fam", "gradcam"}
    markdown = (tmp_path / "board" / "leaderboard.md").read_text()
    assert markdown.startswith("# Leaderboard")
    assert to_markdown(csv) == markdown  # the CSV holds everything the Markdown shows
    assert "fam (ref)" in capsys.readouterr().out


def test_cli_error_is_one_line_exit_2_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.leaderboard", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("fam-bench: error: no results.csv under")
    assert "Traceback" not in done.stderr
