"""Equal-size non-IID partitions (docs/reference.md 1.3): P-C, the grouped Dirichlet of CReFF / CLIP2FL / FedSM's code
(``GroupedDirichlet``), and P-D, RedGrape's client-wise Dirichlet over the global prior (``DirichletPrior``).

Both register in ``fedlt.data.partition.PARTITIONERS`` (``grouped_dirichlet``, ``dirichlet_prior``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedlt.data.partition import PARTITIONERS, Partitioner, PartitionError, dirichlet_try, sorted_parts, validate_labels

__all__ = ["DirichletPrior", "GroupedDirichlet", "dirichlet_prior_partition", "grouped_dirichlet_partition"]


def grouped_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                                group_size: int = 10, min_fraction: float = 0.5,
                                max_tries: int = 1000) -> list[np.ndarray]:
    """P-C: CReFF's / CLIP2FL's / FedSM's equal-size Dirichlet split (docs/reference.md 1.3, Appendix R S18).

    The shuffled training set is cut into ceil(K / group_size) consecutive slices, one per group of
    ``group_size`` clients (the last group takes the remaining clients and samples; each other slice holds
    int(group_size / K * N) samples). Inside a group of k clients, NIID-Bench's P-B runs on the slice: per class
    p ~ Dir(alpha 1_k), clients already holding >= |slice| / k samples get no more, cut the class at the
    cumulative proportions; the whole group draw repeats until its smallest client holds
    >= int(min_fraction * |slice| / k) samples. The groups' client lists are concatenated in order and re-cut into
    K contiguous parts of equal size (the first N mod K parts one larger): client sizes are equal and the label
    skew is inherited from the Dirichlet ordering.

    Args:
        labels: training labels (N,).
        num_clients: K.
        alpha: Dirichlet concentration (CReFF / FedSM: 0.5).
        seed: seed of the split.
        group_size: clients per group (the code: 10).
        min_fraction: minimum client size inside a group, as a fraction of the group's even share (the code: 0.5).
        max_tries: group draws to try before giving up.

    Raises:
        PartitionError: invalid arguments, or a group never met the minimum size.
    """
    labels = validate_labels(labels, num_clients, alpha)
    if group_size < 1:
        raise PartitionError(f"group_size must be >= 1, got {group_size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    n, groups = labels.shape[0], math.ceil(num_clients / group_size)
    per_group = int(min(group_size, num_clients) / num_clients * n)
    concatenated: list[np.ndarray] = []
    for g in range(groups):
        k = min(group_size, num_clients - g * group_size)
        chunk = order[g * per_group :] if g == groups - 1 else order[g * per_group : (g + 1) * per_group]
        need = int(min_fraction * chunk.shape[0] / k)
        for _ in range(max_tries):
            owner, sizes, _, seq = dirichlet_try(labels[chunk], k, alpha, rng)
            if int(sizes.min()) >= need:
                break
        else:
            raise PartitionError(f"grouped Dirichlet: no draw in {max_tries} gave every client of group {g} at least "
                                 f"{need} samples; raise alpha or lower min_fraction")
        # Client after client, each client's samples in the order the draw dealt them.
        concatenated.append(chunk[seq[np.argsort(owner[seq], kind="stable")]])
    flat = np.concatenate(concatenated).astype(np.int64, copy=False)
    base, extra = divmod(flat.shape[0], num_clients)
    cuts = np.cumsum(base + (np.arange(num_clients) < extra))[:-1]
    return sorted_parts(np.split(flat, cuts))


def _take_from_pools(pools: list[list[int]], want: np.ndarray, budget: int) -> list[int]:
    """Takes up to ``want[c]`` samples of each class (at most ``budget`` in all), then fills any shortfall from
    the classes that still hold samples, in proportion to what they hold (P-D rule)."""
    taken: list[int] = []
    for c, n in enumerate(want):
        n = int(min(n, len(pools[c]), budget - len(taken)))
        taken.extend(pools[c][:n])
        del pools[c][:n]
    while len(taken) < budget:
        sizes = np.array([len(p) for p in pools], dtype=np.float64)
        if sizes.sum() == 0:
            break
        extra = np.floor(sizes / sizes.sum() * (budget - len(taken))).astype(np.int64)
        if extra.sum() == 0:  # fewer samples wanted than classes left: one from the largest pool
            extra[int(np.argmax(sizes))] = 1
        for c, n in enumerate(extra):
            n = int(min(n, len(pools[c]), budget - len(taken)))
            taken.extend(pools[c][:n])
            del pools[c][:n]
    return taken


def dirichlet_prior_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """P-D client-wise Dirichlet with the global prior and equal client sizes (RedGrape's code, docs/reference.md 1.3).

    For every client k but the last: q_k ~ Dir(alpha * p_global) over the classes present, with p_global the
    training label frequencies; the client receives N // K samples, round(q_{k,c} * N / K) of class c taken from
    that class's remaining (shuffled) pool; a shortfall (exhausted pools, rounding) is filled from the other
    classes in proportion to what they still hold. The last client takes every leftover sample. The concentration
    vector sums to alpha, so tail classes are rarely drawn.

    Args:
        labels: training labels (N,).
        num_clients: K.
        alpha: concentration alpha (> 0) multiplying the global prior.
        seed: seed of the split.
    """
    labels = validate_labels(labels, num_clients, alpha)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes]
    prior = np.array([len(p) for p in pools], dtype=np.float64) / labels.shape[0]
    budget = labels.shape[0] // num_clients
    parts: list[list[int]] = []
    for _ in range(num_clients - 1):
        q = rng.dirichlet(alpha * prior)
        q = np.nan_to_num(q, nan=0.0)  # tiny concentrations can underflow; renormalise what is left
        q = q / q.sum() if q.sum() > 0 else prior
        parts.append(_take_from_pools(pools, np.round(q * budget).astype(np.int64), budget))
    parts.append([i for p in pools for i in p])
    return sorted_parts(parts)




@PARTITIONERS.register("dirichlet_prior")
class DirichletPrior(Partitioner):
    """P-D client-wise Dirichlet over the global class prior with equal client sizes (RedGrape's code).

    Args:
        alpha: concentration alpha multiplying the global label frequencies (RedGrape: 1.0).
    """

    name = "dirichlet_prior"

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return dirichlet_prior_partition(labels, num_clients, self.alpha, seed)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}



@PARTITIONERS.register("grouped_dirichlet")
class GroupedDirichlet(Partitioner):
    """P-C grouped Dirichlet with equal client sizes (CReFF / CLIP2FL / FedSM's code; docs/reference.md 1.3, Appendix
    R S18).

    Args:
        alpha: Dirichlet concentration (FedSM / CReFF: 0.5).
        group_size: clients per Dirichlet group (the code: 10).
        min_fraction: minimum client size inside a group as a fraction of the even share (the code: 0.5).
    """

    name = "grouped_dirichlet"

    def __init__(self, alpha: float = 0.5, group_size: int = 10, min_fraction: float = 0.5) -> None:
        self.alpha = alpha
        self.group_size = group_size
        self.min_fraction = min_fraction

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return grouped_dirichlet_partition(labels, num_clients, self.alpha, seed, self.group_size, self.min_fraction)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "group_size": self.group_size, "min_fraction": self.min_fraction}
