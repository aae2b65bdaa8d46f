"""Query/gallery sets for retrieval: the standard all-vs-all protocol and disjoint halves."""

import pytest
import torch

from experiments.data import SyntheticShapes, retrieval_split
from fam.errors import FamBenchError


def test_all_protocol_is_the_test_set_against_itself_without_self_matches():
    ds = SyntheticShapes("test", images_per_class=3)
    split = retrieval_split(ds)
    assert split.query is ds and split.gallery is ds and split.exclude_self


def test_half_protocol_is_disjoint_covers_everything_and_keeps_every_class_on_both_sides():
    ds = SyntheticShapes("test", images_per_class=5)
    split = retrieval_split(ds, "half")
    query, gallery = split.query.indices, split.gallery.indices
    assert not split.exclude_self
    assert not set(query) & set(gallery) and sorted(query + gallery) == list(range(len(ds)))
    assert torch.equal(split.query.labels, ds.labels[query])
    assert set(split.query.labels.tolist()) == set(split.gallery.labels.tolist()) == set(range(20))
    assert torch.bincount(split.query.labels).tolist() == [3] * 20  # images 0, 2, 4
    item = split.gallery[0]
    assert item["index"] == gallery[0] and item["label"] == int(ds.labels[gallery[0]])
    assert split.gallery.mean == ds.mean and split.gallery.has_masks


def test_unknown_protocol_is_an_error():
    with pytest.raises(FamBenchError, match="'all'"):
        retrieval_split(SyntheticShapes("test", images_per_class=1), "random")
