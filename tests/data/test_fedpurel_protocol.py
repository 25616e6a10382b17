"""FedPuReL's data protocols: partitions P-E / P-F (docs/reference.md 1.3) and local test sets T-B..T-E
(docs/reference.md 1.5)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fedlt.data.federated import FederatedDataset
from fedlt.data.local_test_sets import (
    balanced_local_test,
    independent_local_test,
    same_share_local_test,
)
from fedlt.data.longtail import longtail_counts
from fedlt.data.partition import (
    Dirichlet,
    DirichletPerSample,
    PartitionError,
    dirichlet_split,
    dirichlet_try,
)
from fedlt.data.pooled_partition import (
    DirichletNoCap,
    HierarchicalPooled,
    dirichlet_no_cap_partition,
    hierarchical_pooled_partition,
)
from fedlt.data.sources import DataSource, EmbeddedDigits, SourceData

_DIGITS = {"image_size": 16, "train_per_class": 200, "test_per_class": 40, "holdout_per_class": 40}
_DIGIT_SUPERCLASSES = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def _lt_labels(n_max: int = 400, num_classes: int = 10, imbalance: float = 10.0, seed: int = 0) -> np.ndarray:
    counts = longtail_counts(n_max, num_classes, imbalance)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), counts))


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _cut_counts(p: np.ndarray, n: int) -> np.ndarray:
    """Per-client counts of cutting n shuffled items at the cumulative proportions p (the NIID-Bench rule)."""
    cuts = (np.cumsum(p) * n).astype(np.int64)[:-1]
    return np.diff(np.concatenate([[0], cuts, [n]]))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------- P-F, P-B


def test_no_cap_reference_and_invariants() -> None:
    labels = _lt_labels()
    result = DirichletNoCap(alpha=0.3).split(labels, 6, seed=4)
    _assert_disjoint_cover(result.indices, labels.size)
    # Independent re-implementation with the same stream: shuffle, draw, cut; no cap, one draw.
    rng = np.random.default_rng(4)
    owner = np.empty(labels.size, dtype=np.int64)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(6, 0.3))
        np.testing.assert_allclose(result.proportions[c], p / p.sum())
        owner[idx] = np.repeat(np.arange(6), _cut_counts(p / p.sum(), idx.size))
    for k in range(6):
        np.testing.assert_array_equal(result.indices[k], np.flatnonzero(owner == k))
    assert _same(result.indices, dirichlet_no_cap_partition(labels, 6, 0.3, seed=4))
    assert not _same(result.indices, dirichlet_no_cap_partition(labels, 6, 0.3, seed=5))
    assert DirichletNoCap(0.3).describe() == {"name": "dirichlet_no_cap", "alpha": 0.3}


def test_no_cap_has_no_capacity_rule() -> None:
    # Three classes of 300 on 2 clients, alpha tiny: each class goes (almost) whole to one client. Without the cap
    # one client can take all three; P-B stops feeding a client at N/K = 450, so it holds at most 450 + 300.
    labels = np.repeat(np.arange(3), 300)
    biggest = max(max(p.size for p in dirichlet_no_cap_partition(labels, 2, 1e-3, seed=s)) for s in range(16))
    assert biggest > 850
    capped = max(max(p.size for p in dirichlet_split(labels, 2, 1e-3, s, min_size=0).indices) for s in range(16))
    assert capped <= 750


def test_no_cap_large_alpha_matches_global_histogram() -> None:
    labels = _lt_labels(n_max=2000)
    global_hist = np.bincount(labels) / labels.size
    for p in dirichlet_no_cap_partition(labels, 8, 1e5, seed=0):
        assert 0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - global_hist).sum() < 0.02


def test_dirichlet_records_proportions_of_the_successful_try() -> None:
    labels = _lt_labels()
    # A seed whose first draw misses min_size, so the recorded proportions must come from a later try.
    seed = next(s for s in range(50)
                if dirichlet_try(labels, 10, 0.2, np.random.default_rng(s))[1].min() < 40)
    result = Dirichlet(0.2, min_size=40).split(labels, 10, seed)
    assert min(p.size for p in result.indices) >= 40
    assert result.proportions.shape == (10, 10)
    np.testing.assert_allclose(result.proportions.sum(1), 1.0)
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in result.indices])  # (K, C)
    for c in range(10):
        np.testing.assert_array_equal(counts[:, c], _cut_counts(result.proportions[c], int((labels == c).sum())))
    assert (result.proportions == 0).any()  # the capacity rule zeroed some full clients
    assert _same(result.indices, Dirichlet(0.2, min_size=40)(labels, 10, seed))


# ---------------------------------------------------------------------------------------------------- T-B, T-D, T-E


def test_same_share_histogram_follows_proportions() -> None:
    result = Dirichlet(0.5, min_size=1).split(_lt_labels(), 5, seed=1)
    test_labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 5000))
    local = same_share_local_test(result.proportions, test_labels, seed=1)
    _assert_disjoint_cover(local, test_labels.size)
    hist = np.stack([np.bincount(test_labels[p], minlength=10) for p in local])  # (K, C)
    for c in range(10):
        np.testing.assert_array_equal(hist[:, c], _cut_counts(result.proportions[c], 5000))
    # Balanced test set: client k's local histogram is proportional to its shares p_{k,.} (within rounding).
    np.testing.assert_allclose(hist / 5000, result.proportions.T, atol=1 / 5000 + 1e-12)
    assert _same(local, same_share_local_test(result.proportions, test_labels, seed=1))


def test_same_share_rejects_classes_without_proportions() -> None:
    proportions = np.array([[0.5, 0.5], [np.nan, np.nan]])
    with pytest.raises(ValueError, match="test class 1 has no train proportions"):
        same_share_local_test(proportions, np.array([0, 1, 0, 1]), seed=0)


def test_balanced_split_is_even() -> None:
    test_labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), np.arange(30, 40)))
    local = balanced_local_test(test_labels, 7, seed=2)
    _assert_disjoint_cover(local, test_labels.size)
    hist = np.stack([np.bincount(test_labels[p], minlength=10) for p in local])
    assert (hist.max(0) - hist.min(0) <= 1).all()
    sizes = hist.sum(1)
    assert sizes.max() - sizes.min() <= 1
    assert _same(local, balanced_local_test(test_labels, 7, seed=2))
    assert not _same(local, balanced_local_test(test_labels, 7, seed=3))


def test_independent_is_a_fresh_no_cap_draw() -> None:
    test_labels = np.repeat(np.arange(10), 300)
    local = independent_local_test(test_labels, 6, alpha=0.5, seed=7)
    _assert_disjoint_cover(local, test_labels.size)
    assert _same(local, independent_local_test(test_labels, 6, alpha=0.5, seed=7))
    # Not the draw the train partition makes from the same seed (its own stream) ...
    assert not _same(local, dirichlet_no_cap_partition(test_labels, 6, 0.5, seed=7))
    # ... and the alpha matters: large alpha gives near-balanced local test sets.
    flat = independent_local_test(test_labels, 6, alpha=1e5, seed=7)
    hist = np.stack([np.bincount(test_labels[p], minlength=10) for p in flat])
    assert np.abs(hist - 50).max() <= 3


# ---------------------------------------------------------------------------------------------------- P-E


def _pool(num_classes: int = 10, test_per_class: int = 50) -> tuple[np.ndarray, np.ndarray]:
    return _lt_labels(n_max=300, num_classes=num_classes), np.repeat(np.arange(num_classes), test_per_class)


@pytest.mark.parametrize("num_clients", [7, 8])
def test_pooled_invariants(num_clients: int) -> None:
    train, test = _pool()
    pool = train.size + test.size
    result = hierarchical_pooled_partition(train, test, num_clients, _DIGIT_SUPERCLASSES, 1.0, 10.0, seed=3)
    assert len(result.indices) == len(result.test_indices) == num_clients
    for tr, te in zip(result.indices, result.test_indices, strict=True):
        assert tr.size + te.size == pool // num_clients  # every client draws floor(|pool| / K)
        assert tr.min(initial=0) >= 0 and tr.max(initial=0) < train.size  # train part of the pool
        assert te.min(initial=0) >= 0 and te.max(initial=0) < test.size  # test part of the pool
    drawn = np.concatenate([*result.indices, *(t + train.size for t in result.test_indices)])
    assert np.unique(drawn).size == drawn.size  # disjoint
    assert result.unassigned == pool % num_clients == pool - drawn.size
    if pool % num_clients == 0:  # then the union is the whole pool
        np.testing.assert_array_equal(np.sort(drawn), np.arange(pool))
    again = hierarchical_pooled_partition(train, test, num_clients, _DIGIT_SUPERCLASSES, 1.0, 10.0, seed=3)
    assert _same(result.indices, again.indices) and _same(result.test_indices, again.test_indices)
    other = hierarchical_pooled_partition(train, test, num_clients, _DIGIT_SUPERCLASSES, 1.0, 10.0, seed=4)
    assert not _same(result.indices, other.indices)


def _superclasses_per_client(beta: float, seed: int) -> float:
    train, test = _lt_labels(n_max=2000, num_classes=10, imbalance=1.0), np.repeat(np.arange(10), 200)
    sup = np.asarray(_DIGIT_SUPERCLASSES)
    result = hierarchical_pooled_partition(train, test, 20, sup, beta, 10.0, seed)
    counts = []
    for tr, te in zip(result.indices, result.test_indices, strict=True):
        hist = np.bincount(sup[np.concatenate([train[tr], test[te]])], minlength=5)
        counts.append(int((hist >= 0.1 * hist.sum()).sum()))  # superclasses holding >= 10 % of the client
    return float(np.mean(counts))


def test_pooled_small_beta_concentrates_on_few_superclasses() -> None:
    assert _superclasses_per_client(0.01, seed=0) < 2.0
    assert _superclasses_per_client(1e4, seed=0) >= 4.5  # the last clients take what is left


def test_pooled_needs_superclasses() -> None:
    with pytest.raises(PartitionError, match="pass partition.init_args.superclasses, a list of 10 coarse ids"):
        HierarchicalPooled().split_pooled(*_pool(), 4, 0, num_classes=10)
    with pytest.raises(PartitionError, match="split_pooled"):
        HierarchicalPooled(superclasses=_DIGIT_SUPERCLASSES)(_pool()[0], 4, 0)
    with pytest.raises(PartitionError, match="10 coarse ids"):
        HierarchicalPooled(superclasses=[0, 1]).split_pooled(*_pool(), 4, 0, num_classes=10)
    with pytest.raises(PartitionError, match="differs from the source"):
        HierarchicalPooled(superclasses=_DIGIT_SUPERCLASSES).split_pooled(*_pool(), 4, 0, 10, np.arange(10) % 2)


def test_pooled_is_fast_at_cifar100_scale() -> None:
    train = np.repeat(np.arange(100), longtail_counts(500, 100, 100.0))  # CIFAR-100-LT IF 100: 10,847
    test = np.repeat(np.arange(100), 100)
    start = time.perf_counter()
    result = hierarchical_pooled_partition(train, test, 20, np.arange(100) % 20, 0.1, 10.0, seed=0)
    assert time.perf_counter() - start < 5.0  # ~20 ms; the bound only catches a per-item Python loop gone wrong
    assert result.unassigned == (train.size + test.size) % 20


# ---------------------------------------------------------------------------------------------------- FederatedDataset


class _Coarse(DataSource):
    """The embedded digits with a class hierarchy, as CIFAR-100's source provides one."""

    name = "digits_coarse"

    def __init__(self, superclasses: list[int]) -> None:
        self.digits = EmbeddedDigits(**_DIGITS)
        self.superclasses = superclasses

    def load(self) -> SourceData:
        data = self.digits.load()
        data.superclasses = np.asarray(self.superclasses)  # works with and without the SourceData field
        return data


