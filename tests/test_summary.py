"""summary.csv: the interval each metric gets, n per metric, sanity rows, the oracle flag."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from results_fixtures import results_frame, sanity_frame
from statsmodels.stats.proportion import proportion_confint

from evaluation import stats
from evaluation.summary import (
    SUMMARY_COLUMNS,
    full_randomisation,
    identical_groups,
    method_labels,
    oracle_check,
    summarise,
    summarise_sanity,
)
from fam.errors import FamBenchError


def cell(summary: pd.DataFrame, method: str, metric: str) -> pd.Series:
    rows = summary[(summary["method"] == method) & (summary["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_each_metric_gets_its_interval_kind_and_few_shot_respects_episodes():
    frame = results_frame(episode_effect=0.1)
    summary = summarise(frame)
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == list(SUMMARY_COLUMNS)
    assert cell(summary, "fam", "pointing_game")["interval"] == "t-episodes-clipped"
    assert cell(summary, "fam", "deletion_auc")["interval"] == "t-episodes"
    assert cell(summary, "fam", "increase_in_confidence")["interval"] == "t-episodes-clipped"
    fam = frame[frame["method"] == "fam"]
    # binary hits over episodes: the same clustered t interval, clipped to [0, 1]
    hits = stats.clustered_t_interval(fam["pointing_game"], fam["episode"])
    row = cell(summary, "fam", "pointing_game")
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(
        (max(hits.low, 0.0), min(hits.high, 1.0))
    )
    expected = stats.clustered_t_interval(fam["deletion_auc"], fam["episode"])
    row = cell(summary, "fam", "deletion_auc")
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((expected.low, expected.high))
    # Retrieval units are not shared references: plain per-sample intervals.
    retrieval = summarise(frame.assign(task="retrieval"))
    assert cell(retrieval, "fam", "pointing_game")["interval"] == "wilson"
    hits = int(fam["pointing_game"].sum())
    wilson = proportion_confint(hits, len(fam), method="wilson")
    row = cell(retrieval, "fam", "pointing_game")
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(wilson)
    assert cell(retrieval, "fam", "deletion_auc")["interval"] == "t"


def test_percentage_hits_get_a_wilson_interval_on_the_percent_scale():
    summary = summarise(results_frame().assign(task="retrieval"))
    row = cell(summary, "fam", "increase_in_confidence")
    assert 0.0 <= row["ci95_low"] <= row["mean"] <= row["ci95_high"] <= 100.0
    assert row["mean"] > 1.0  # percent, not a fraction


def test_n_is_per_metric_and_non_finite_maps_are_excluded_and_counted():
    frame = results_frame()
    fam = frame["method"] == "fam"
    frame.loc[fam & (frame["index"] < 3), "energy_pointing_game"] = np.nan
    bad = fam & (frame["index"] == 9)
    frame.loc[bad, ["degenerate", "degenerate_reason"]] = [True, "non-finite"]
    summary = summarise(frame)
    energy = cell(summary, "fam", "energy_pointing_game")
    assert (energy["n"], energy["n_excluded"]) == (50 - 15 - 5, 20)
    deletion = cell(summary, "fam", "deletion_auc")
    assert (deletion["n"], deletion["n_excluded"]) == (45, 5)
    assert deletion["mean"] == pytest.approx(frame.loc[fam & ~bad, "deletion_auc"].mean())
    assert cell(summary, "fam", "degenerate")["mean"] == pytest.approx(0.1)
    assert cell(summary, "gradcam", "deletion_auc")["n"] == 50


def test_pointing_game_class_mean_is_the_mean_of_class_hit_rates():
    frame = results_frame()
    summary = summarise(frame)
    fam = frame[frame["method"] == "fam"]
    expected = fam.groupby("label")["pointing_game"].mean().mean()
    assert cell(summary, "fam", "pointing_game_class_mean")["mean"] == pytest.approx(expected)


def test_sanity_summary_exists_for_every_method_at_every_layer():
    sanity = sanity_frame(methods=("fam", "gradcam", "random"))
    summary = summarise(results_frame(), sanity)
    rows = summary[summary["metric"].str.startswith("sanity@")]
    assert set(rows["method"]) == {"fam", "gradcam", "random"}
    assert rows.groupby("method")["step"].apply(sorted).map(len).eq(4).all()
    fam_last = cell(summary, "fam", "sanity")  # after the whole cascade
    expected = sanity[(sanity["method"] == "fam") & (sanity["step"] == 4)]["spearman"].mean()
    assert fam_last["mean"] == pytest.approx(expected)
    assert (fam_last["layer"], fam_last["step"]) == ("encoder.0", 4)
    assert cell(summary, "fam", "sanity@encoder.3")["step"] == 1
    # one row per method and metric: the runner's pivot works
    assert summary.pivot(index="method", columns="metric", values="mean").shape[0] == 3
    last = full_randomisation(summarise_sanity(sanity))
    assert len(last) == 3 and set(last["step"]) == {4}


def test_oracle_flags_a_metric_that_does_not_separate_mask_from_random():
    frame = results_frame(methods=("fam", "mask", "random"))
    mask, rand = frame["method"] == "mask", frame["method"] == "random"
    # average_drop: the oracle no better than random here
    frame.loc[mask, "average_drop"] = frame.loc[rand, "average_drop"].to_numpy()[::-1]
    check = oracle_check(frame).set_index("metric")
    assert not check.loc["average_drop", "oracle_separates"]
    assert check.loc["deletion_auc", "oracle_separates"]
    # few-shot: over episodes; Holm across the table's metrics (issue 25)
    assert set(check["test"]) == {"t-episodes"}
    np.testing.assert_allclose(check["oracle_p"], stats.holm(check["oracle_p_raw"]))
    assert (check["oracle_p"] >= check["oracle_p_raw"]).all()
    independent = oracle_check(frame.assign(task="retrieval")).set_index("metric")
    assert independent.loc["pointing_game", "test"] == "mcnemar-exact"
    assert independent.loc["deletion_auc", "test"] == "wilcoxon"
    summary = summarise(frame)
    assert not cell(summary, "fam", "average_drop")["oracle_separates"]
    assert cell(summary, "fam", "insertion_auc")["oracle_separates"]
    # Without the two methods there is no check, and no flag.
    assert summarise(results_frame())["oracle_separates"].isna().all()


def test_method_options_make_separate_labelled_entries():
    frame = results_frame(
        methods=("fam_a", "fam_b"),
        options={
            "fam_a": {"method": "fam", "options": {"contribution": "ablation", "k": 1}},
            "fam_b": {"method": "fam", "options": {"contribution": "product", "k": 1}},
        },
    )
    labels = set(method_labels(frame))
    assert labels == {"fam (contribution=ablation)", "fam (contribution=product)"}
    assert set(summarise(frame)["method"]) == labels
    single = results_frame(methods=("fam",))
    assert set(method_labels(single)) == {"fam"}
    assert json.loads(single["method_options"].iloc[0]) == {}


def test_identical_methods_are_grouped_even_with_float_noise():
    frame = results_frame(
        methods=("fam", "fam_product", "gradcam"), identical={"fam_product": "fam"}
    )
    noisy = frame["method"] == "fam_product"
    frame.loc[noisy, "deletion_auc"] += 2e-5  # 0.2155873 vs 0.2156057 in the default run
    assert identical_groups(frame) == [["fam", "fam_product"]]
    frame.loc[noisy & (frame["index"] == 0), "pointing_game"] = (
        1 - frame.loc[noisy & (frame["index"] == 0), "pointing_game"]
    )
    assert identical_groups(frame) == []
    assert math.isnan(summarise(frame)["oracle_p"].iloc[0])


def test_summary_splits_by_correct():
    """Issue 25: one summary per value of ``correct``, each over its own queries."""
    frame = results_frame()
    frame["correct"] = pd.factorize(frame["sample_id"])[0] % 4 != 0
    split = summarise(frame, split="correct")
    for value in (False, True):
        part = split[split["correct"] == value]
        own = frame[frame["correct"] == value]
        row = part[(part["method"] == "fam") & (part["metric"] == "deletion_auc")].iloc[0]
        expected = own.loc[own["method"] == "fam", "deletion_auc"].mean()
        assert row["mean"] == pytest.approx(expected)
        assert row["n"] == (own["method"] == "fam").sum()
    with pytest.raises(FamBenchError, match="no such column"):
        summarise(frame, split="nope")
