"""Efficiency without changed numbers: bounded memory (call counts and batch sizes, never
timing), items rendered on demand with the same pixels, and the amp setting.

CUDA tests (bf16 autocast + channels_last, no host syncs in the batch loops, bf16 AUCs
within 0.01 of fp32) are skipped on machines without a GPU.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import tiny

from evaluation import deletion_insertion
from experiments import pipeline
from experiments.config import compose_config, load
from experiments.data.synthetic import _CHUNK, SyntheticShapes, _to_uint8
from experiments.identity import resolve_amp
from fam.errors import FamBenchError


def cuda(test):
    """A CUDA test: ``pytest -m cuda`` selects it (benchmarks/gpu_check.sh), and it is
    skipped on a machine without a device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


TINY = tiny(
    "data.options.images_per_class=8",
    "trainer.max_steps=1",
    "eval.n_query=2",
    "eval.batch_size=4",
    "eval.figure_samples=0",
    "metric.batch_size=48",
    "methods=[fam,gradcam,scorecam,relevancecam,random]",
    drop=["eval.num_episodes", "metrics"],
)


# -- synthetic data: only the needed items, the same pixels -------------------------------
@pytest.mark.parametrize("size", [16, 84])
def test_items_rendered_alone_equal_the_whole_class_rendered_together(size):
    n = _CHUNK + 20  # the class render spans two chunks
    ds = SyntheticShapes("test", size, n)
    label = 3
    images, masks = ds.render(torch.full((n,), label), torch.arange(n))
    images = _to_uint8(images).float() / 255
    for k in (0, 1, _CHUNK - 1, _CHUNK, n - 1):
        item = SyntheticShapes("test", size, n, normalise=False)[label * n + k]
        assert torch.equal(item["image"], images[k])
        assert torch.equal(item["mask"], masks[k])
        assert item["label"] == label


def test_an_episode_renders_only_its_own_images():
    cfg = load(compose_config([*TINY, "data.options.images_per_class=50", "eval.num_episodes=2"]))
    from experiments.builders import build_datasets
    from experiments.tasks import family_for

    _, eval_set = build_datasets(cfg.data, cfg.name)
    family = family_for(cfg.task)
    evaluation = family.evaluation(cfg, None, eval_set, _tiny_net(cfg), torch.device("cpu"))
    evaluation.unit(0, _tiny_net(cfg), torch.device("cpu"))
    assert eval_set.rendered == 3 * (2 + 2)  # support + queries, not 3 classes x 50 images


def test_the_item_cache_is_bounded_and_an_evicted_item_comes_back_identical():
    ds = SyntheticShapes("test", 16, 20)
    ds.cache_bytes = 10 * 4 * 16 * 16  # ten items
    first = ds[0]["image"]
    for i in range(1, 40):
        ds[i]
        assert len(ds._cache) <= 10
    assert torch.equal(ds[0]["image"], first)
    assert ds.rendered == 41


def _tiny_net(cfg):
    from experiments.builders import build_network

    torch.manual_seed(0)
    return build_network(cfg.model).eval()


# -- the pipeline: work and batch sizes per unit do not grow with the run -----------------
def _recorded_run(tmp_path, episodes: int, monkeypatch) -> tuple[list[dict], int]:
    """Run TINY with ``episodes`` units; per unit, the model's forward batch sizes and the
    perturbed images alive at once (deletion/insertion + confidence batches)."""
    from experiments import builders

    per_unit: list[dict] = []
    current: dict = defaultdict(list)
    build_model = builders.build_model

    def counted(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: current["forward"].append(len(a[0])))
        return model

    import evaluation._batched as batched

    stream = batched.stream_scores

    def recorded_stream(score_fn, n_jobs, build, **kwargs):
        def recorded_build(start, stop):
            images, index = build(start, stop)
            current["perturbed"].append(len(images))
            return images, index

        return stream(score_fn, n_jobs, recorded_build, **kwargs)

    def after_unit(u: int) -> None:
        per_unit.append(dict(current))
        current.clear()

    launch = pipeline.launch

    def launch_fresh(*args, **kwargs):  # count the evaluation only (not the accuracy pass)
        current.clear()
        return launch(*args, **kwargs)

    monkeypatch.setattr(builders, "build_model", counted)
    monkeypatch.setattr(pipeline, "launch", launch_fresh)
    for module in ("evaluation.causal", "evaluation.confidence"):
        monkeypatch.setattr(f"{module}.stream_scores", recorded_stream)
    cfg = compose_config(
        [
            *TINY,
            f"cache_dir={tmp_path / 'cache'}",
            f"eval.num_episodes={episodes}",
            # one map per query: a misclassified query's second map (of its prediction)
            # would make units differ by their number of errors
            "metric.explain_class=true",
        ]
    )
    pipeline.run(cfg, tmp_path / f"run{episodes}", after_unit=after_unit)
    return per_unit, load(cfg).metric.batch_size


