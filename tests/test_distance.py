"""``task.distance``: ProtoNet's score is the user's own, ``-||e - p||^2`` or ``-||e - p||``.

easyfsl's ``PrototypicalNetworks`` scores a query by ``-torch.cdist(z_query, prototypes)``
(``easyfsl/methods/prototypical_networks.py``; prototypes are the class means of the
support features, ``easyfsl.utils.compute_prototypes``); the suite's default is Snell et
al.'s squared distance. With ``task.distance=euclidean`` the suite trains, explains and
measures easyfsl's score.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from baselines import RelevanceCAM
from evaluation.plain import plain
from experiments import builders, identity, pipeline
from experiments import config as config_module
from experiments.models.conv4 import Conv4
from experiments.tasks import family_for
from experiments.tasks.fewshot.protonet import ProtoNetModule
from fam import FAM
from fam.errors import FamBenchError
from fam.similarity import euclidean_distance, pairwise

#: test_warnings' tiny few-shot run with one method and one metric
TINY = tiny(
    "eval.n_query=2", "methods=[fam]", "metrics=[deletion_auc]", drop=["trainer.batch_size"]
)


def _easyfsl_logits(query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor):
    """easyfsl's ProtoNet: class-mean prototypes, logits ``-cdist(z_query, prototypes)``."""
    prototypes = torch.stack([support[labels == c].mean(0) for c in labels.unique()])
    return -torch.cdist(query, prototypes)


def test_euclidean_distance_reproduces_easyfsl_logits(tmp_path):
    cfg = config_module.compose_config(
        [*TINY, "task.distance=euclidean", "metric.score=similarity", f"cache_dir={tmp_path}"]
    )
    out = pipeline.run(cfg, tmp_path / "run")["out"]
    import json

    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["similarity"] == "euclidean_distance"

    run = config_module.load(cfg)
    family = family_for(run.task)
    run.task = plain(family.config)
    train_set, _ = builders.build_datasets(run.data, run.name)
    model = pipeline.build_run_model(
        run, family, train_set, torch.device("cpu"), tmp_path, False, []
    )
    _, eval_set = builders.build_datasets(run.data, run.name)
    evaluation = family.evaluation(run, None, eval_set, model, torch.device("cpu"))
    unit = evaluation.unit(0, model, torch.device("cpu"))
    episode = evaluation.sampler.episode(0)
    index = torch.arange(len(unit.images))
    with torch.no_grad():
        support = model(torch.stack([eval_set[int(i)]["image"] for i in episode.support]))
        labels = torch.arange(3).repeat_interleave(2)
        easyfsl = _easyfsl_logits(model(unit.images), support, labels)
        got = unit.score_fn(unit.images, index)  # the raw score of the explained class
    torch.testing.assert_close(got, easyfsl[index, index // 2], rtol=1e-5, atol=1e-5)
    # the episode softmax the default metrics read is easyfsl's softmax over -cdist
    with torch.no_grad():
        probs = unit.embedding_score(model(unit.images), index)
    torch.testing.assert_close(probs, easyfsl.softmax(1)[index, index // 2], rtol=1e-5, atol=1e-6)


def test_training_logits_and_pairwise_are_easyfsls():
    gen = torch.Generator().manual_seed(0)
    query, support = torch.randn(7, 12, generator=gen), torch.randn(6, 12, generator=gen)
    labels = torch.arange(3).repeat_interleave(2)
    easyfsl = _easyfsl_logits(query, support, labels)
    prototypes = support.view(3, 2, -1).mean(1)
    module = ProtoNetModule(Conv4(hidden=8), 3, 2, 2, similarity="euclidean_distance")
    torch.testing.assert_close(module.logits(query, prototypes), easyfsl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pairwise("euclidean_distance", query, prototypes), easyfsl)
    row = euclidean_distance(query[:1].expand(3, -1), prototypes)
    torch.testing.assert_close(row, easyfsl[0], rtol=1e-5, atol=1e-5)


def test_distance_is_in_the_fingerprint_and_settings_id():
    ids, prints = [], []
    for distance in ("squared_euclidean", "euclidean"):
        cfg = config_module.compose_config([*TINY, f"task.distance={distance}"])
        run = config_module.load(cfg)
        family = family_for(run.task)
        run.task = plain(family.config)
        methods = builders.build_methods(run.methods, run.method, False)
        options = {name: m.options for name, m in methods.items()}
        prints.append(identity.fingerprint_of(run, family, options, False)[0])
        evaluation = type("E", (), {"similarity": family.algorithm.similarity_name})()
        settings = identity.metric_settings(run, family, evaluation, False)
        ids.append(identity.settings_id(settings, methods["fam"].options))
    assert prints[0] != prints[1] and ids[0] != ids[1]


def test_fam_closed_form_is_exact_for_the_unsquared_distance():
    torch.manual_seed(0)
    model = Conv4(hidden=8, pools=(True, True, False, False)).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 24, 24, generator=gen)
    with torch.no_grad():
        reference = model(torch.randn(3, 3, 24, 24, generator=gen))
    closed = FAM(model, "encoder.3", contribution="ablation")
    got = closed(images, reference, "euclidean_distance", upsample=False)
    assert closed.last_path == "gap"
    brute = FAM(model, "encoder.3", contribution="ablation", path="forward_ablation")
    want = brute(images, reference, "euclidean_distance", upsample=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # and not the squared distance's weights (the maps differ)
    squared = closed(images, reference, "euclidean", upsample=False)
    assert not torch.allclose(squared / squared.amax(), got / got.amax(), atol=1e-3)
    # Relevance-CAM seeds the first-order split, which sums to the score's first order
    explainer = RelevanceCAM(model, "encoder.3", composite="zplus")
    seed = explainer.seed_relevance(images, reference, "euclidean_distance")
    with torch.no_grad():
        emb = model(images)
    d = (emb - reference).norm(dim=1)
    torch.testing.assert_close(
        seed.sum(1), (2 * (emb * reference).sum(1) - emb.pow(2).sum(1)) / (2 * d)
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task.distance=manhattan"], "task.distance must be one of"),
        (["task.distance=euclidean", "task.similarity=cosine"], "task.distance=euclidean"),
        (["task.distance=euclidean", "task.algorithm=matchingnet"], "task.distance=euclidean"),
    ],
)
def test_distance_options_are_checked(overrides, match):
    cfg = config_module.compose_config([*TINY, *overrides])
    with pytest.raises(FamBenchError, match=match):
        family_for(config_module.load(cfg).task)
