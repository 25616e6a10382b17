"""Tests of fedlt.data.longtail against docs/reference.md 1.2 / 1.6 tables and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.data.longtail import GROUP_NAMES, class_groups, longtail_counts, longtail_indices


def test_cifar10_if100_per_class_counts() -> None:
    counts = longtail_counts(5000, 10, 100)
    assert counts.dtype == np.int64
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(
    ("n_max", "num_classes", "imbalance_factor", "total"),
    [
        (5000, 10, 10, 20431),
        (5000, 10, 50, 13996),
        (5000, 10, 100, 12406),
        (500, 100, 10, 19573),
        (500, 100, 50, 12608),
        (500, 100, 100, 10847),
    ],
)
def test_methods_table_totals(n_max: int, num_classes: int, imbalance_factor: float, total: int) -> None:
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    assert int(counts.sum()) == total
    assert counts[0] == n_max
    assert counts[-1] == n_max // imbalance_factor
    assert np.all(np.diff(counts) <= 0)


def test_single_class_and_if_one() -> None:
    assert longtail_counts(7, 1, 100).tolist() == [7]
    assert longtail_counts(30, 4, 1).tolist() == [30, 30, 30, 30]


def test_step_profile() -> None:
    # mu = 0.5 of 10 classes are minority: first 5 keep n_max, last 5 get floor(n_max / IF).
    assert longtail_counts(1000, 10, 100, profile="step").tolist() == [1000] * 5 + [10] * 5
    assert longtail_counts(1000, 10, 3, profile="step", step_frac=0.3).tolist() == [1000] * 7 + [333] * 3


@pytest.mark.parametrize("bad", [0.5, 0.01, 0.0, -3.0, float("nan"), float("inf")])
def test_imbalance_factor_below_one_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="imbalance_factor"):
        longtail_counts(100, 10, bad)


def test_unknown_profile_lists_valid() -> None:
    with pytest.raises(ValueError, match="exp, step"):
        longtail_counts(100, 10, 10, profile="linear")


def test_longtail_indices_counts_and_determinism() -> None:
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(10), 60))
    idx = longtail_indices(labels, 10, 10, seed=3)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), longtail_counts(60, 10, 10))
    np.testing.assert_array_equal(idx, longtail_indices(labels, 10, 10, seed=3))
    assert not np.array_equal(idx, longtail_indices(labels, 10, 10, seed=4))


def test_longtail_indices_reference_shuffle() -> None:
    # Independent reference of the documented procedure: one rng, class by class, keep the first n_c.
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    counts = longtail_counts(4, 3, 4)  # n_max defaults to min class count = 4 -> [4, 2, 1]
    rng = np.random.default_rng(11)
    expected = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: counts[c]] for c in range(3)]))
    np.testing.assert_array_equal(longtail_indices(labels, 3, 4, seed=11), expected)


def test_longtail_indices_n_max_too_large() -> None:
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(ValueError, match="class 0 has 5 samples"):
        longtail_indices(labels, 3, 2, n_max=6)


@pytest.mark.parametrize(
    ("n_max", "num_classes", "imbalance_factor", "oltr", "fedloge"),
    [
        (5000, 10, 10, (10, 0, 0), (5, 4, 1)),
        (5000, 10, 50, (9, 1, 0), (4, 3, 3)),
        (5000, 10, 100, (8, 2, 0), (3, 3, 4)),
        (500, 100, 10, (69, 31, 0), (49, 35, 16)),
        (500, 100, 50, (41, 41, 18), (34, 34, 32)),
        (500, 100, 100, (35, 35, 30), (30, 31, 39)),
    ],
)
def test_group_size_table(
    n_max: int, num_classes: int, imbalance_factor: float, oltr: tuple[int, ...], fedloge: tuple[int, ...]
) -> None:
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    assert tuple(np.bincount(class_groups(counts, "counts"), minlength=3)) == oltr
    assert tuple(np.bincount(class_groups(counts, "cumulative"), minlength=3)) == fedloge


def test_counts_convention_boundaries() -> None:
    # OLTR: many n > 100, medium 20 <= n <= 100, few n < 20.
    groups = class_groups(np.array([101, 100, 20, 19, 0]), "counts")
    assert groups.tolist() == [0, 1, 1, 2, 2]
    assert groups.dtype == np.int64
    assert GROUP_NAMES == ("many", "medium", "few")


def test_fedpurel_convention_puts_exactly_20_in_few() -> None:
    # FedPuReL / FedSM code: many n > 100, medium 20 < n <= 100, few n <= 20 (docs/reference.md 1.6).
    assert class_groups(np.array([101, 100, 21, 20, 0]), "fedpurel").tolist() == [0, 1, 1, 2, 2]
    # docs/reference.md 1.6 table: CIFAR-100 IF 50 -> 41/40/19 and IF 100 -> 35/34/31 with the <= 20 rule.
    for imbalance_factor, sizes in ((50, (41, 40, 19)), (100, (35, 34, 31))):
        counts = longtail_counts(500, 100, imbalance_factor)
        assert tuple(np.bincount(class_groups(counts, "fedpurel"), minlength=3)) == sizes


def test_cumulative_hand_example_unsorted_with_ties() -> None:
    # Shares sorted desc: 50 (0.5), 25 (0.75 -> crosses, head ends), 10, 10 (0.95 -> medium ends), 5 (tail).
    counts = np.array([10, 50, 5, 25, 10])
    assert class_groups(counts, "cumulative").tolist() == [1, 0, 2, 0, 1]


def test_thirds_convention() -> None:
    counts = np.array([5, 9, 1, 7, 3, 3, 8])  # C = 7 -> ceil(7/3) = 3 many, 3 medium, 1 few
    groups = class_groups(counts, "thirds")
    assert groups.tolist() == [1, 0, 2, 0, 1, 1, 0]


def test_unknown_convention() -> None:
    with pytest.raises(ValueError, match="counts, cumulative, thirds, fedpurel"):
        class_groups(np.array([3, 2, 1]), "quartiles")
