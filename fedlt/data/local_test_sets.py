"""Per-client local test sets for personalised-model (PM) evaluation (docs/reference.md 1.5).

Pure protocol functions (T-A ``proportional_local_test``, T-B ``same_share_local_test``, T-D
``balanced_local_test``, T-E ``independent_local_test``) and the ``LOCAL_TEST_PROTOCOLS`` registry that
``FederatedDataset`` looks the ``local_test`` option up in. A registered protocol takes a ``LocalTestContext``
(the train split's counts, the test labels, the seed and the train partition with what its draw used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedlt.data.partition import PARTITIONERS, Partitioner, PartitionResult
from fedlt.data.pooled_partition import dirichlet_no_cap_partition

__all__ = [
    "LOCAL_TEST_PROTOCOLS",
    "LocalTestContext",
    "balanced_local_test",
    "check_local_test",
    "independent_local_test",
    "local_test_quotas",
    "proportional_local_test",
    "same_share_local_test",
]

# Seed streams of the protocols, so that no protocol reuses the train partition's stream (seed alone).
_SAME_SHARE_STREAM, _BALANCED_STREAM, _INDEPENDENT_STREAM = 0xB, 0xD, 0xE


def local_test_quotas(client_class_counts: np.ndarray, test_size: int) -> np.ndarray:
    """Target local test counts ``m_{k,c} = floor(n_{k,c} / N * |Test|)`` (docs/reference.md 1.5, T-A).

    Integer arithmetic gives the exact floor, free of the float rounding of ``n / N * |Test|``.

    Args:
        client_class_counts: train counts n_{k,c}, shape (K, C).
        test_size: size of the global test set |Test|.

    Returns:
        int64 array (K, C).
    """
    counts = np.asarray(client_class_counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    return (counts * int(test_size)) // total


def proportional_local_test(
    client_class_counts: np.ndarray,
    test_labels: np.ndarray,
    seed: int,
    with_replacement: bool = False,
) -> tuple[list[np.ndarray], np.ndarray]:
    """T-A local test sets: drawn from the global test set in proportion to each client's train histogram.

    Each client independently draws ``min(m_{k,c}, available_c)`` class-c test indices without replacement
    (FedLoGe [paper+code]; different clients may share test images), or exactly ``m_{k,c}`` with replacement
    (duplicates kept) when ``with_replacement``. Client k uses ``np.random.default_rng([seed, k])`` so adding
    clients never changes the sets of earlier ones.

    Args:
        client_class_counts: train counts n_{k,c}, shape (K, C).
        test_labels: labels of the global test set, shape (|Test|,).
        seed: base seed.
        with_replacement: draw with replacement and keep duplicates instead of capping at availability.

    Returns:
        (per-client sorted int64 indices into the test set, shortfall (K, C) = m_{k,c} - drawn).
    """
    counts = np.asarray(client_class_counts, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_clients, num_classes = counts.shape
    quotas = local_test_quotas(counts, test_labels.shape[0])
    pools = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    shortfall = np.zeros_like(quotas)
    local: list[np.ndarray] = []
    for k in range(num_clients):
        rng = np.random.default_rng([seed, k])
        drawn: list[np.ndarray] = []
        for c in np.flatnonzero(quotas[k]):
            pool = pools[c]
            m = int(quotas[k, c])
            if with_replacement and pool.size:
                take = rng.choice(pool, size=m, replace=True)
            else:
                take = rng.choice(pool, size=min(m, pool.size), replace=False)
            shortfall[k, c] = m - take.size
            drawn.append(take)
        local.append(np.sort(np.concatenate(drawn)).astype(np.int64) if drawn else np.zeros(0, dtype=np.int64))
    return local, shortfall


def _stream_seed(seed: int, stream: int) -> int:
    """An int seed of an independent stream derived from ``(seed, stream)``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _empty(num_clients: int) -> list[np.ndarray]:
    return [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]


