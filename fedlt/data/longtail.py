"""Long-tailed subsampling and many/medium/few class groups (docs/reference.md 1.2 and 1.6).

The long-tail profile follows Cao et al. (2019): class 0 is the head, classes keep their natural label order,
and the test set stays balanced. Group conventions are those of docs/reference.md 1.6 (OLTR thresholds, FedLoGe
cumulative shares, equal thirds).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["GROUP_CONVENTIONS", "GROUP_NAMES", "LT_PROFILES", "class_groups", "longtail_counts", "longtail_indices"]

GROUP_NAMES: tuple[str, str, str] = ("many", "medium", "few")
"""Group id -> name; ``class_groups`` returns these ids (0 = many, 1 = medium, 2 = few)."""

GROUP_CONVENTIONS: tuple[str, ...] = ("counts", "cumulative", "thirds", "fedpurel")


def _check_imbalance_factor(imbalance_factor: float) -> None:
    if not (imbalance_factor >= 1.0) or not math.isfinite(imbalance_factor):
        raise ValueError(
            f"imbalance_factor must be a finite number >= 1 (IF = n_max / n_min), got {imbalance_factor!r}; "
            "write IF=100 rather than the 0.01 'imb_factor' convention of some codebases"
        )


def _exp_counts(n_max: int, num_classes: int, imbalance_factor: float, step_frac: float) -> np.ndarray:
    del step_frac  # only the step profile uses it
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    # Python float math reproduces the published CIFAR-LT totals exactly (verified in the tests).
    counts = [int(np.floor(n_max * imbalance_factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]
    return np.array(counts, dtype=np.int64)


def _step_counts(n_max: int, num_classes: int, imbalance_factor: float, step_frac: float) -> np.ndarray:
    # Cao et al. (2019) step imbalance: mu = step_frac of the classes are minority classes with n_max / IF.
    if not 0.0 <= step_frac <= 1.0:
        raise ValueError(f"step_frac must lie in [0, 1], got {step_frac}")
    num_minority = int(step_frac * num_classes)
    counts = np.full(num_classes, n_max, dtype=np.int64)
    counts[num_classes - num_minority :] = int(np.floor(n_max / imbalance_factor))
    return counts


LT_PROFILES: tuple[str, ...] = ("exp", "step")
_PROFILE_BUILDERS: dict[str, Callable[[int, int, float, float], np.ndarray]] = {
    "exp": _exp_counts,
    "step": _step_counts,
}


def longtail_counts(
    n_max: int,
    num_classes: int,
    imbalance_factor: float,
    profile: str = "exp",
    step_frac: float = 0.5,
) -> np.ndarray:
    """Per-class training counts of a long-tailed profile.

    ``exp`` (docs/reference.md 1.2): ``n_c = floor(n_max * IF^(-c/(C-1)))``, so ``n_0 = n_max`` and
    ``n_{C-1} = floor(n_max / IF)``. ``step`` (Cao et al. 2019): the first ``C - int(step_frac * C)`` classes
    keep ``n_max`` and the remaining ``int(step_frac * C)`` minority classes get ``floor(n_max / IF)``.

    Args:
        n_max: count of the head class (class 0).
        num_classes: number of classes C.
        imbalance_factor: IF = n_max / n_min, at least 1.
        profile: ``"exp"`` or ``"step"``.
        step_frac: fraction mu of minority classes for the ``step`` profile.

    Returns:
        int64 array of shape (C,), non-increasing.

    Raises:
        ValueError: IF < 1, an unknown profile, or non-positive sizes.
    """
    _check_imbalance_factor(imbalance_factor)
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"need num_classes >= 1 and n_max >= 1, got num_classes={num_classes}, n_max={n_max}")
    builder = _PROFILE_BUILDERS.get(profile)
    if builder is None:
        raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {', '.join(LT_PROFILES)}")
    return builder(n_max, num_classes, imbalance_factor, step_frac)


def longtail_indices(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
) -> np.ndarray:
    """Indices of a long-tailed subsample of a (roughly) balanced labelled set.

    Each class's indices are shuffled with one ``np.random.default_rng(seed)`` stream, class by class in class
    order, and the first ``n_c`` are kept (docs/reference.md 1.2: "shuffle each class's indices with a fixed seed,
    keep the first n_c").

    Args:
        labels: integer labels of the full training set, shape (N,).
        num_classes: number of classes C.
        imbalance_factor: IF >= 1.
        profile: ``"exp"`` or ``"step"`` (see ``longtail_counts``).
        seed: seed of the shuffle.
        n_max: head-class count; defaults to the smallest per-class count so every class can supply n_c.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        ValueError: a class has fewer than n_c samples, or labels fall outside [0, C).
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    available = np.bincount(labels, minlength=num_classes)
    if n_max is None:
        n_max = int(available.min())
    counts = longtail_counts(n_max, num_classes, imbalance_factor, profile)
    short = np.flatnonzero(available < counts)
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"class {c} has {available[c]} samples but the long-tail profile needs {counts[c]}; lower n_max"
        )
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        kept.append(rng.permutation(idx)[: counts[c]])
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)


