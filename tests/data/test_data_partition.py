"""Tests of fedlt.data.partition (docs/reference.md 1.3 invariants)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import (
    IID,
    PARTITIONERS,
    Dirichlet,
    Partitioner,
    PartitionError,
    Shards,
    dirichlet_partition,
    dirichlet_per_sample_partition,
    iid_partition,
    shards_partition,
)
from fedlt.registry import UnknownNameError


def _lt_labels(seed: int = 0, n_max: int = 400) -> np.ndarray:
    counts = longtail_counts(n_max, 10, 10)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), counts))


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices must be sorted and unique"
    allidx = np.concatenate(parts)
    assert allidx.size == n, "clients overlap or miss samples"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_registry_names() -> None:
    names = ["dirichlet", "dirichlet_no_cap", "dirichlet_per_sample", "dirichlet_prior", "grouped_dirichlet",
             "hierarchical_pooled", "iid", "shards"]
    assert PARTITIONERS.names() == names
    with pytest.raises(UnknownNameError, match=", ".join(names)):
        PARTITIONERS.get("label_skew")


# Partitioners of the training labels alone; the pooled P-E (train + test) has its own tests (test_fedpurel_protocol).
@pytest.mark.parametrize("name", [n for n, cls in PARTITIONERS.items() if not cls.pools_test_set])
def test_disjoint_complete_deterministic(name: str) -> None:
    labels = _lt_labels()
    partitioner = PARTITIONERS.get(name)()
    assert isinstance(partitioner, Partitioner)
    assert partitioner.describe()["name"] == name
    parts = partitioner(labels, 12, seed=1)
    assert len(parts) == 12
    _assert_exact_cover(parts, labels.size)
    again = partitioner(labels, 12, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partitioner(labels, 12, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_describe_params() -> None:
    assert Dirichlet(alpha=0.1, min_size=3).describe() == {
        "name": "dirichlet",
        "alpha": 0.1,
        "min_size": 3,
        "max_tries": 100,
    }
    assert Shards(3).describe() == {"name": "shards", "shards_per_client": 3}
    assert IID().describe() == {"name": "iid"}


@pytest.mark.parametrize("fn", [dirichlet_partition, dirichlet_per_sample_partition])
def test_large_alpha_matches_global_histogram(fn: Callable[..., list[np.ndarray]]) -> None:
    labels = _lt_labels(n_max=2000)  # ~8,000 samples: ~1,000 per client keeps P-A's sampling noise small
    parts = fn(labels, 8, 1e4, seed=0)
    global_hist = np.bincount(labels, minlength=10) / labels.size
    checked = 0
    for p in parts:
        if p.size >= 200:
            hist = np.bincount(labels[p], minlength=10) / p.size
            assert 0.5 * np.abs(hist - global_hist).sum() < 0.1
            checked += 1
    assert checked >= 4


def test_small_alpha_is_skewed() -> None:
    labels = _lt_labels()
    parts = dirichlet_partition(labels, 8, 0.05, seed=0, min_size=1)
    global_hist = np.bincount(labels, minlength=10) / labels.size
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - global_hist).sum() for p in parts]
    assert np.mean(tv) > 0.3


def test_min_size_honoured() -> None:
    labels = _lt_labels()
    parts = dirichlet_partition(labels, 10, 0.3, seed=3, min_size=60)
    assert min(p.size for p in parts) >= 60


def test_capacity_rule_keeps_clients_near_n_over_k() -> None:
    # A client stops receiving classes once it holds >= N/K, so no client can exceed N/K + the largest class.
    labels = _lt_labels()
    parts = dirichlet_partition(labels, 10, 0.1, seed=0, min_size=1)
    assert max(p.size for p in parts) <= labels.size / 10 + np.bincount(labels).max()


def test_impossible_min_size_raises_with_message() -> None:
    labels = _lt_labels()
    with pytest.raises(PartitionError, match=r"cannot give 500 clients >= 10 samples from 1,630 samples"):
        dirichlet_partition(labels, 500, 0.5, seed=0, min_size=10)


def test_unlucky_draws_raise_after_max_tries() -> None:
    # Feasible on paper (40 samples, 4 clients, 10 each) but with a near one-hot alpha each of the two classes
    # lands on a single client, so two clients always stay empty.
    labels = np.repeat(np.arange(2), 20)
    with pytest.raises(PartitionError, match="after 5 tries"):
        dirichlet_partition(labels, 4, 1e-3, seed=0, min_size=10, max_tries=5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda y: iid_partition(y, 0, 0), "num_clients must be >= 1"),
        (lambda y: iid_partition(y, 31, 0), "more clients than samples"),
        (lambda y: dirichlet_per_sample_partition(y, 3, 0.0, 0), "alpha must be > 0"),
        (lambda y: dirichlet_partition(y, 3, -1.0, 0), "alpha must be > 0"),
        (lambda y: shards_partition(y, 10, 0, shards_per_client=4), "non-empty shards"),
    ],
)
def test_validation_errors(call: Callable[[np.ndarray], object], match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        call(np.repeat(np.arange(3), 10))


def test_partition_error_is_value_error() -> None:
    assert issubclass(PartitionError, ValueError)


def test_iid_sizes_near_equal() -> None:
    parts = iid_partition(np.zeros(103, dtype=np.int64), 10, seed=0)
    assert sorted(p.size for p in parts) == [10] * 7 + [11] * 3


def test_shards_label_pure() -> None:
    # 10 classes x 60 samples, 10 clients x 3 shards of 20: every shard is label-pure.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 60))
    parts = shards_partition(labels, 10, seed=4, shards_per_client=3)
    _assert_exact_cover(parts, labels.size)
    for p in parts:
        assert p.size == 60
        assert np.unique(labels[p]).size <= 3


def test_per_sample_reference() -> None:
    # Independent re-implementation of P-A with the same rng stream.
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    rng = np.random.default_rng(9)
    owner = np.empty(10, dtype=np.int64)
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        p = rng.dirichlet(np.full(4, 0.7))
        owner[idx] = rng.choice(4, size=idx.size, p=p / p.sum())
    parts = dirichlet_per_sample_partition(labels, 4, 0.7, seed=9)
    for k in range(4):
        np.testing.assert_array_equal(parts[k], np.flatnonzero(owner == k))


def test_dirichlet_prior_equal_sizes_and_prior_limit():
    from fedlt.data import dirichlet_prior_partition, longtail_counts

    counts = longtail_counts(500, 10, 10.0)
    labels = np.repeat(np.arange(10), counts)
    parts = dirichlet_prior_partition(labels, 8, alpha=1.0, seed=3)
    sizes = [len(p) for p in parts]
    assert sizes[:-1] == [len(labels) // 8] * 7 and sum(sizes) == len(labels)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    # alpha -> infinity: every client's histogram approaches the global prior.
    prior = counts / counts.sum()
    for p in dirichlet_prior_partition(labels, 8, alpha=1e6, seed=0)[:-1]:
        hist = np.bincount(labels[p], minlength=10) / len(p)
        assert 0.5 * np.abs(hist - prior).sum() < 0.05
    # small alpha: clients are dominated by few classes
    skewed = dirichlet_prior_partition(labels, 8, alpha=0.1, seed=0)
    top_share = np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed[:-1]])
    assert top_share > prior.max() + 0.2


def test_grouped_dirichlet_is_equal_sized_skewed_and_follows_the_groups() -> None:
    """P-C (CReFF / CLIP2FL / FedSM, docs/reference.md 1.3 and Appendix R S18): equal client sizes, every sample
    placed once, label skew from the per-group Dirichlet, deterministic given the seed."""
    from fedlt.data import grouped_dirichlet_partition

    labels = np.repeat(np.arange(10), longtail_counts(500, 10, 10))
    parts = grouped_dirichlet_partition(labels, 20, alpha=0.5, seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == labels.size
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    hists = np.stack([np.bincount(labels[p], minlength=10) for p in parts]) / np.array(sizes)[:, None]
    global_hist = np.bincount(labels, minlength=10) / labels.size
    assert np.abs(hists - global_hist).sum(1).mean() > 0.5  # strongly skewed at alpha 0.5
    again = grouped_dirichlet_partition(labels, 20, alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = grouped_dirichlet_partition(labels, 20, alpha=0.5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    iid_like = grouped_dirichlet_partition(labels, 20, alpha=1e4, seed=0)
    flat = np.stack([np.bincount(labels[p], minlength=10) for p in iid_like]) / np.array(sizes)[:, None]
    assert np.abs(flat - global_hist).sum(1).max() < 0.1  # alpha -> infinity: every client like the global set
    # 12 clients: one group of 10 and one of 2, still equal sizes overall.
    parts12 = grouped_dirichlet_partition(labels, 12, alpha=0.5, seed=0)
    assert max(p.size for p in parts12) - min(p.size for p in parts12) <= 1
