"""The contrastive task's weighted kNN classifier against a hand computation.

A bank of five unit vectors in two dimensions, three classes: the vote, its probability,
the predicted class and the explained reference (the mean of the predicted class's
neighbours' normalised embeddings) are worked out by hand, and none of them may depend on
the order of the bank.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.models import build_model
from experiments.tasks.neighbour.knn import knn_class_reference, knn_probability, knn_vote
from experiments.tasks.neighbour.queries import NeighbourEvaluation


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


#: bank directions (degrees) and labels
ANGLES = [0.0, 20.0, 50.0, 100.0, 200.0]
LABELS = [0, 1, 1, 2, 0]
K, T = 3, 0.5


def _bank(order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    bank = torch.tensor([_unit(ANGLES[i]) for i in order], dtype=torch.float64)
    labels = torch.tensor([LABELS[i] for i in order])
    return bank, labels


def _hand():
    """The query at 30 degrees (length 2: it is normalised first). Its 3 nearest are at
    20 (class 1, cos 10°), 50 (class 1, cos 20°), 0 (class 0, cos 30°)."""
    cos = {a: math.cos(math.radians(abs(30 - a))) for a in (20.0, 50.0, 0.0)}
    w = {a: math.exp(c / T) for a, c in cos.items()}
    total = sum(w.values())
    p1 = (w[20.0] + w[50.0]) / total
    p0 = w[0.0] / total
    reference = [(x + y) / 2 for x, y in zip(_unit(20.0), _unit(50.0), strict=True)]
    return p0, p1, reference


QUERY = torch.tensor([[2 * math.cos(math.radians(30)), 2 * math.sin(math.radians(30))]])


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 1, 4, 0, 2]])
def test_knn_reference_and_probability_equal_the_hand_computation_in_any_bank_order(order):
    p0, p1, reference = _hand()
    bank, labels = _bank(order)
    predicted, got_ref, rows, member = knn_class_reference(QUERY, bank, labels, K, T)
    assert predicted.tolist() == [1]
    torch.testing.assert_close(got_ref, torch.tensor([reference], dtype=torch.float64))
    # the member rows are the bank rows of the 20 and 50 degree items, whatever the order
    chosen = {ANGLES[order[int(r)]] for r, m in zip(rows[0], member[0], strict=True) if m}
    assert chosen == {20.0, 50.0}
    for cls, expected in ((1, p1), (0, p0), (2, 0.0)):
        got = knn_probability(QUERY, bank, labels, torch.tensor([cls]), K, T)
        torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))
    # the vote weights are a softmax over the k neighbours: they sum to one
    _, _, weights = knn_vote(QUERY, bank, labels, K, T)
    torch.testing.assert_close(weights.sum(1), torch.ones(1, dtype=torch.float64))


def test_a_perturbed_query_refinds_its_neighbours_against_the_fixed_class():
    """Moved to 120 degrees the query's 3 nearest are 100 (class 2), 50 (1), 200 (0): the
    probability of the original prediction (class 1) is read from the new neighbours."""
    bank, labels = _bank([0, 1, 2, 3, 4])
    moved = torch.tensor([_unit(120.0)], dtype=torch.float64)
    cos = {a: math.cos(math.radians(abs(120 - a))) for a in (100.0, 50.0, 200.0)}
    w = {a: math.exp(c / T) for a, c in cos.items()}
    expected = w[50.0] / sum(w.values())
    got = knn_probability(moved, bank, labels, torch.tensor([1]), K, T)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))


def test_tied_votes_predict_the_smaller_label():
    bank = torch.tensor([_unit(10.0), _unit(-10.0)], dtype=torch.float64)
    labels = torch.tensor([3, 1])
    predicted, reference, _, _ = knn_class_reference(
        torch.tensor([[1.0, 0.0]], dtype=torch.float64), bank, labels, 2, 0.07
    )
    assert predicted.tolist() == [1]
    torch.testing.assert_close(reference, bank[1:2])


def test_the_reference_changes_the_protocol_but_not_the_model_cache_key():
    """``task.reference`` picks what is explained, not how the encoder trains: the cached
    model is shared, while the results' protocol (``settings_id``) tells the two apart."""
    from experiments import config, identity
    from experiments.tasks import family_for

    runs = {
        ref: config.load(
            config.compose_config(["experiment=synthetic_simclr", f"task.reference={ref}"])
        )
        for ref in ("knn_class", "nearest")
    }
    keys = {ref: identity.training_key(run, family_for(run.task)) for ref, run in runs.items()}
    assert keys["knn_class"] == keys["nearest"]
    protocols = {ref: family_for(run.task).protocol(run.eval) for ref, run in runs.items()}
    assert protocols["knn_class"]["reference"] == "knn_class"
    assert protocols["knn_class"] != protocols["nearest"]
    other = config.load(
        config.compose_config(["experiment=synthetic_simclr", "task.temperature=0.2"])
    )
    assert identity.training_key(other, family_for(other.task)) != keys["knn_class"]


class _Images(torch.utils.data.Dataset):
    """Random images with labels (no masks): enough for a neighbour evaluation."""

    def __init__(self, n: int, classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=gen)
        self.labels = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def test_a_knn_unit_scores_and_re_embeds_its_reference_as_defined():
    """The unit's reference is the predicted class's neighbour mean, its score the kNN
    probability of the prediction, and ``reference_fn`` (the sanity check's re-embedding)
    gives the same reference for the same network."""
    torch.manual_seed(0)
    model = build_model("conv4", hidden=8, pools=[True, True, False, False]).eval()
    bank, queries = _Images(30, 3, seed=1), _Images(6, 3, seed=2)
    ev = NeighbourEvaluation(
        "contrastive", queries, bank, torch.arange(6), 4, "cosine",
        reference="knn_class", knn_k=5, knn_temperature=0.07,
    )  # fmt: skip
    with torch.no_grad():
        ev.find_neighbours(model, torch.device("cpu"), 4, exclude_self=False)
        unit = ev.unit(0, model, torch.device("cpu"))
        bank_unit = F.normalize(model(bank.images), dim=1)
        emb = model(queries.images[:4])
        predicted, reference, _, _ = knn_class_reference(emb, bank_unit, bank.labels, 5, 0.07)
        torch.testing.assert_close(unit.reference, reference)
        assert unit.columns["reference_label"] == predicted.tolist()
        expected = knn_probability(emb, bank_unit, bank.labels, predicted, 5, 0.07)
        index = torch.arange(4)
        torch.testing.assert_close(unit.score_fn(queries.images[:4], index), expected)
        torch.testing.assert_close(unit.reference_fn(model), reference, rtol=1e-5, atol=1e-6)
