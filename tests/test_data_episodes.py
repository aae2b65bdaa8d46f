"""EpisodeSampler: determinism from (seed, episode), episode shape, errors."""

import subprocess
import sys

import pytest
import torch

from experiments.data import EpisodeSampler
from fam.errors import FamBenchError

# 12 classes with uneven sizes and shuffled positions, labels not contiguous from 0.
LABELS = torch.randperm(12 * 25, generator=torch.Generator().manual_seed(0)) % 12 * 3 + 7


def make(seed=5, **kw):
    shape = dict(n_way=5, n_shot=3, n_query=4, num_episodes=20)
    shape.update(kw)
    return EpisodeSampler(LABELS, seed=seed, **shape)


def test_episodes_are_identical_across_fresh_instances_and_access_order():
    first = list(make())
    second = make()
    for e in reversed(range(20)):
        ep = second.episode(e)
        assert torch.equal(ep.classes, first[e].classes)
        assert torch.equal(ep.support, first[e].support)
        assert torch.equal(ep.query, first[e].query)


def test_episodes_do_not_depend_on_the_global_rng():
    torch.manual_seed(1)
    a = make().episode(3)
    torch.manual_seed(2)
    torch.rand(100)
    b = make().episode(3)
    assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)


def test_different_seeds_and_episodes_differ():
    assert not torch.equal(make(seed=5).episode(0).support, make(seed=6).episode(0).support)
    sampler = make()
    supports = {tuple(sampler.episode(e).support.tolist()) for e in range(20)}
    assert len(supports) == 20


def test_episode_is_identical_in_another_process():
    code = (
        "import torch; from experiments.data import EpisodeSampler;"
        f"labels = torch.tensor({LABELS.tolist()});"
        "ep = EpisodeSampler(labels, 5, 3, 4, 20, seed=5).episode(11);"
        "print(ep.classes.tolist(), ep.support.tolist(), ep.query.tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    ep = make().episode(11)
    assert out == f"{ep.classes.tolist()} {ep.support.tolist()} {ep.query.tolist()}"


def test_support_and_query_are_disjoint_class_major_and_from_the_right_classes():
    sampler = make(n_way=4, n_shot=2, n_query=3)
    for ep in sampler:
        assert len(set(ep.classes.tolist())) == 4
        assert ep.support.shape == (8,) and ep.query.shape == (12,)
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert len(set(ep.query.tolist())) == 12
        assert torch.equal(LABELS[ep.support], ep.classes[ep.support_labels])
        assert torch.equal(LABELS[ep.query], ep.classes[ep.query_labels])
        assert torch.equal(ep.support_labels, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


def test_classes_are_drawn_roughly_uniformly():
    sampler = make(num_episodes=600)
    counts = torch.bincount(torch.cat([sampler.episode(e).classes for e in range(600)]))
    counts = counts[counts > 0]
    assert len(counts) == 12
    expected = 600 * 5 / 12  # 250 per class; binomial sd about 12
    assert (counts - expected).abs().max() < 60


def test_too_small_class_is_named_with_its_count_and_need():
    labels = torch.cat([torch.zeros(10), torch.ones(6), torch.full((10,), 2)]).long()
    with pytest.raises(FamBenchError, match=r"class 1 has 6 images.*n_shot \+ n_query = 8"):
        EpisodeSampler(labels, n_way=2, n_shot=5, n_query=3, num_episodes=1)


def test_more_ways_than_classes_is_an_error():
    with pytest.raises(FamBenchError, match="n_way=13 but the dataset has only 12 classes"):
        make(n_way=13)