@pytest.mark.slow
def test_each_unit_costs_the_same_and_no_batch_grows_with_the_number_of_episodes(
    tmp_path, monkeypatch
):
    one, batch_size = _recorded_run(tmp_path, 1, monkeypatch)
    four, _ = _recorded_run(tmp_path, 4, monkeypatch)
    assert len(four) == 4
    # unit 0 costs the same in a 1-unit and a 4-unit run: no work depends on the run's size
    assert four[0]["forward"] == one[0]["forward"]
    # every unit scores the protocol's perturbed images, the same number in every unit
    # (Score-CAM's passes depend on each unit's activations, the protocol's do not)
    for unit in four:
        assert unit["perturbed"] == one[0]["perturbed"]
    # and never holds more than one metric batch of perturbed images, nor feeds the model
    # more than the largest configured batch (metric 48, explainer 4, Score-CAM's own)
    largest = max(max(u["forward"]) for u in four)
    assert max(max(u["perturbed"]) for u in four) <= batch_size
    assert largest <= max(batch_size, 256)


def test_deletion_insertion_batches_stay_at_batch_size_whatever_n():
    torch.manual_seed(0)
    seen = []

    def score(x, index):
        seen.append(len(x))
        return x.mean((1, 2, 3))

    for n in (1, 7, 40):
        seen.clear()
        deletion_insertion(
            score, torch.randn(n, 3, 8, 8), torch.rand(n, 8, 8), step=8, batch_size=32
        )
        assert max(seen) <= 32
        assert sum(seen) == n * (1 + 8 + 8)  # the protocol's images, nothing more


# -- amp: auto is fp32 on CPU, bf16 + channels_last on CUDA --------------------------------
def test_amp_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert resolve_amp("auto", torch.device("cpu")) is False
    assert resolve_amp("auto", torch.device("cuda")) is True
    assert resolve_amp("false", torch.device("cuda")) is False
    assert resolve_amp("true", torch.device("cpu")) is True


def test_amp_auto_on_cpu_keeps_the_settings_and_fingerprint_of_fp32(tmp_path):
    from experiments import builders, identity
    from experiments.tasks import family_for

    ids, prints = [], []
    for amp in ("auto", "false"):
        run = load(compose_config([*TINY, f"metric.amp={amp}"]))
        family = family_for(run.task)
        evaluation = type("E", (), {"similarity": "euclidean", "score": "probability"})()
        autocast = identity.resolve_amp(run.metric.amp, torch.device("cpu"))
        settings = identity.metric_settings(run, family, evaluation, autocast)
        assert settings["amp"] is False
        ids.append(identity.settings_id(settings))
        methods = builders.build_methods(run.methods, run.method, autocast)
        options = {name: m.options for name, m in methods.items()}
        prints.append(identity.fingerprint_of(run, family, options, autocast)[0])
    assert ids[0] == ids[1] and prints[0] == prints[1]


def test_an_unknown_amp_value_is_a_clear_error():
    with pytest.raises(FamBenchError, match="metric.amp"):
        load(compose_config(["metric.amp=bf16"]))


