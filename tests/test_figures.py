"""Figures, environment record and the reproduce planner (reporting helpers)."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from evaluation.reporting.figures import (
    PANEL_INCHES,
    curve_auc,
    curves_figure,
    identical_curve_groups,
    identical_note,
    plot_curves,
    plot_run_figures,
    plot_sanity,
    plot_summary,
    sanity_figure,
    summary_figure,
)
from evaluation.reporting.map_grid import (
    CELL_INCHES,
    DPI,
    HEADER_INCHES,
    LEFT_INCHES,
    PAD_INCHES,
    map_grid_size,
    plot_map_grid,
)
from experiments.environment import PACKAGES, collect_environment, git_state, write_environment
from experiments.reproduce import (
    CONF_DIR,
    EXPERIMENT_DATA,
    command,
    find_data,
    plan,
    reproduce,
    uses_synthetic_data,
)
from fam.errors import FamBenchError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
H = W = 24


def grid_inputs(n: int, methods: list[str]):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, H, W, generator=g)
    maps = {m: torch.rand(n, H, W, generator=g) for m in methods}
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    masks[:, 6:14, 8:18] = True
    return images, maps, masks


@pytest.mark.parametrize("methods", [["fam"], ["fam", "gradcam", "scorecam", "random"]])
@pytest.mark.parametrize("with_masks", [True, False])
def test_map_grid_png_has_the_grid_size(tmp_path, methods, with_masks):
    images, maps, masks = grid_inputs(3, methods)
    path = plot_map_grid(
        images,
        maps,
        masks if with_masks else None,
        tmp_path / "g" / "grid.png",
        MEAN,
        STD,
        labels=["a", "b", "c"],
    )
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == map_grid_size(3, len(methods))
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas


def test_map_grid_size_grows_one_cell_per_method_and_row():
    cell = round(CELL_INCHES * DPI)
    w1, h1 = map_grid_size(1, 1)
    w4, h4 = map_grid_size(5, 4)
    assert (w4 - w1, h4 - h1) == (3 * cell, 4 * cell)


def test_map_grid_caps_rows_and_leaves_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    images, maps, masks = grid_inputs(5, ["fam"])
    path = plot_map_grid(images, maps, masks, tmp_path / "grid.png", MEAN, STD, max_rows=2)
    plot_curves({"fam": {"deletion": np.ones((2, 3))}}, tmp_path / "curves.png")
    with Image.open(path) as png:
        assert png.size == map_grid_size(2, 1)
    assert plt.get_fignums() == before


def test_map_grid_denormalises_the_image_column(tmp_path):
    # A uniform image whose normalised value maps back to pure red must show red pixels.
    red = torch.tensor([(1.0 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]])
    images = red.view(1, 3, 1, 1).expand(1, 3, H, W)
    path = plot_map_grid(
        images, {"fam": torch.zeros(1, H, W)}, None, tmp_path / "red.png", MEAN, STD
    )
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert (np.all(pixels == [255, 0, 0], axis=1)).sum() > 0.5 * (CELL_INCHES * DPI * 0.9) ** 2


def test_map_grid_outlines_the_mask_only_when_given(tmp_path):
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    images = grey.view(1, 3, 1, 1).expand(1, 3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 6:18, 6:18] = True
    # interior of the image panel (top-left cell), in pixels, away from its frame
    top = round((HEADER_INCHES + PAD_INCHES) * DPI) + 3
    left = round((LEFT_INCHES + PAD_INCHES) * DPI) + 3
    size = round((CELL_INCHES - 2 * PAD_INCHES) * DPI) - 6
    white = {}
    for name, masks in (("with", mask), ("without", None)):
        path = plot_map_grid(
            images, {"fam": torch.zeros(1, H, W)}, masks, tmp_path / f"{name}.png", MEAN, STD
        )
        panel = np.asarray(Image.open(path).convert("RGB"))[top : top + size, left : left + size]
        white[name] = int(np.all(panel > 240, axis=-1).sum())
    assert white["without"] == 0  # a grey image has no white pixels of its own
    assert white["with"] > 4 * 0.4 * size  # a white outline around about half the panel


def test_map_grid_rejects_maps_of_the_wrong_size(tmp_path):
    images, _, _ = grid_inputs(2, [])
    with pytest.raises(FamBenchError, match="upsample"):
        plot_map_grid(images, {"fam": torch.rand(2, 7, 7)}, None, tmp_path / "x.png", MEAN, STD)


def test_curve_auc_matches_trapezoid_rule():
    y = np.random.default_rng(0).random((4, 9))
    np.testing.assert_allclose(curve_auc(y), np.trapezoid(y, np.linspace(0, 1, 9), axis=1))


def method_curves(n_methods: int, steps: int = 17) -> dict:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, steps)
    return {
        f"m{i}": {
            "deletion": np.exp(-x * (i + 1)) + 0.05 * rng.random((6, steps)),
            "insertion": 1 - np.exp(-x * (i + 1)) + 0.05 * rng.random((6, steps)),
        }
        for i in range(n_methods)
    }


@pytest.mark.parametrize("n_methods", [1, 3, 12])
def test_curves_are_small_multiples_one_panel_per_method(tmp_path, n_methods):
    curves = method_curves(n_methods)
    curves["m0"] = {"deletion": torch.as_tensor(curves["m0"]["deletion"])}  # tensors, one key
    fig = curves_figure(curves, score_label="episode softmax probability", reference="m0")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(curves)
    assert {ax.get_ylabel() for ax in panels[::4]} == {"episode softmax probability"}
    assert all(ax.get_xlabel().startswith("fraction of pixels") for ax in panels[-4:])
    if n_methods > 1:
        # the reference drawn faintly (dashed grey) in every other panel
        assert any(line.get_linestyle() == "--" for line in panels[1].get_lines())
        assert not any(line.get_linestyle() == "--" for line in panels[0].get_lines())
    path = plot_curves(curves, tmp_path / "curves.png", score_label="probability")
    with Image.open(path) as png:
        rows, cols = -(-n_methods // 4), min(4, n_methods)
        assert png.size == (
            round(cols * PANEL_INCHES[0] * DPI),
            round((rows * PANEL_INCHES[1] + 0.5) * DPI),
        )
        assert np.asarray(png.convert("L")).std() > 5


def test_identical_methods_share_one_panel_not_drawn_as_rivals():
    curves = method_curves(3)
    curves["copy"] = {k: v + 1e-9 for k, v in curves["m1"].items()}
    fig = curves_figure(curves)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["m0", "m1 = copy", "m2"]
    assert identical_curve_groups(_arrays(curves)) == [["m0"], ["m1", "copy"], ["m2"]]
    assert identical_note([["m1", "copy"], ["m0"]]).endswith("m1 = copy.")
    assert identical_note([["m0"]]) == ""
    given = curves_figure(curves, groups=[["m0", "m2"]])
    assert [ax.get_title() for ax in given.axes if ax.get_visible()] == ["m0 = m2", "m1", "copy"]


def _arrays(curves):
    return {
        m: {k: np.asarray(v, dtype=float) for k, v in kinds.items()} for m, kinds in curves.items()
    }


def test_curves_reject_bad_shapes():
    with pytest.raises(FamBenchError, match="expected \\(N, T\\)"):
        curves_figure({"fam": {"deletion": np.ones(5)}})
    with pytest.raises(FamBenchError, match="empty"):
        curves_figure({})


def forest_summary() -> pd.DataFrame:
    rows = []
    for method, d, p in (
        ("fam", 0.2, 0.9),
        ("gradcam", 0.4, 0.5),
        ("random", 0.5, 0.1),
        ("relevancecam", 0.2, 0.9),
    ):
        rows.append(
            dict(
                method=method, metric="deletion_auc", mean=d, ci95_low=d - 0.05, ci95_high=d + 0.05
            )
        )
        rows.append(
            dict(
                method=method,
                metric="pointing_game",
                mean=p,
                ci95_low=max(0, p - 0.1),
                ci95_high=min(1, p + 0.1),
            )
        )
        rows.append(dict(method=method, metric="degenerate", mean=0.0, ci95_low=0.0, ci95_high=0.1))
    return pd.DataFrame(rows)


def test_forest_plot_orders_methods_by_rank_best_on_top(tmp_path):
    fig = summary_figure(forest_summary(), groups=[["fam", "relevancecam"]], reference="fam")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "deletion_auc (lower is better)",
        "pointing_game (higher is better)",
    ]  # only per-sample metrics; "degenerate" is not one
    for ax in panels:
        labels = [t.get_text() for t in ax.get_yticklabels()]
        ticks = sorted(zip(ax.get_yticks(), labels, strict=True))
        top_down = [label for _, label in ticks[::-1]]
        assert top_down == ["fam = relevancecam", "gradcam", "random"]
    path = plot_summary(forest_summary(), tmp_path / "summary.png")
    with Image.open(path) as png:
        assert np.asarray(png.convert("L")).std() > 5


def test_sanity_cascade_has_one_line_per_method(tmp_path):
    from results_fixtures import sanity_frame

    sanity = sanity_frame(methods=("fam", "gradcam", "random"))
    fig = sanity_figure(sanity)
    ax = fig.axes[0]
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["fam", "gradcam", "random"]
    assert list(labelled[0].get_xdata()) == [1, 2, 3, 4]
    assert "encoder.0" in ax.get_xticklabels()[-1].get_text()
    assert ax.get_ylabel().startswith("Spearman")
    assert plot_sanity(sanity, tmp_path / "sanity.png").is_file()
    from results_fixtures import results_frame

    from evaluation.summary import summarise

    from_summary = sanity_figure(summarise(results_frame(), sanity)).axes[0]
    assert len([x for x in from_summary.get_lines() if not x.get_label().startswith("_")]) == 3
    with pytest.raises(FamBenchError, match="no sanity rows"):
        sanity_figure(pd.DataFrame(columns=["method", "metric", "step", "layer", "mean"]))


def test_map_grid_draws_an_optional_reference_column(tmp_path):
    images, maps, masks = grid_inputs(2, ["fam", "gradcam"])
    references = torch.randn(2, 3, H, W)
    path = plot_map_grid(
        images, maps, masks, tmp_path / "grid.png", MEAN, STD, references=references
    )
    with Image.open(path) as png:
        assert png.size == map_grid_size(2, 3)
    with pytest.raises(FamBenchError, match="references"):
        plot_map_grid(
            images, maps, masks, tmp_path / "x.png", MEAN, STD, references=torch.randn(2, 3, 5, 5)
        )


def test_environment_has_the_keys_and_is_json(tmp_path):
    env = collect_environment({"data": {"name": "synthetic"}, "seed": 3}, device="cpu", seed=3)
    for key in (
        "python",
        "platform",
        "packages",
        "cuda",
        "git",
        "hostname",
        "time",
        "seed",
        "settings",
    ):
        assert key in env
    assert set(env["packages"]) == set(PACKAGES)
    assert env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["cuda"]["device"] == "cpu"
    assert env["settings"] == {"data": {"name": "synthetic"}, "seed": 3}
    assert env["seed"] == 3
    json.dumps(env)


def test_environment_outside_a_git_repo_and_atomic_write(tmp_path):
    assert git_state(tmp_path) is None
    path = tmp_path / "run" / "environment.json"
    env = write_environment(path, cfg_dict={"x": 1}, seed=1, repo=tmp_path)
    assert env["git"] is None
    assert json.loads(path.read_text()) == env
    assert os.listdir(path.parent) == ["environment.json"]  # no temporary file left behind


def test_environment_resolves_omegaconf_settings():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": 2, "b": "${a}"})
    assert collect_environment(cfg)["settings"] == {"a": 2, "b": 2}


def make_conf(tmp_path, names_and_data: dict[str, str]):
    conf = tmp_path / "conf"
    conf.mkdir()
    for name, data in names_and_data.items():
        (conf / f"{name}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /data: {data}\n"
        )
    return conf


def test_reproduce_runs_what_is_present_and_notes_the_rest(tmp_path):
    conf = make_conf(
        tmp_path,
        {
            "synthetic_5way": "synthetic",
            "cub_5way": "cub",
            "simclr_cifar10": "cifar10",
            "retrieval_sop": "sop",
            "mystery": "imagenet",
        },
    )
    # extends a synthetic sibling, as conf/experiment/synthetic_5way_pairs.yaml does
    (conf / "pairs.yaml").write_text("defaults:\n  - synthetic_5way\n  - _self_\nname: p\n")
    data = tmp_path / "data"
    (data / "CUB_200_2011").mkdir(parents=True)
    (data / "cifar-10-batches-py").mkdir()
    calls = []

    def fake_runner(experiment, data_root, out_dir, overrides):
        calls.append((experiment, data_root, list(overrides)))
        out_dir.mkdir(parents=True)
        (out_dir / "results.csv").write_text(
            "sample_id,episode,label,method,dataset,model,task,settings_id,degenerate,"
            "deletion_auc\n0,0,0,fam,d,m,t,s,False,0.1\n"
        )
        return 0

    notes = []
    status = reproduce(
        data,
        tmp_path / "out",
        ["trainer.max_steps=1"],
        runner=fake_runner,
        conf_dir=conf,
        echo=notes.append,
    )
    assert sorted(calls) == [
        ("cub_5way", data / "CUB_200_2011", ["trainer.max_steps=1"]),
        ("pairs", None, ["trainer.max_steps=1"]),
        ("simclr_cifar10", data, ["trainer.max_steps=1"]),  # torchvision layout: the parent
        ("synthetic_5way", None, ["trainer.max_steps=1"]),
    ]
    assert {k for k, v in status.items() if v == "done"} == {
        "cub_5way",
        "pairs",
        "simclr_cifar10",
        "synthetic_5way",
    }
    sop_note = next(n for n in notes if "retrieval_sop" in n)
    assert "missing" in sop_note and str(data / "Stanford_Online_Products") in sop_note
    assert any("mystery" in n and "EXPERIMENT_DATA" in n for n in notes)
    # listed in EXPERIMENT_DATA but without a config: skipped, not run
    assert "no config" in status["retrieval_cars"]
    assert (tmp_path / "out" / "leaderboard.md").exists()


def test_reproduce_leaves_failed_runs_out_of_the_leaderboard(tmp_path):
    conf = make_conf(tmp_path, {"synthetic_5way": "synthetic"})
    (tmp_path / "data").mkdir()
    status = reproduce(
        tmp_path / "data", tmp_path / "out", runner=lambda *a: 3, conf_dir=conf, echo=lambda _: None
    )
    assert status["synthetic_5way"] == "failed (exit 3)"
    assert not (tmp_path / "out" / "leaderboard.csv").exists()


def test_reproduce_folder_lookup_and_command(tmp_path):
    (tmp_path / "Mini-ImageNet").mkdir()
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "cars196").write_text("a file, not a dataset folder")
    assert find_data(tmp_path, EXPERIMENT_DATA["miniimagenet_5way"]) == tmp_path / "Mini-ImageNet"
    assert find_data(tmp_path, EXPERIMENT_DATA["simclr_stl10"]) == tmp_path
    assert find_data(tmp_path, EXPERIMENT_DATA["tieredimagenet_5way"]) is None
    assert find_data(tmp_path, EXPERIMENT_DATA["retrieval_cars"]) is None
    planned = {p.experiment: p for p in plan(tmp_path, conf_dir=tmp_path / "no_conf")}
    assert set(planned) == set(EXPERIMENT_DATA)  # nothing configured: all noted as skipped
    assert all(p.skip for p in planned.values())
    with pytest.raises(FamBenchError, match="not a folder"):
        plan(tmp_path / "absent")
    cmd = command("cub_5way", tmp_path / "my data", tmp_path / "out" / "cub_5way", ["a=1"])
    assert cmd[1:3] == ["run.py", "experiment=cub_5way"]
    assert cmd[3] == f"data.root='{tmp_path / 'my data'}'"  # quoted for Hydra
    assert cmd[4] == f"hydra.run.dir={tmp_path / 'out' / 'cub_5way'}"
    assert cmd[-1] == "a=1"


@pytest.mark.skipif(not CONF_DIR.is_dir(), reason="no conf/experiment in this checkout")
def test_every_shipped_experiment_is_mapped_to_data_or_synthetic():
    # A real-data experiment missing from EXPERIMENT_DATA would be silently skipped forever.
    for config in sorted(CONF_DIR.glob("*.yaml")):
        assert config.stem in EXPERIMENT_DATA or uses_synthetic_data(config), config.name


def test_run_figures_in_one_call_share_panels_for_identical_methods(tmp_path):
    from results_fixtures import results_frame, sanity_frame

    from evaluation.summary import summarise

    results = results_frame(
        methods=("fam", "fam_product", "random"), identical={"fam_product": "fam"}
    )
    curves = method_curves(3)
    curves = {"fam": curves["m0"], "fam_product": curves["m1"], "random": curves["m2"]}
    sanity = sanity_frame(methods=("fam", "random"))
    paths = plot_run_figures(
        tmp_path, results, summarise(results, sanity), sanity, curves, "probability", "fam"
    )
    assert [p.name for p in paths] == ["curves.png", "summary.png", "sanity.png"]
    assert all(p.is_file() for p in paths)
    assert [p.name for p in plot_run_figures(tmp_path / "b", results, summarise(results))] == [
        "summary.png"
    ]
