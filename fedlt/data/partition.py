"""Non-IID partitions of a labelled training set over clients (docs/reference.md 1.3).

Every partitioner is a pure, seeded function ``(labels, num_clients, ..., seed) -> list[np.ndarray]`` returning
per-client sorted int64 index arrays that are pairwise disjoint and whose union is ``range(len(labels))``.
The config-facing classes (``Dirichlet``, ``DirichletPerSample``, ``IID``, ``Shards``) wrap
them so jsonargparse can build them from YAML; their constructor arguments are the schema. ``Partitioner.split``
also returns what a draw used (the Dirichlet proportions p_{k,c}), which the T-B local test protocol reuses.
FedPuReL's P-E (``HierarchicalPooled``, which splits the pooled train + test sets) and P-F (``DirichletNoCap``)
live in ``fedlt.data.pooled_partition``, the equal-size P-C (``GroupedDirichlet``, CReFF / CLIP2FL / FedSM) and P-D
(``DirichletPrior``, RedGrape) in ``fedlt.data.equal_partition``; all register in the same ``PARTITIONERS``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedlt.registry import Registry

__all__ = [
    "IID",
    "PARTITIONERS",
    "Dirichlet",
    "DirichletPerSample",
    "PartitionError",
    "PartitionResult",
    "Partitioner",
    "Shards",
    "class_indices",
    "dirichlet_partition",
    "dirichlet_per_sample_partition",
    "dirichlet_split",
    "group_by_owner",
    "iid_partition",
    "shards_partition",
]


class PartitionError(ValueError):
    """An impossible partition request (too many clients for the data, a bad alpha, ...)."""


@dataclass
class PartitionResult:
    """A partition plus what its draw used, for local test protocols that follow the train split (docs/reference.md
    1.5).

    Attributes:
        indices: per-client sorted int64 index arrays into the training labels.
        proportions: Dirichlet proportions p_{k,c} that cut class c, shape (C, K) with C = max label + 1 (NaN rows
            for classes absent from the labels); None when the partitioner does not cut classes by proportions.
        test_indices: per-client sorted int64 indices into the test set, for partitioners that pool the train and
            test sets (P-E); None otherwise.
        unassigned: number of pooled items no client received (P-E draws floor(|pool| / K) per client).
    """

    indices: list[np.ndarray]
    proportions: np.ndarray | None = None
    test_indices: list[np.ndarray] | None = None
    unassigned: int = 0


def validate_labels(labels: np.ndarray, num_clients: int, alpha: float | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > labels.shape[0]:
        raise PartitionError(
            f"cannot split {labels.shape[0]:,} samples over {num_clients} clients (more clients than samples); "
            "lower num_clients or use a larger / less imbalanced training set"
        )
    if alpha is not None and not alpha > 0:
        raise PartitionError(f"Dirichlet concentration alpha must be > 0, got {alpha}")
    return labels.astype(np.int64, copy=False)


def sorted_parts(parts: list[np.ndarray] | list[list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def class_indices(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(c, ascending indices of class c)`` for every class present, in class order (one stable sort; the same
    arrays as ``np.flatnonzero(labels == c)`` per class, without a pass over the labels per class)."""
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return [(int(c), order[s:s + n]) for c, s, n in zip(classes, starts, counts)]