def _fed(partition, local_test: str | None = None, source: DataSource | None = None, **kw) -> FederatedDataset:
    ds = FederatedDataset(source or EmbeddedDigits(**_DIGITS), num_clients=6, imbalance_factor=10.0,
                          partition=partition, local_test=local_test, seed=3, **kw)
    ds.setup("cpu")
    return ds


def _local_hist(ds: FederatedDataset) -> np.ndarray:
    return np.stack([torch.bincount(ds.test.y[p], minlength=10).numpy() for p in ds.client_test_indices])


def test_dataset_pooled_partition() -> None:
    ds = _fed(HierarchicalPooled(beta=0.5, superclasses=_DIGIT_SUPERCLASSES))
    assert ds.local_test == "pooled"
    lt_size = int(longtail_counts(200, 10, 10.0).sum())
    pool = lt_size + 400
    assert len(ds.test) == 400 and torch.bincount(ds.test.y).tolist() == [40] * 10  # GM test set stays balanced
    # The train split is the LT items some client drew; the undrawn train and test items are the unassigned ones.
    undrawn = (lt_size - len(ds.train)) + (400 - sum(int(p.numel()) for p in ds.client_test_indices))
    assert ds.partition_unassigned == undrawn == pool % 6
    all_train = torch.cat(ds.client_indices).sort().values
    assert torch.equal(all_train, torch.arange(len(ds.train)))  # the clients cover the train split exactly
    all_test = torch.cat(ds.client_test_indices)
    assert all_test.unique().numel() == all_test.numel()  # local test sets are disjoint
    for tr, te in zip(ds.client_indices, ds.client_test_indices, strict=True):
        assert tr.numel() + te.numel() == pool // 6
    assert set(ds.lt_indices.tolist()) <= set(range(2000))  # indices into the source's train set
    summary = ds.summary()
    assert summary["partition"]["name"] == "hierarchical_pooled" and summary["local_test"] == "pooled"
    assert summary["partition_unassigned"] == pool % 6
    assert summary["local_test_sizes"] == [int(p.numel()) for p in ds.client_test_indices]


