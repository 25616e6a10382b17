"""Tests of fedlt.data.local_test_sets (docs/reference.md 1.5, T-A)."""

from __future__ import annotations

import numpy as np

from fedlt.data.local_test_sets import local_test_quotas, proportional_local_test


def test_hand_worked_example() -> None:
    # N = 20 train samples, |Test| = 10 (classes 0,1,2 with 4,4,2 test images).
    counts = np.array([[8, 2, 0], [0, 6, 4]])
    test_labels = np.array([0, 1, 2, 0, 1, 0, 1, 2, 0, 1])
    # m = floor(n * 10 / 20): client 0 -> [4, 1, 0]; client 1 -> [0, 3, 2].
    np.testing.assert_array_equal(local_test_quotas(counts, 10), [[4, 1, 0], [0, 3, 2]])
    local, shortfall = proportional_local_test(counts, test_labels, seed=0)
    # Client 0 takes all four class-0 images; client 1 takes both class-2 images.
    assert set(local[0][test_labels[local[0]] == 0].tolist()) == {0, 3, 5, 8}
    assert set(local[1][test_labels[local[1]] == 2].tolist()) == {2, 7}
    for k, expected in enumerate([[4, 1, 0], [0, 3, 2]]):
        np.testing.assert_array_equal(np.bincount(test_labels[local[k]], minlength=3), expected)
        assert np.all(np.diff(local[k]) > 0)
        assert local[k].dtype == np.int64
    assert shortfall.sum() == 0


def test_histogram_follows_floor_rule() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 300, size=(7, 10))
    test_labels = np.repeat(np.arange(10), 100)
    local, shortfall = proportional_local_test(counts, test_labels, seed=4)
    total = counts.sum()
    for k in range(7):
        expected = np.floor(counts[k] / total * test_labels.size).astype(np.int64)
        np.testing.assert_array_equal(np.bincount(test_labels[local[k]], minlength=10), expected)
        assert local[k].min(initial=0) >= 0 and local[k].max(initial=0) < test_labels.size
    assert shortfall.sum() == 0


def test_shortfall_recorded_without_replacement() -> None:
    # One dominant client wants 9 class-0 images but only 3 exist.
    counts = np.array([[90, 0], [5, 5]])
    test_labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    local, shortfall = proportional_local_test(counts, test_labels, seed=1)
    np.testing.assert_array_equal(local_test_quotas(counts, 10), [[9, 0], [0, 0]])
    np.testing.assert_array_equal(local[0], [0, 1, 2])
    np.testing.assert_array_equal(shortfall, [[6, 0], [0, 0]])
    assert local[1].size == 0


def test_with_replacement_keeps_duplicates() -> None:
    counts = np.array([[90, 0], [5, 5]])
    test_labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    local, shortfall = proportional_local_test(counts, test_labels, seed=1, with_replacement=True)
    assert local[0].size == 9
    assert set(local[0].tolist()) <= {0, 1, 2}
    assert shortfall.sum() == 0


def test_deterministic_and_prefix_stable() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 200, size=(5, 4))
    test_labels = np.repeat(np.arange(4), 50)
    a, _ = proportional_local_test(counts, test_labels, seed=7)
    b, _ = proportional_local_test(counts, test_labels, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c, _ = proportional_local_test(counts, test_labels, seed=8)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Adding a client changes N (hence quotas) in general; with the same quotas the earlier draws are unchanged.
    extended = np.vstack([counts, np.zeros((1, 4), dtype=np.int64)])
    d, _ = proportional_local_test(extended, test_labels, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, d[:5], strict=True))
    assert d[5].size == 0
