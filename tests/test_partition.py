"""Partitioning: disjoint, complete, seeded, and as skewed as asked."""

import numpy as np
import pytest

from common.options import Partitioner
from common.partition import partition_indices, train_test_split

LABELS = np.random.default_rng(0).integers(0, 10, 5000)


@pytest.mark.parametrize("kind", list(Partitioner))
def test_disjoint_complete_and_seeded(kind):
    parts = partition_indices(LABELS, 8, kind, seed=3, dirichlet_alpha=0.3, classes_per_client=2)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx))  # disjoint
    if kind is not Partitioner.PATHOLOGICAL:  # pathological may leave a class unassigned
        assert sorted(allidx.tolist()) == list(range(len(LABELS)))  # complete
    again = partition_indices(LABELS, 8, kind, seed=3, dirichlet_alpha=0.3, classes_per_client=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, 8, kind, seed=4, dirichlet_alpha=0.3, classes_per_client=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _max_class_share(parts):
    return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])


def test_dirichlet_is_visibly_skewed():
    iid = partition_indices(LABELS, 10, Partitioner.IID, seed=0)
    skew = partition_indices(LABELS, 10, Partitioner.DIRICHLET, seed=0, dirichlet_alpha=0.1)
    assert _max_class_share(iid) < 0.2  # ~0.1 each class
    assert _max_class_share(skew) > 0.5


def test_pathological_gives_each_client_its_classes():
    parts = partition_indices(LABELS, 10, Partitioner.PATHOLOGICAL, seed=0,
                              classes_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_train_test_split():
    tr, te = train_test_split(100, 0.25, seed=1)
    assert len(te) == 25 and len(tr) == 75 and not set(tr) & set(te)
    tr2, te2 = train_test_split(100, 0.25, seed=1)
    assert np.array_equal(te, te2)


def test_an_unsatisfiable_dirichlet_split_names_the_keys_to_change():
    labels = np.repeat(np.arange(10), 30)  # 300 samples, 10 classes
    with pytest.raises(ValueError, match=r"'dirichlet-alpha' \(now 0.01\).*num-supernodes"):
        partition_indices(labels, 200, Partitioner.DIRICHLET, seed=0, dirichlet_alpha=0.01)