def group_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Per-client sorted int64 index arrays from ``owner`` (sample -> client; negative = nobody): one stable sort,
    not a pass over the samples per client."""
    owner = np.asarray(owner, dtype=np.int64)
    kept = np.flatnonzero(owner >= 0)
    order = kept[np.argsort(owner[kept], kind="stable")]
    counts = np.bincount(owner[kept], minlength=num_clients)
    return np.split(order, np.cumsum(counts)[:-1])


def dirichlet_try(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, cap: bool = True,
    classes: list[tuple[int, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # One NIID-Bench P-B draw (docs/reference.md 1.3): per class p ~ Dir(alpha 1_K), clients already holding >= N/K get
    # no more (capacity rule; P-F skips it), renormalise, cut the shuffled class indices at the cumulative
    # proportions. Returns the owner of every sample (N,), the client sizes (K,) and the proportions actually used,
    # (C, K) with C = max label + 1 (NaN rows for absent classes), so a local test protocol can cut the test set the
    # same way (T-B), and the visit order (the shuffled class indices, class after class), whose stable grouping by
    # owner gives each client's samples in the order the loop over classes dealt them. Vectorized over clients: per
    # class one Dirichlet draw and one np.repeat, no loop over K.
    capacity = labels.shape[0] / num_clients
    owner = np.empty(labels.shape[0], dtype=np.int64)
    sizes = np.zeros(num_clients, dtype=np.int64)
    proportions = np.full((int(labels.max()) + 1 if labels.size else 0, num_clients), np.nan)
    clients = np.arange(num_clients)
    visits = []
    for c, members in classes if classes is not None else class_indices(labels):
        idx_c = rng.permutation(members)
        visits.append(idx_c)
        p = rng.dirichlet(np.full(num_clients, alpha))
        if cap:
            p = np.where(sizes < capacity, p, 0.0)
        # All clients full can only happen once every sample is placed; guard against 0/0 anyway.
        p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        proportions[c] = p
        n_c = idx_c.shape[0]
        cuts = np.clip((np.cumsum(p) * n_c).astype(np.int64)[:-1], 0, n_c)
        counts = np.diff(np.concatenate(([0], np.maximum.accumulate(cuts), [n_c])))
        owner[idx_c] = np.repeat(clients, counts)
        sizes += counts
    seq = np.concatenate(visits) if visits else np.zeros(0, dtype=np.int64)
    return owner, sizes, proportions, seq


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
    max_seconds: float | None = 60.0,
) -> list[np.ndarray]:
    """P-B NIID-Bench Dirichlet split with capacity cap and min-size retry (docs/reference.md 1.3).

    Args:
        labels: training labels, shape (N,).
        num_clients: number of clients K.
        alpha: Dirichlet concentration (small = more skew).
        seed: seed of the single ``np.random.default_rng`` stream used by all tries.
        min_size: every client must end with at least this many samples (NIID-Bench m_min).
        max_tries: whole-procedure retries before giving up.
        max_seconds: wall-clock budget of the retries (checked after each try); ``None``: tries only. A budget that
            runs out only turns a slow failure into an earlier one: a partition that is returned depends on the
            seed alone.

    Returns:
        Per-client sorted int64 index arrays.

    Raises:
        PartitionError: invalid arguments, an infeasible request (``num_clients * min_size >= N``), or no draw met
            ``min_size`` within ``max_tries`` / ``max_seconds``.
    """
    return dirichlet_split(labels, num_clients, alpha, seed, min_size, max_tries, max_seconds).indices


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
    max_seconds: float | None = 60.0,
) -> PartitionResult:
    """``dirichlet_partition`` plus the proportions p_{k,c} of the successful try (after cap and renormalisation).

    Takes the arguments and raises the errors of :func:`dirichlet_partition`.

    Returns:
        The per-client indices and ``proportions`` (C, K).
    """
    labels = validate_labels(labels, num_clients, alpha)
    n = labels.shape[0]
    hint = "lower num_clients or min_size, or raise alpha"
    if num_clients * min_size > n:
        raise PartitionError(
            f"cannot give {num_clients} clients >= {min_size} samples from {n:,} samples "
            f"({num_clients * min_size:,} needed); {hint}"
        )
    if num_clients > 1 and min_size > 0 and num_clients * min_size >= n:
        # Equality would need every client to end with exactly min_size samples: no Dirichlet draw gives that.
        raise PartitionError(
            f"cannot give {num_clients} clients >= {min_size} samples each from {n:,} samples: that needs "
            f"num_clients x min_size < {n:,} (here {num_clients * min_size:,}; min_size <= "
            f"{max((n - 1) // num_clients, 0)} or num_clients <= {(n - 1) // min_size} would do); {hint}"
        )
    rng = np.random.default_rng(seed)
    classes = class_indices(labels)
    start = time.monotonic()
    best, below, tries = -1, num_clients, 0
    while tries < max(1, max_tries):
        tries += 1
        owner, sizes, proportions, _ = dirichlet_try(labels, num_clients, alpha, rng, classes=classes)
        smallest = int(sizes.min())
        if smallest >= min_size:
            return PartitionResult(group_by_owner(owner, num_clients), proportions=proportions)
        if smallest > best or (smallest == best and int((sizes < min_size).sum()) < below):
            best, below = smallest, int((sizes < min_size).sum())
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    raise PartitionError(
        f"cannot give {num_clients} clients >= {min_size} samples from {n:,} samples (alpha={alpha}): {tries} "
        f"tries in {time.monotonic() - start:.1f} s (max_tries {max_tries}, max_seconds {max_seconds}); the best "
        f"try's smallest client had {best} samples, {below} clients below min_size; {hint}"
    )


def dirichlet_per_sample_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """P-A per-sample categorical split (FedLoGe [code], docs/reference.md 1.3).

    For each class c, p_c ~ Dir(alpha 1_K) and every class-c sample goes to client k with probability p_{c,k}.
    No min-size rule and no capacity cap, so a client can be empty in pathological draws.

    Args:
        labels: training labels, shape (N,).
        num_clients: number of clients K.
        alpha: Dirichlet concentration.
        seed: seed of the ``np.random.default_rng`` stream.

    Returns:
        Per-client sorted int64 index arrays.
    """
    labels = validate_labels(labels, num_clients, alpha)
    rng = np.random.default_rng(seed)
    owner = np.empty(labels.shape[0], dtype=np.int64)
    for _, idx_c in class_indices(labels):
        p = rng.dirichlet(np.full(num_clients, alpha))
        owner[idx_c] = rng.choice(num_clients, size=idx_c.shape[0], p=p / p.sum())
    return group_by_owner(owner, num_clients)


def iid_partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """IID split: shuffle all indices and cut them into near-equal parts.

    Args:
        labels: training labels, shape (N,).
        num_clients: number of clients K.
        seed: seed of the shuffle.

    Returns:
        Per-client sorted int64 index arrays (sizes differ by at most one).
    """
    labels = validate_labels(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    return sorted_parts(np.array_split(perm, num_clients))


def shards_partition(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """Label-sorted shards (McMahan et al. 2017 pathological non-IID).

    Indices are shuffled within each class (seeded), stably sorted by label, cut into
    ``num_clients * shards_per_client`` near-equal shards, and the shards are dealt to clients at random.

    Args:
        labels: training labels, shape (N,).
        num_clients: number of clients K.
        seed: seed of the shuffles.
        shards_per_client: shards each client receives.

    Returns:
        Per-client sorted int64 index arrays.

    Raises:
        PartitionError: fewer samples than shards.
    """
    labels = validate_labels(labels, num_clients)
    num_shards = num_clients * shards_per_client
    if shards_per_client < 1 or num_shards > labels.shape[0]:
        raise PartitionError(
            f"cannot cut {labels.shape[0]:,} samples into {num_clients} x {shards_per_client} = {num_shards:,} "
            "non-empty shards; lower num_clients or shards_per_client"
        )
    rng = np.random.default_rng(seed)
    # A random permutation followed by a stable sort by label = shuffled within each class, classes in order.
    perm = rng.permutation(labels.shape[0])
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    shard_ids = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return sorted_parts([np.concatenate([shards[s] for s in row]) for row in shard_ids])


PARTITIONERS: Registry[type[Partitioner]] = Registry("partitioner")


class Partitioner:
    """Base of the config-facing partitioners: a named, seeded split of training labels over clients.

    Subclasses override ``_split`` (indices only) or ``_partition`` (a ``PartitionResult`` carrying what the draw
    used). ``records_proportions`` marks partitioners whose result holds the per-class proportions p_{k,c} (needed
    by the T-B ``same_share`` local test protocol); ``pools_test_set`` marks partitioners that split the train and
    test sets together (P-E) through ``split_pooled`` instead (they override ``_partition_pooled``).
    """

    name: str = "partitioner"
    records_proportions: ClassVar[bool] = False
    pools_test_set: ClassVar[bool] = False

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Splits ``labels`` over ``num_clients`` clients.

        Args:
            labels: training labels, shape (N,).
            num_clients: number of clients K.
            seed: seed of the split.

        Returns:
            Per-client sorted int64 index arrays, pairwise disjoint, union = all indices.
        """
        return self.split(labels, num_clients, seed).indices

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> PartitionResult:
        """Like ``__call__``, but returns the ``PartitionResult`` (with the proportions where recorded).

        Args:
            labels: training labels, shape (N,).
            num_clients: number of clients K.
            seed: seed of the split.

        Returns:
            The partition; ``proportions`` is set when ``records_proportions``.
        """
        return self._partition(np.asarray(labels), num_clients, seed)

    def split_pooled(
        self,
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        num_clients: int,
        seed: int,
        num_classes: int,
        source_superclasses: np.ndarray | None = None,
    ) -> PartitionResult:
        """Splits the pool train + test over clients; only partitioners with ``pools_test_set`` implement it.

        Args:
            train_labels: (long-tailed) training labels (N_train,).
            test_labels: test labels (N_test,).
            num_clients: number of clients K.
            seed: seed of the split.
            num_classes: number of classes C.
            source_superclasses: the source's superclass of each class (C,), or None.

        Returns:
            Train ``indices`` and local ``test_indices`` (and the number of ``unassigned`` pool items).

        Raises:
            PartitionError: this partitioner splits the training set only.
        """
        return self._partition_pooled(train_labels, test_labels, num_clients, seed, num_classes, source_superclasses)

    def _partition(self, labels: np.ndarray, num_clients: int, seed: int) -> PartitionResult:
        return PartitionResult(self._split(labels, num_clients, seed))

    def _partition_pooled(self, train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, seed: int,
                          num_classes: int, source_superclasses: np.ndarray | None) -> PartitionResult:
        # Partitioners with ``pools_test_set`` override this (``split_pooled`` documents the arguments).
        raise PartitionError(f"partition {self.name} splits the training set only; it cannot pool the test set")

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        # Subclasses override; the base is the trivial IID split so it is a usable object on its own.
        return iid_partition(labels, num_clients, seed)

    def _params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for the run summary."""
        return {"name": self.name, **self._params()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"


@PARTITIONERS.register("dirichlet")
class Dirichlet(Partitioner):
    """P-B NIID-Bench Dirichlet label skew with capacity cap and min-size retry (library default).

    Records the proportions p_{k,c} of the successful draw (``split(...).proportions``), for ``same_share`` (T-B).

    Args:
        alpha: Dirichlet concentration alpha; smaller means more label skew per client.
        min_size: minimum samples per client (NIID-Bench m_min); the draw is repeated until it holds.
        max_tries: draws attempted before reporting an impossible partition.
        max_seconds: wall-clock budget of those draws (``None``: no limit); it never changes a partition that is
            found, only how soon a hopeless request fails.
    """

    name = "dirichlet"
    records_proportions = True

    def __init__(self, alpha: float = 0.5, min_size: int = 10, max_tries: int = 100,
                 max_seconds: float | None = 60.0) -> None:
        self.alpha = alpha
        self.min_size = min_size
        self.max_tries = max_tries
        self.max_seconds = max_seconds

    def _partition(self, labels: np.ndarray, num_clients: int, seed: int) -> PartitionResult:
        return dirichlet_split(labels, num_clients, self.alpha, seed, self.min_size, self.max_tries, self.max_seconds)

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return self._partition(labels, num_clients, seed).indices

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "min_size": self.min_size, "max_tries": self.max_tries}


@PARTITIONERS.register("dirichlet_per_sample")
class DirichletPerSample(Partitioner):
    """P-A per-sample categorical Dirichlet split (FedLoGe's code); no min-size rule.

    Args:
        alpha: Dirichlet concentration alpha; smaller means more label skew per client.
    """

    name = "dirichlet_per_sample"

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return dirichlet_per_sample_partition(labels, num_clients, self.alpha, seed)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


@PARTITIONERS.register("iid")
class IID(Partitioner):
    """IID split into near-equal random parts."""

    name = "iid"

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return iid_partition(labels, num_clients, seed)


@PARTITIONERS.register("shards")
class Shards(Partitioner):
    """Label-sorted shards dealt to clients (pathological non-IID of McMahan et al. 2017).

    Args:
        shards_per_client: shards per client; with label-pure shards a client sees at most this many labels.
    """

    name = "shards"

    def __init__(self, shards_per_client: int = 2) -> None:
        self.shards_per_client = shards_per_client

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return shards_partition(labels, num_clients, seed, self.shards_per_client)

    def _params(self) -> dict[str, Any]:
        return {"shards_per_client": self.shards_per_client}