def _groups_counts(counts: np.ndarray, many_threshold: int, few_threshold: int) -> np.ndarray:
    # OLTR (Liu et al. 2019): many n_c > 100, few n_c < 20, medium otherwise (docs/reference.md 1.6).
    groups = np.ones(counts.shape[0], dtype=np.int64)
    groups[counts > many_threshold] = 0
    groups[counts < few_threshold] = 2
    return groups


def _groups_cumulative(counts: np.ndarray, cumulative: tuple[float, float]) -> np.ndarray:
    # FedLoGe [code]: classes sorted by count desc.; head = up to and including the class where the cumulative
    # sample share crosses cumulative[0], medium = up to the one crossing cumulative[1], tail = rest.
    head_share, medium_share = cumulative
    if not 0.0 < head_share <= medium_share <= 1.0:
        raise ValueError(f"cumulative shares must satisfy 0 < head <= medium <= 1, got {cumulative}")
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    groups = np.full(counts.shape[0], 2, dtype=np.int64)
    if total <= 0:
        return groups
    share = np.cumsum(counts[order]) / total
    # Small tolerance so a share of exactly 0.75 (up to float error) counts as crossing.
    head_end = int(np.searchsorted(share, head_share - 1e-12, side="left"))
    medium_end = int(np.searchsorted(share, medium_share - 1e-12, side="left"))
    groups[order[: head_end + 1]] = 0
    groups[order[head_end + 1 : medium_end + 1]] = 1
    return groups


def _groups_thirds(counts: np.ndarray) -> np.ndarray:
    num_classes = counts.shape[0]
    order = np.argsort(-counts, kind="stable")
    third = math.ceil(num_classes / 3)
    groups = np.full(num_classes, 2, dtype=np.int64)
    groups[order[:third]] = 0
    groups[order[third : 2 * third]] = 1
    return groups


def class_groups(
    class_counts: np.ndarray,
    convention: str = "counts",
    many_threshold: int = 100,
    few_threshold: int = 20,
    cumulative: tuple[float, float] = (0.75, 0.95),
) -> np.ndarray:
    """Many/medium/few group of every class from global training counts (docs/reference.md 1.6).

    Args:
        class_counts: global training count per class, shape (C,).
        convention: ``"counts"`` (OLTR: many n_c > many_threshold, few n_c < few_threshold),
            ``"cumulative"`` (FedLoGe: 75 % / 95 % cumulative sample share), or ``"thirds"`` (equal thirds by
            count, ceil(C/3) many, ceil(C/3) medium, rest few), or ``"fedpurel"`` (FedPuReL's and FedSM's code:
            many n_c > many_threshold, few n_c <= few_threshold).
        many_threshold: ``counts`` convention: a class with more samples is "many".
        few_threshold: ``counts`` convention: a class with fewer samples is "few".
        cumulative: ``cumulative`` convention: (head share, head+medium share).

    Returns:
        int64 array (C,) with 0 = many, 1 = medium, 2 = few (names in ``GROUP_NAMES``).

    Raises:
        ValueError: unknown convention.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    rules: dict[str, Callable[[], np.ndarray]] = {
        "counts": lambda: _groups_counts(counts, many_threshold, few_threshold),
        "cumulative": lambda: _groups_cumulative(counts, cumulative),
        "thirds": lambda: _groups_thirds(counts),
        # FedPuReL / FedSM [code]: many n_c > 100, few n_c <= 20 (a class with exactly 20 samples is few).
        "fedpurel": lambda: _groups_counts(counts, many_threshold, few_threshold + 1),
    }
    if convention not in rules:
        raise ValueError(f"unknown group convention {convention!r}; valid conventions: {', '.join(GROUP_CONVENTIONS)}")
    return rules[convention]()