# -- CUDA ---------------------------------------------------------------------------------
def _cuda_unit(amp: str, device: str = "cuda"):
    """A TINY-shaped unit on CUDA (random Conv-4 at 32 px) and its job, built as the
    pipeline builds them (``device="cpu"`` checks the set-up without a GPU)."""
    from experiments import builders, identity, pipeline
    from experiments.tasks import family_for

    run = load(
        compose_config(
            [
                *TINY,
                f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                "data.image_size=32",
                "model.options.hidden=32",
                f"metric.amp={amp}",
                "eval.num_episodes=1",
                "methods=[fam,gradcam,gradcampp,xgradcam,layercam,scorecam,eigencam,random]",
            ]
        )
    )
    device = torch.device(device)
    _, eval_set = builders.build_datasets(run.data, run.name)
    family = family_for(run.task)
    model = _tiny_net(run).to(device)
    evaluation = family.evaluation(run, None, eval_set, model, device)
    autocast = identity.resolve_amp(run.metric.amp, device)
    settings = identity.metric_settings(run, family, evaluation, autocast)
    methods = builders.build_methods(run.methods, run.method, autocast)
    # the job exactly as the pipeline builds it (no output folder: nothing is written)
    job = pipeline._job(
        run,
        family,
        evaluation,
        model,
        methods,
        list(run.metrics),
        settings,
        autocast,
        "",
        None,
        eval_set,
    )
    return job, evaluation.unit(0, model, device)


@cuda
def test_cuda_amp_auto_runs_bf16_and_channels_last_without_host_syncs_in_batch_loops():
    from evaluation.causal import deletion_insertion as di
    from experiments.worker import make_explainer, unit_inputs

    job, unit = _cuda_unit("auto")
    assert job.settings["amp"] is True
    job.model.to(memory_format=torch.channels_last)
    fam = make_explainer(job, job.methods["fam"], job.model, 0)
    assert fam.amp is True
    maps = torch.rand(len(unit.images), *unit.images.shape[-2:], device="cuda")
    di(unit.score_fn, unit.images, maps, step=32, batch_size=8, model=job.model, amp=True)
    # The batch loops themselves, after the one input check a call makes.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        from evaluation._batched import stream_scores

        images = unit.images
        stream_scores(
            unit.score_fn,
            64,
            lambda a, b: (
                images[:1].expand(b - a, -1, -1, -1),
                torch.zeros(b - a, dtype=torch.long, device="cuda"),
            ),
            batch_size=8,
            device=images.device,
            model=job.model,
            amp=True,
        )
        # Eigen-CAM is left out: `eigencam` runs numpy's SVD on the host by design, and
        # `eigencam_signed`'s torch.linalg.eigh synchronises on CUDA (its error check; seen
        # on an H200): one sync per call, outside any batch loop.
        for name in ("gradcam", "scorecam"):
            explainer = make_explainer(job, job.methods[name], job.model, 0)
            extra = unit_inputs(explainer, unit, 0, len(unit.images))  # scorecam: task_score
            explainer(unit.images, unit.reference, unit.similarity, **extra)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
def test_cuda_bf16_aucs_are_within_001_of_fp32_and_pointing_is_equal_on_the_same_maps():
    from baselines.random_map import smooth_tie_field
    from experiments.worker import explain, score_samples

    results = {}
    job32, unit = _cuda_unit("false")
    assert job32.settings["ties"] == "smooth"  # the default: tied pixels need the field
    seeds = torch.arange(len(unit.images), device="cuda")
    maps, _, _ = explain(job32, unit, 0, seeds)  # the same maps for both precisions
    tie_field = smooth_tie_field(job32.model, None, unit.images, seeds)
    metrics = ["deletion_auc", "insertion_auc", "pointing_game", "energy_pointing_game"]
    for amp in (False, True):
        job32.settings["amp"] = amp
        # scored as the worker scores a unit (its inputs: masks, annotation sizes, ties)
        results[amp], _ = score_samples(job32, unit, maps, metrics, None, seeds, tie_field)
    for key in ("deletion_auc", "insertion_auc"):
        assert (results[True][key] - results[False][key]).abs().max() < 0.01
    assert torch.equal(results[True]["pointing_game"], results[False]["pointing_game"])
    # undefined samples (no map energy) are nan in both
    torch.testing.assert_close(
        results[True]["energy_pointing_game"],
        results[False]["energy_pointing_game"],
        equal_nan=True,
    )
