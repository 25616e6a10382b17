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
    # Feasible on paper (42 samples, 4 clients, 10 each) but with a near one-hot alpha each of the two classes
    # lands on a single client, so two clients always stay empty.
    labels = np.repeat(np.arange(2), 21)
    with pytest.raises(PartitionError, match=r"5 tries in .* smallest client had \d samples, \d clients below"):
        dirichlet_partition(labels, 4, 1e-3, seed=0, min_size=10, max_tries=5)


def test_clients_times_min_size_equal_to_n_is_refused_up_front() -> None:
    # Every client would need exactly min_size samples: no draw gives that, so no retry is spent on it.
    labels = np.repeat(np.arange(2), 20)
    with pytest.raises(PartitionError, match=r"needs num_clients x min_size < 40 \(here 40; min_size <= 9 or "
                                             r"num_clients <= 3 would do\)"):
        dirichlet_partition(labels, 4, 0.5, seed=0, min_size=10, max_tries=10**9)


def test_retries_are_bounded_in_time() -> None:
    labels = np.repeat(np.arange(2), 21)
    with pytest.raises(PartitionError, match=r"1 tries in .*max_seconds 0"):
        dirichlet_partition(labels, 4, 1e-3, seed=0, min_size=10, max_tries=10**9, max_seconds=0)


def _loop_reference(labels: np.ndarray, k: int, alpha: float, seed: int, min_size: int) -> tuple[list, np.ndarray]:
    """The P-B draw written as the plain loop over classes and clients (NIID-Bench), for the vectorized one."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(k)]
        props = np.full((labels.max() + 1, k), np.nan)
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(k, alpha))
            p = np.array([p[j] if len(parts[j]) < labels.size / k else 0.0 for j in range(k)])
            p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
            props[c] = p
            cuts = [int(x) for x in np.cumsum(p) * idx.size][:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j] += chunk.tolist()
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.array(q, dtype=np.int64)) for q in parts], props


@pytest.mark.parametrize(("k", "alpha", "min_size", "seed"), [(3, 0.5, 5, 0), (17, 0.1, 1, 1), (40, 0.05, 0, 2),
                                                             (7, 5.0, 20, 3)])
def test_vectorized_dirichlet_equals_the_loop_over_clients(k: int, alpha: float, min_size: int, seed: int) -> None:
    labels = _lt_labels(seed)
    want, want_props = _loop_reference(labels, k, alpha, seed, min_size)
    got = Dirichlet(alpha, min_size).split(labels, k, seed)
    assert len(got.indices) == k
    for g, w in zip(got.indices, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.isnan(got.proportions), np.isnan(want_props))
    np.testing.assert_array_equal(np.nan_to_num(got.proportions), np.nan_to_num(want_props))


@pytest.mark.slow
@pytest.mark.parametrize(("n", "k"), [(50_000, 10_000), (1_000_000, 100_000)], ids=["10k-clients", "100k-clients"])
def test_partitions_at_scale_keep_their_invariants(n: int, k: int) -> None:
    """Each partitioner at 10^4 and 10^5 clients (100 classes, alpha 0.05): an exact cover, sorted int64 indices,
    and the partitioner's own property (min size; capacity; the proportions recorded)."""
    from fedlt.data.equal_partition import DirichletPrior, GroupedDirichlet
    from fedlt.data.pooled_partition import DirichletNoCap

    labels = np.random.default_rng(0).integers(0, 100, n)
    counts = np.bincount(labels, minlength=100)
    result = Dirichlet(0.05, min_size=0).split(labels, k, 0)
    _assert_exact_cover(result.indices, n)
    sizes = np.array([p.size for p in result.indices])
    assert sizes.max() <= n / k + counts.max()  # the capacity rule
    np.testing.assert_allclose(result.proportions.sum(1), 1.0)
    for part in (DirichletNoCap(0.05), IID(), Shards(2)):
        _assert_exact_cover(part.split(labels, k, 0).indices, n)
    for part in (DirichletPrior(1.0), GroupedDirichlet(0.05)):  # P-D and P-C: equal client sizes
        indices = part.split(labels, k, 0).indices
        _assert_exact_cover(indices, n)
        sizes = np.array([p.size for p in indices])
        assert sizes.max() - sizes.min() <= 1
    _assert_exact_cover(dirichlet_per_sample_partition(labels, k, 0.05, 0), n)
    with pytest.raises(PartitionError, match="tries in"):
        Dirichlet(0.05, min_size=1, max_seconds=1.0).split(labels, k, 0)


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
