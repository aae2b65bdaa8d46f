"""Leaderboard: pooling rules, headings in words, intervals and tests, ranking, flags, CLI."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from results_fixtures import config, results_frame, sanity_frame, write_run
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar

from evaluation import stats
from evaluation.reporting.cli import main
from evaluation.reporting.loading import load_results
from evaluation.reporting.render import markdown_table, to_markdown
from evaluation.reporting.tables import build_leaderboard, holm, metric_direction
from fam.errors import FamBenchError

REPO = Path(__file__).resolve().parents[1]


def row(board: pd.DataFrame, method: str, metric: str, **table) -> pd.Series:
    mask = (board["method"] == method) & (board["metric"] == metric)
    for key, value in table.items():
        mask &= board[key] == value
    assert mask.sum() == 1, board.loc[mask, ["table", "method", "metric"]]
    return board[mask].iloc[0]


def md_row(text: str, prefix: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {prefix}"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_two_runs_that_differ_only_in_training_steps_give_two_tables_with_worded_headings(
    tmp_path,
):
    write_run(tmp_path / "long", results_frame(table_id="t300"), config(max_steps=300))
    write_run(tmp_path / "short", results_frame(table_id="t20"), config(max_steps=20))
    board = build_leaderboard(load_results([tmp_path]))
    assert board["table"].nunique() == 2
    headings = set(board["heading"])
    assert headings == {
        "synthetic_5way: synthetic / conv4_32 / fewshot, 300 training steps",
        "synthetic_5way: synthetic / conv4_32 / fewshot, 20 training steps",
    }
    assert set(board.loc[board["metric"] == "deletion_auc", "n"]) == {50}
    markdown = to_markdown(board)
    assert "## synthetic_5way: synthetic / conv4_32 / fewshot, 20 training steps" in markdown


def test_model_options_go_into_the_model_part_of_the_heading_and_labels_are_config_names(
    tmp_path,
):
    write_run(
        tmp_path / "a", results_frame(table_id="ta"), config(pools=(True, True, False, False))
    )
    write_run(tmp_path / "b", results_frame(table_id="tb"), config(pools=(True,) * 4))
    board = build_leaderboard(load_results([tmp_path]))
    assert set(board["heading"]) == {
        "synthetic_5way: synthetic / conv4_32 (pools [T,T,F,F]) / fewshot",
        "synthetic_5way: synthetic / conv4_32 (pools [T,T,T,T]) / fewshot",
    }
    assert set(board["model"]) == {"conv4_32"}


def test_tables_without_configs_still_get_distinct_headings():
    frame = pd.concat([results_frame(table_id="ta"), results_frame(table_id="tb")])
    headings = set(build_leaderboard(frame)["heading"])
    assert len(headings) == 2 and all("(table t" in h for h in headings)


def test_a_folder_passed_twice_or_a_repeated_run_does_not_change_n(tmp_path):
    write_run(tmp_path / "run", results_frame(), config())
    once = build_leaderboard(load_results([tmp_path / "run"]))
    twice = build_leaderboard(load_results([tmp_path / "run", tmp_path / "run", tmp_path]))
    shutil.copytree(tmp_path / "run", tmp_path / "repeat")
    repeated = build_leaderboard(load_results([tmp_path / "run", tmp_path / "repeat"]))
    for board in (twice, repeated):
        assert board["table"].nunique() == 1
        pd.testing.assert_series_equal(board["n"], once["n"])
        pd.testing.assert_series_equal(board["mean"], once["mean"])
    notes = json.loads(repeated["notes"].iloc[0])
    assert any("counted once" in n for n in notes)
    assert "counted once" in to_markdown(repeated)


def test_the_same_sample_twice_in_one_file_is_refused():
    frame = results_frame()
    with pytest.raises(FamBenchError, match="share \\(table_id, seed, method"):
        build_leaderboard(pd.concat([frame, frame]))


def test_seeds_are_separate_tables_unless_pooled_as_a_seed_level():
    frame = pd.concat([results_frame(seed=0), results_frame(seed=1)], ignore_index=True)
    separate = build_leaderboard(frame)
    assert separate["table"].nunique() == 2
    assert set(separate["seed"]) == {"0", "1"}
    pooled = build_leaderboard(frame, pool_seeds=True)
    assert pooled["table"].nunique() == 1
    r = row(pooled, "fam", "deletion_auc")
    seed_means = frame[frame["method"] == "fam"].groupby("seed")["deletion_auc"].mean()
    expected = stats.t_interval(seed_means.to_numpy())
    assert (r["mean"], r["ci95_low"], r["ci95_high"]) == pytest.approx(
        (expected.mean, expected.low, expected.high)
    )
    assert (r["interval"], r["n"], r["n_seeds"]) == ("t-seeds", 100, 2)
    assert r["seed"] == "0,1"
    hits = row(pooled, "fam", "pointing_game")
    assert 0.0 <= hits["ci95_low"] <= hits["ci95_high"] <= 1.0
    # Pairs never cross seeds: sample ids are matched within a seed.
    assert row(pooled, "gradcam", "deletion_auc")["n_pairs"] == 100
    assert "pooled as a seed level" in to_markdown(pooled)


def test_cli_pool_seeds_flag(tmp_path):
    write_run(tmp_path / "s0", results_frame(seed=0), config(seed=0))
    write_run(tmp_path / "s1", results_frame(seed=1), config(seed=1))
    main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "b"), "--pool-seeds"])
    board = pd.read_csv(tmp_path / "b" / "leaderboard.csv")
    assert board["table"].nunique() == 1
    main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "c")])
    board = pd.read_csv(tmp_path / "c" / "leaderboard.csv")
    assert board["table"].nunique() == 2
    assert any("seed 1" in h for h in board["heading"])


def test_binary_metrics_get_wilson_intervals_and_exact_mcnemar_tests():
    """Independent samples (retrieval): Wilson intervals, exact McNemar, Wilcoxon."""
    frame = results_frame().assign(task="retrieval")
    board = build_leaderboard(frame)
    r = row(board, "gradcam", "pointing_game")
    assert r["interval"] == "wilson" and r["test"] == "mcnemar-exact"
    x = frame.loc[frame["method"] == "gradcam", "pointing_game"].to_numpy() > 0.5
    y = frame.loc[frame["method"] == "fam", "pointing_game"].to_numpy() > 0.5
    table = [[np.sum(x & y), np.sum(x & ~y)], [np.sum(~x & y), np.sum(~x & ~y)]]
    assert r["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
    assert 0.0 <= r["ci95_low"] <= r["ci95_high"] <= 1.0
    d = row(board, "gradcam", "deletion_auc")
    assert d["test"] == "wilcoxon"
    xs = frame.loc[frame["method"] == "gradcam", "deletion_auc"].to_numpy()
    ys = frame.loc[frame["method"] == "fam", "deletion_auc"].to_numpy()
    # differences within 1% of the metric's range over the table are float noise: none
    tol = 0.01 * np.ptp(frame["deletion_auc"].to_numpy())
    ys = np.where(np.abs(xs - ys) <= tol, xs, ys)
    assert d["p_value"] == pytest.approx(scipy_stats.wilcoxon(xs, ys).pvalue, rel=1e-12)
    assert "Wilcoxon signed-rank over independent samples" in to_markdown(board)


@pytest.mark.parametrize("column", ["pointing_game", "deletion_auc"])
def test_few_shot_tables_test_episode_mean_differences_with_g_minus_1_df(column):
    """Issue 25: queries of one episode share prototypes, so a few-shot table compares
    methods on the episode means of the paired differences (t, G - 1 df), binary metrics
    included, and its legend says so."""
    frame = results_frame()
    board = build_leaderboard(frame)
    r = row(board, "gradcam", column)
    assert r["test"] == "t-episodes"
    mine = frame[frame["method"] == "gradcam"].set_index("sample_id")
    ref = frame[frame["method"] == "fam"].set_index("sample_id")
    diff = mine[column] - ref.loc[mine.index, column]
    # differences within 1% of the metric's range over the table are float noise: none
    diff = diff.where(diff.abs() > 0.01 * np.ptp(frame[column].to_numpy()), 0.0)
    diff = diff.groupby(mine["episode"]).mean()
    assert len(diff) == 5
    expected = scipy_stats.ttest_1samp(diff.to_numpy(), 0.0).pvalue
    assert r["p_value"] == pytest.approx(expected, rel=1e-12)
    assert "paired t over the episode means of the differences, G-1 df" in to_markdown(board)


def test_pairing_uses_sample_ids_not_row_order():
    frame = results_frame()
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    a = row(build_leaderboard(frame), "gradcam", "deletion_auc")["p_value"]
    b = row(build_leaderboard(shuffled), "gradcam", "deletion_auc")["p_value"]
    assert a == pytest.approx(b, rel=1e-12)


def test_holm_runs_over_all_comparisons_of_one_table():
    board = build_leaderboard(results_frame())
    tested = board[board["p_value"].notna()]
    assert len(tested) == 2 * 6
    np.testing.assert_allclose(tested["p_holm"], holm(tested["p_value"].to_numpy()))


def test_cells_show_direction_beside_stars_and_ranks_respect_direction():
    board = build_leaderboard(results_frame())
    assert row(board, "random", "deletion_auc")["versus"] == "worse"
    assert row(board, "fam", "deletion_auc")["rank"] == 1
    assert metric_direction("pointing_game_other") == "lower"
    text = to_markdown(board)
    cells = md_row(text, "random")
    assert cells[1].endswith("worse ***")
    assert "deletion_auc ↓" in text and "insertion_auc ↑" in text


def test_bold_only_when_not_tied_at_the_shown_rounding():
    frame = results_frame(methods=("fam", "relevancecam", "random"))
    fam = frame["method"] == "fam"
    rel = frame["method"] == "relevancecam"
    frame.loc[rel, "deletion_auc"] = frame.loc[fam, "deletion_auc"].to_numpy()
    frame.loc[rel, "deletion_auc"] += (0.2155873 - 0.2156057) / 2  # float noise of one map
    frame.loc[rel, "insertion_auc"] = frame.loc[fam, "insertion_auc"].to_numpy() + 0.05
    board = build_leaderboard(frame)
    fam_d, rel_d = row(board, "fam", "deletion_auc"), row(board, "relevancecam", "deletion_auc")
    assert fam_d["mean"] != rel_d["mean"]
    assert fam_d["rank"] == rel_d["rank"] == 1
    assert not fam_d["best"] and not rel_d["best"]
    assert row(board, "relevancecam", "insertion_auc")["best"]
    text = to_markdown(board)
    assert not md_row(text, "fam")[1].startswith("**")
    # Float noise is neither bold nor "better": within the identity tolerance (issue 25)
    # its differences count as none, although a Wilcoxon test on them finds p < 0.001.
    assert md_row(text, "relevancecam")[1] == md_row(text, "fam")[1]
    assert rel_d["p_holm"] == 1.0 and rel_d["versus"] == "tied"
    assert md_row(text, "relevancecam")[2].startswith("**")


def test_n_is_given_per_metric():
    frame = results_frame(methods=("fam", "gradcam"))
    gradcam = frame["method"] == "gradcam"
    frame.loc[gradcam & (frame["index"] >= 7), "energy_pointing_game"] = np.nan
    frame.loc[gradcam & (frame["sample_id"] == "s0-0"), "energy_pointing_game"] = np.nan
    board = build_leaderboard(frame)
    r = row(board, "gradcam", "energy_pointing_game")
    assert (r["n"], r["n_excluded"]) == (34, 16)
    assert row(board, "gradcam", "deletion_auc")["n"] == 50
    cells = md_row(to_markdown(board), "gradcam")
    assert "(n=34)" in cells[4] and "(n=" not in cells[1]


def test_sanity_column_is_the_correlation_after_full_randomisation(tmp_path):
    sanity = sanity_frame()
    write_run(tmp_path / "run", results_frame(), config(), sanity=sanity)
    board = build_leaderboard(load_results([tmp_path]))
    r = row(board, "fam", "sanity")
    last = sanity[(sanity["method"] == "fam") & (sanity["step"] == 4)]["spearman"]
    assert r["mean"] == pytest.approx(last.mean())
    assert r["better"] == "lower" and math.isnan(r["rank"])
    assert "encoder.0" in r["interval"]
    assert "sanity ρ (fully randomised) ↓" in to_markdown(board)


def test_warnings_are_shown_beside_their_table(tmp_path):
    warning = {"code": "degenerate_maps", "message": "gradcam: 62% of maps are degenerate"}
    write_run(tmp_path / "a", results_frame(table_id="ta"), config(300), warnings=[warning])
    write_run(tmp_path / "b", results_frame(table_id="tb"), config(20))
    board = build_leaderboard(load_results([tmp_path]))
    text = to_markdown(board)
    section = text.split("## ")[1:]
    with_warning = [s for s in section if "62% of maps" in s]
    assert len(with_warning) == 1 and "300 training steps" in with_warning[0]
    assert "**warning** degenerate_maps: gradcam: 62%" in with_warning[0]


def test_oracle_flag_marks_a_metric_that_does_not_separate_mask_from_random():
    frame = results_frame(methods=("fam", "mask", "random"))
    mask, rand = frame["method"] == "mask", frame["method"] == "random"
    frame.loc[mask, "average_drop"] = frame.loc[rand, "average_drop"].to_numpy()[::-1]
    board = build_leaderboard(frame)
    assert not row(board, "fam", "average_drop")["oracle_separates"]
    assert row(board, "fam", "deletion_auc")["oracle_separates"]
    text = to_markdown(board)
    assert "average_drop ↓ ⚠" in text
    assert "average_drop: does not separate the ground truth from random here" in text


def test_identical_methods_are_one_row_not_rivals():
    frame = results_frame(
        methods=("fam", "fam_product", "relevancecam", "random"),
        identical={"fam_product": "fam", "relevancecam": "fam"},
    )
    board = build_leaderboard(frame)
    assert row(board, "relevancecam", "deletion_auc")["identical_to"] == (
        "fam = fam_product = relevancecam"
    )
    text = to_markdown(board)
    assert md_row(text, "fam (ref) = fam_product = relevancecam")
    assert not any(line.startswith("| relevancecam") for line in text.splitlines())


def test_same_method_with_other_options_is_another_entry():
    frame = results_frame(
        methods=("a", "b"),
        options={
            "a": {"method": "fam", "options": {"contribution": "ablation"}},
            "b": {"method": "fam", "options": {"contribution": "product"}},
        },
    )
    board = build_leaderboard(frame, reference="fam (contribution=ablation)")
    assert set(board["method"]) == {"fam (contribution=ablation)", "fam (contribution=product)"}
    assert set(board["method_name"]) == {"fam"}
    assert row(board, "fam (contribution=product)", "deletion_auc")["n_pairs"] == 50


def test_results_without_table_id_are_keyed_by_what_they_have_with_a_note():
    # Older runs: settings_id was the metric settings alone, the same for every method.
    frame = results_frame().drop(columns=["table_id", "model_id", "seed"]).assign(settings_id="s1")
    frame = pd.concat([frame, frame.assign(settings_id="s2")], ignore_index=True)
    board = build_leaderboard(frame)
    assert board["table"].nunique() == 2
    assert "no table_id" in to_markdown(board)


def test_markdown_table_escapes_pipes_and_aligns_numbers():
    assert markdown_table(["a", "b"], [["x|y", "1"]]).splitlines() == [
        "| a | b |",
        "|---|---:|",
        "| x\\|y | 1 |",
    ]


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


def test_cli_writes_csv_markdown_and_html(tmp_path, capsys):
    write_run(tmp_path / "run", results_frame(), config(), sanity=sanity_frame())
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "board")]) == 0
    csv = pd.read_csv(tmp_path / "board" / "leaderboard.csv")
    assert set(csv["method"]) == {"fam", "gradcam", "random"}
    markdown = (tmp_path / "board" / "leaderboard.md").read_text()
    assert markdown.startswith("# Leaderboard")
    assert to_markdown(csv) == markdown  # the CSV holds everything the Markdown shows
    assert (tmp_path / "board" / "leaderboard.html").is_file()
    assert "fam (ref)" in capsys.readouterr().out


def test_cli_error_is_one_line_exit_2_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.reporting", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("fam-bench: error: no results.csv under")
    assert "Traceback" not in done.stderr


def test_legacy_runs_without_table_id_are_kept_apart_by_their_configs(tmp_path):
    legacy = results_frame().drop(columns=["table_id", "model_id", "seed"]).assign(settings_id="s")
    write_run(tmp_path / "long", legacy, config(max_steps=300))
    write_run(tmp_path / "short", legacy, config(max_steps=20))
    board = build_leaderboard(load_results([tmp_path]))
    assert board["table"].nunique() == 2
    assert set(board["seed"]) == {"0"}  # from the config
    assert any(h.endswith("20 training steps") for h in board["heading"])


def test_method_lists_and_options_never_enter_a_heading(tmp_path):
    a, b = config(300), config(20)
    a["method"] = {"fam": {"contribution": "ablation"}}
    b["method"] = {"fam": {"contribution": "ablation"}, "gradcam": {}}
    b["methods"] = ["fam", "gradcam"]
    write_run(tmp_path / "a", results_frame(table_id="ta"), a)
    write_run(tmp_path / "b", results_frame(table_id="tb"), b)
    headings = set(build_leaderboard(load_results([tmp_path]))["heading"])
    assert all("method" not in h for h in headings)
    assert {h.rsplit(", ", 1)[-1] for h in headings} == {"300 training steps", "20 training steps"}


def test_the_centre_prior_is_checked_on_each_table_in_place_of_the_runs_own(tmp_path):
    saturated = results_frame(methods=("fam", "gradcam", "center"), table_id="ta")
    saturated.loc[saturated["method"] == "center", "pointing_game"] = 1.0
    stale = {"code": "centre_prior", "message": "a run's own check, replaced by the table's"}
    write_run(tmp_path / "a", saturated, config(300))
    write_run(tmp_path / "b", results_frame(table_id="tb"), config(20), warnings=[stale])
    text = to_markdown(build_leaderboard(load_results([tmp_path])))
    (section,) = [s for s in text.split("## ")[1:] if "centre_prior" in s]
    assert "300 training steps" in section and "metric.tolerance" in section
    assert "the center floor's pointing game (1.000)" in section
    assert "replaced by the table's" not in text


def test_entries_differing_only_by_float_reassociation_merge_on_every_metric():
    """Issue 25: the same FAM map computed with the channel sum reassociated (reversed
    order, einsum) differs by ~1e-7 and reorders a few near-tied pixels, which moves
    single deletion AUCs by more than any flat 1e-6; every metric's identity tolerance
    (a share of its range over the table) merges the two, and no paired test stars them.
    A genuinely different method on the same network stays apart."""
    import torch

    from evaluation.registry import MetricInputs, compute_all
    from experiments.models.conv4 import Conv4
    from fam.maps import minmax_normalise, smooth_noise, upsample

    torch.manual_seed(0)
    model = Conv4(hidden=32, pools=(True, True, False, False)).eval()
    n = 24
    images = torch.randn(n, 3, 32, 32)
    captured = {}
    model.encoder[3].register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        reference = model(images[torch.randperm(n)])
        emb = model(images)
    acts = captured["a"]
    share = torch.nn.functional.normalize(emb, dim=1) * torch.nn.functional.normalize(
        reference, dim=1
    )
    summed = torch.relu((share[:, :, None, None] * acts).sum(1))
    reassociated = torch.relu(torch.einsum("nk,nkhw->nhw", share.flip(1), acts.flip(1)))
    other = acts.mean(1)  # activation energy: another method
    assert not torch.equal(summed, reassociated)
    maps = torch.cat(
        [minmax_normalise(upsample(m, (32, 32))) for m in (summed, reassociated, other)]
    )
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        y, x = (i * 7) % 20, (i * 11) % 20
        masks[i, y : y + 12, x : x + 12] = True
    seeds = torch.arange(n)

    def score_fn(x, index):
        return (torch.nn.functional.cosine_similarity(model(x), reference[index], dim=1) + 1) / 2

    settings = dict(
        step=32, deletion_substrate="zeros", insertion_substrate="blur", blur_kernel=11,
        blur_sigma=5.0, amp=False, ties="smooth", tolerance_at="input", tolerance_px=4.0,
        energy_region="box", confidence_space="normalised",
    )  # fmt: skip
    inputs = MetricInputs(
        images=images, maps=maps, score_fn=score_fn, confidence_fn=score_fn, masks=masks,
        other_masks=None, settings=settings, model=model, batch_size=64, sample_seeds=seeds,
        tie_field=smooth_noise(seeds, acts.shape[-2:], (32, 32)),
    )  # fmt: skip
    names = [
        "deletion_auc", "insertion_auc", "pointing_game", "energy_pointing_game",
        "average_drop", "increase_in_confidence",
    ]  # fmt: skip
    values, _ = compute_all(names, inputs)
    rows = []
    for k, method in enumerate(["fam", "fam_reassociated", "energy"]):
        for i in range(n):
            row = {"sample_id": i, "method": method, "task": "retrieval", "table_id": "t"}
            row.update({c: float(v[k * n + i]) for c, v in values.items()})
            rows.append(row)
    frame = pd.DataFrame(rows)
    fam, again = frame[frame["method"] == "fam"], frame[frame["method"] == "fam_reassociated"]
    moved = (fam["deletion_auc"].to_numpy() - again["deletion_auc"].to_numpy()).__abs__()
    assert moved.max() > 1e-6 * np.ptp(frame["deletion_auc"])  # a flat 1e-6 would not merge
    board = build_leaderboard(frame)
    mine = board[board["method"] == "fam_reassociated"]
    assert set(mine["identical_to"]) == {"fam = fam_reassociated"}
    assert (mine["p_value"] == 1.0).all() and len(mine) == len(names)
    assert set(board.loc[board["method"] == "energy", "identical_to"]) == {""}


def test_markdown_labels_each_table_with_experiment_n_and_score():
    """Issue 25: the line above each results table names the experiment, the samples per
    seed and the score (from the runs' metric.score); README tests parse it back."""
    from test_readme_tables import labels_and_tables

    frame = results_frame(episodes=5, per_episode=10)
    board = build_leaderboard(frame, configs={"": {"metric": {"score": "probability"}}})
    text = to_markdown(board)
    labels, tables = labels_and_tables(text)
    assert [f for _, f in labels] == [
        {"experiment": "synthetic_5way", "n": "50", "score": "probability", "seeds": None}
    ]
    assert tables and all(labelled for _, labelled in tables)
    two_seeds = pd.concat([frame, frame.assign(seed=1)], ignore_index=True)
    pooled = to_markdown(build_leaderboard(two_seeds, pool_seeds=True))
    assert [f["n"] for _, f in labels_and_tables(pooled)[0]] == ["50"]
    assert "seeds=2" in pooled