def test_dataset_pooled_takes_superclasses_from_the_source() -> None:
    a = _fed(HierarchicalPooled(), source=_Coarse(_DIGIT_SUPERCLASSES))
    b = _fed(HierarchicalPooled(superclasses=_DIGIT_SUPERCLASSES))
    assert all(torch.equal(x, y) for x, y in zip(a.client_indices, b.client_indices, strict=True))
    with pytest.raises(ValueError, match="no class hierarchy"):
        _fed(HierarchicalPooled())


def test_dataset_protocol_compatibility_errors() -> None:
    digits = EmbeddedDigits(**_DIGITS)
    with pytest.raises(ValueError, match="must be 'pooled'"):
        FederatedDataset(digits, partition=HierarchicalPooled(superclasses=_DIGIT_SUPERCLASSES),
                         local_test="proportional")
    with pytest.raises(ValueError, match="use partition hierarchical_pooled"):
        FederatedDataset(digits, partition=Dirichlet(), local_test="pooled")
    with pytest.raises(ValueError, match="only these partitioners record: dirichlet, dirichlet_no_cap"):
        FederatedDataset(digits, partition=DirichletPerSample(), local_test="same_share")


def test_dataset_same_share_balanced_independent() -> None:
    same = _fed(Dirichlet(0.5, min_size=5), "same_share")
    result = Dirichlet(0.5, min_size=5).split(same.train.y.numpy(), 6, seed=3)
    hist = _local_hist(same)
    for c in range(10):
        np.testing.assert_array_equal(hist[:, c], _cut_counts(result.proportions[c], 40))
    assert torch.cat(same.client_test_indices).unique().numel() == 400  # disjoint, covers the test set

    bal = _local_hist(_fed(Dirichlet(0.5, min_size=5), "balanced"))
    assert (bal.max(0) - bal.min(0) <= 1).all() and bal.sum() == 400

    ind_nocap = _fed(DirichletNoCap(0.5), "independent")
    ind_dir = _fed(Dirichlet(0.5, min_size=5), "independent")
    # Same alpha, different train draws: the T-E draw depends on neither train draw.
    assert not all(torch.equal(x, y) for x, y in zip(ind_nocap.client_indices, ind_dir.client_indices, strict=True))
    assert all(torch.equal(x, y) for x, y in
               zip(ind_nocap.client_test_indices, ind_dir.client_test_indices, strict=True))
    expected = independent_local_test(ind_dir.test.y.numpy(), 6, alpha=0.5, seed=3)
    assert all(np.array_equal(p.numpy(), e) for p, e in zip(ind_dir.client_test_indices, expected, strict=True))
    assert ind_dir.summary()["local_test"] == "independent"