def same_share_local_test(proportions: np.ndarray, test_labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """T-B local test sets: class c's test indices cut across clients with the train split's proportions p_{k,c}.

    As FedPuReL's ``noniid-labeldir`` (NIID-Bench) code: the shuffled class-c test indices are cut at the
    cumulative proportions, exactly as the train indices were, so the local test sets are disjoint and client k's
    local test histogram is proportional to its shares p_{k,.} (the test set being balanced).

    Args:
        proportions: p_{k,c} of the train split, shape (C, K); rows of classes the train split lacked are NaN.
        test_labels: labels of the global test set (|Test|,).
        seed: base seed (the shuffles use a stream of their own).

    Returns:
        Per-client sorted int64 indices into the test set.

    Raises:
        ValueError: a test class has no recorded proportions.
    """
    proportions = np.asarray(proportions, dtype=np.float64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_clients = proportions.shape[1]
    rng = np.random.default_rng(_stream_seed(seed, _SAME_SHARE_STREAM))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(test_labels):
        if c >= proportions.shape[0] or not np.isfinite(proportions[c]).all():
            raise ValueError(f"same_share: test class {c} has no train proportions (the partition saw no sample "
                             "of it); use another local_test protocol")
        idx_c = rng.permutation(np.flatnonzero(test_labels == c))
        cuts = (np.cumsum(proportions[c]) * idx_c.shape[0]).astype(np.int64)[:-1]
        for k, chunk in enumerate(np.split(idx_c, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, dtype=np.int64) for p in parts]


def balanced_local_test(test_labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """T-D local test sets: every class's test images split as evenly as possible over all K clients (disjoint).

    FedPuReL's ImageNet-LT code. Per class, the shuffled indices go round-robin, starting where the previous class
    stopped, so per-class counts differ by at most one across clients and so do the local test sizes.

    Args:
        test_labels: labels of the global test set (|Test|,).
        num_clients: number of clients K.
        seed: base seed (the shuffles use a stream of their own).

    Returns:
        Per-client sorted int64 indices into the test set.
    """
    test_labels = np.asarray(test_labels, dtype=np.int64)
    rng = np.random.default_rng(_stream_seed(seed, _BALANCED_STREAM))
    owner = np.empty(test_labels.shape[0], dtype=np.int64)
    start = 0
    for c in np.unique(test_labels):
        idx_c = rng.permutation(np.flatnonzero(test_labels == c))
        owner[idx_c] = (start + np.arange(idx_c.shape[0])) % num_clients
        start = (start + idx_c.shape[0]) % num_clients
    return [np.flatnonzero(owner == k) for k in range(num_clients)]


def independent_local_test(test_labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """T-E local test sets: the test set split by a fresh P-F draw (FedPuReL's Places-LT code).

    The draw uses a seed stream of its own, so it is independent of the train partition drawn from ``seed``.

    Args:
        test_labels: labels of the global test set (|Test|,).
        num_clients: number of clients K.
        alpha: Dirichlet concentration of the P-F draw.
        seed: base seed.

    Returns:
        Per-client sorted int64 indices into the test set (disjoint, union = the test set).
    """
    return dirichlet_no_cap_partition(test_labels, num_clients, alpha, _stream_seed(seed, _INDEPENDENT_STREAM))


@dataclass(frozen=True)
class LocalTestContext:
    """What a registered local test protocol may use.

    Attributes:
        client_class_counts: train counts n_{k,c}, shape (K, C).
        test_labels: labels of the global test set (|Test|,).
        seed: the dataset seed.
        partition: the train partition's result (proportions p_{k,c}, pooled local test indices), or None when
            the clients come from elsewhere (multi-domain layouts).
        partitioner: the train partitioner, or None.
    """

    client_class_counts: np.ndarray
    test_labels: np.ndarray
    seed: int
    partition: PartitionResult | None = None
    partitioner: Partitioner | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients K."""
        return int(self.client_class_counts.shape[0])

    def no_shortfall(self) -> np.ndarray:
        """A zero (K, C) shortfall, for protocols that draw no quota."""
        return np.zeros_like(np.asarray(self.client_class_counts, dtype=np.int64))


LocalTestResult = tuple[list[np.ndarray], np.ndarray]
"""Per-client sorted int64 indices into the test set, and the (K, C) shortfall of quotas not met."""

INDEPENDENT_DEFAULT_ALPHA = 1.0
"""T-E concentration when the train partitioner has no ``alpha`` (FedPuReL's default)."""


def _proportional(ctx: LocalTestContext) -> LocalTestResult:
    return proportional_local_test(ctx.client_class_counts, ctx.test_labels, ctx.seed)


def _none(ctx: LocalTestContext) -> LocalTestResult:
    # Domain generalization: the test set is an unseen domain, so there is no per-client local test set.
    return _empty(ctx.num_clients), ctx.no_shortfall()


def _same_share(ctx: LocalTestContext) -> LocalTestResult:
    proportions = None if ctx.partition is None else ctx.partition.proportions
    if proportions is None:
        raise ValueError(_same_share_needs())
    return same_share_local_test(proportions, ctx.test_labels, ctx.seed), ctx.no_shortfall()


def _balanced(ctx: LocalTestContext) -> LocalTestResult:
    return balanced_local_test(ctx.test_labels, ctx.num_clients, ctx.seed), ctx.no_shortfall()


def _independent(ctx: LocalTestContext) -> LocalTestResult:
    alpha = getattr(ctx.partitioner, "alpha", None)
    alpha = INDEPENDENT_DEFAULT_ALPHA if alpha is None else float(alpha)
    return independent_local_test(ctx.test_labels, ctx.num_clients, alpha, ctx.seed), ctx.no_shortfall()


def _pooled(ctx: LocalTestContext) -> LocalTestResult:
    local = None if ctx.partition is None else ctx.partition.test_indices
    if local is None:
        raise ValueError(_pooled_needs())
    return [np.asarray(p, dtype=np.int64) for p in local], ctx.no_shortfall()


LOCAL_TEST_PROTOCOLS: dict[str, Callable[[LocalTestContext], LocalTestResult]] = {
    "proportional": _proportional,
    "none": _none,
    "same_share": _same_share,
    "balanced": _balanced,
    "independent": _independent,
    "pooled": _pooled,
}
"""Local test protocols of docs/reference.md 1.5 by config name: ``proportional`` (T-A, the library default), ``none``
(the default for multi-domain data: no personalised model is evaluated), ``same_share`` (T-B), ``balanced``
(T-D), ``independent`` (T-E, a fresh P-F draw with the train partitioner's alpha, else 1.0) and ``pooled`` (T-C,
only with ``HierarchicalPooled``, whose default it is)."""


def _recording_partitioners() -> str:
    return ", ".join(n for n, cls in PARTITIONERS.items() if cls.records_proportions)


def _same_share_needs() -> str:
    return (f"local_test 'same_share' (T-B) cuts the test set with the train split's Dirichlet proportions, which "
            f"only these partitioners record: {_recording_partitioners()}")


def _pooled_needs() -> str:
    pooling = ", ".join(n for n, cls in PARTITIONERS.items() if cls.pools_test_set)
    return f"local_test 'pooled' (T-C) takes the local test sets from a pooled partition: use partition {pooling}"


def check_local_test(protocol: str, partitioner: Partitioner | None) -> None:
    """Raises a clear ValueError when ``protocol`` cannot work with ``partitioner`` (None: no partitioner).

    Args:
        protocol: a ``LOCAL_TEST_PROTOCOLS`` name.
        partitioner: the train partitioner, or None when the clients do not come from one (multi-domain data).

    Raises:
        ValueError: unknown protocol, ``same_share`` without recorded proportions, ``pooled`` without a pooling
            partitioner, or a pooling partitioner with another protocol.
    """
    if protocol not in LOCAL_TEST_PROTOCOLS:
        valid = ", ".join(LOCAL_TEST_PROTOCOLS)
        raise ValueError(f"unknown local_test protocol {protocol!r}; valid protocols: {valid}")
    pools = partitioner is not None and partitioner.pools_test_set
    if partitioner is not None and pools and protocol != "pooled":
        raise ValueError(f"partition {partitioner.name} draws every client's local test set from the pooled train + "
                         f"test set, so local_test must be 'pooled' (its default), not {protocol!r}")
    if protocol == "pooled" and not pools:
        raise ValueError(_pooled_needs())
    if protocol == "same_share" and (partitioner is None or not partitioner.records_proportions):
        raise ValueError(_same_share_needs())
