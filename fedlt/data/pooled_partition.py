"""FedPuReL's partitions (docs/reference.md 1.3 P-E / P-F): the hierarchical split of the pooled train + test set
(``HierarchicalPooled``) and the per-class Dirichlet split without capacity cap (``DirichletNoCap``).

The base pieces (``Partitioner``, ``PartitionResult``, ``PartitionError``, the registry and the shared Dirichlet
draw) live in ``fedlt.data.partition``; both classes register there under ``hierarchical_pooled`` and
``dirichlet_no_cap``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlt.data.partition import (
    PARTITIONERS,
    Partitioner,
    PartitionError,
    PartitionResult,
    dirichlet_try,
    group_by_owner,
    validate_labels,
)

__all__ = [
    "DirichletNoCap",
    "HierarchicalPooled",
    "dirichlet_no_cap_partition",
    "dirichlet_no_cap_split",
    "hierarchical_pooled_partition",
]


def dirichlet_no_cap_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """P-F per-class proportional split without capacity cap or min-size retry (FedPuReL ImageNet-LT / Places-LT).

    For each class c (in label order): shuffle its indices, draw p ~ Dir(alpha 1_K) and cut the shuffled indices
    at the cumulative proportions. One draw, so a client can end up empty for a small alpha.

    Args:
        labels: training labels, shape (N,).
        num_clients: number of clients K.
        alpha: Dirichlet concentration (small = more skew).
        seed: seed of the ``np.random.default_rng`` stream.

    Returns:
        Per-client sorted int64 index arrays.
    """
    return dirichlet_no_cap_split(labels, num_clients, alpha, seed).indices


def dirichlet_no_cap_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> PartitionResult:
    """``dirichlet_no_cap_partition`` plus the proportions p_{k,c} it used, (C, K).

    Takes the arguments of :func:`dirichlet_no_cap_partition`.

    Returns:
        The per-client indices and ``proportions`` (C, K).
    """
    labels = validate_labels(labels, num_clients, alpha)
    owner, _, proportions, _ = dirichlet_try(labels, num_clients, alpha, np.random.default_rng(seed), cap=False)
    return PartitionResult(group_by_owner(owner, num_clients), proportions=proportions)


def _alive_class_probs(
    coarse_w: np.ndarray, fine_w: np.ndarray, coarse_of: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """P(class c) of one hierarchical draw among the classes with items left (P-E): superclass ~ w renormalised
    over the superclasses with a class left, then fine class ~ fine weights renormalised inside the superclass."""
    num_coarse = coarse_w.shape[0]
    coarse_alive = np.bincount(coarse_of, weights=alive, minlength=num_coarse) > 0
    w = np.where(coarse_alive, coarse_w, 0.0)
    if not w.sum() > 0:  # every live superclass weight underflowed (tiny beta): uniform over the live ones
        w = coarse_alive.astype(np.float64)
    f = np.where(alive, fine_w, 0.0)
    f_sum = np.bincount(coarse_of, weights=f, minlength=num_coarse)
    dead_mass = alive & ~(f_sum[coarse_of] > 0)  # live classes whose superclass' live fine weights underflowed
    if dead_mass.any():
        f = np.where(dead_mass, 1.0, f)
        f_sum = np.bincount(coarse_of, weights=f, minlength=num_coarse)
    q = w[coarse_of] / w.sum() * f / np.where(f_sum[coarse_of] > 0, f_sum[coarse_of], 1.0)
    return q / q.sum()


def _hierarchical_draws(
    coarse_w: np.ndarray, fine_w: np.ndarray, coarse_of: np.ndarray, left: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Classes of ``n`` sequential draws without replacement (P-E), updating ``left`` (items per class) in place.

    Between two exhaustion events the draws are i.i.d. from fixed class probabilities, so a batch of draws is
    taken at once and cut just after the first draw that takes a class's last item; the probabilities are then
    renormalised and the rest drawn again. Same distribution as drawing one by one, at most C + 1 batches.
    """
    out: list[np.ndarray] = []
    while n > 0:
        q = _alive_class_probs(coarse_w, fine_w, coarse_of, left > 0)
        d = rng.choice(q.shape[0], size=n, p=q)
        order = np.argsort(d, kind="stable")
        sorted_d = d[order]
        rank = np.empty(n, dtype=np.int64)  # how many earlier draws in this batch hit the same class
        rank[order] = np.arange(n) - np.searchsorted(sorted_d, sorted_d, side="left")
        last = np.flatnonzero(rank == left[d] - 1)
        stop = int(last[0]) + 1 if last.size else n
        out.append(d[:stop])
        left -= np.bincount(d[:stop], minlength=left.shape[0])
        n -= stop
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def hierarchical_pooled_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    superclasses: np.ndarray | list[int],
    beta: float,
    fine_concentration: float,
    seed: int,
) -> PartitionResult:
    """P-E hierarchical split of the pool LT-train + test set (FedPuReL CIFAR-100 ``noniid-labeldir100_LT``).

    Pool items are numbered train first (``0 .. N_train - 1``), then test. For each client k in turn: coarse
    weights w ~ Dir(beta 1_S) over the S superclasses and, per superclass, fine weights ~ Dir(fine_concentration
    1) over its classes; the client draws floor(|pool| / K) items without replacement, each by superclass ~ w,
    fine class ~ fine weights, then a uniformly random remaining item of that class. Classes with no item left
    (and superclasses with no class left) drop out and the weights are renormalised. The |pool| mod K items left
    at the end belong to no client. Items from the train part form a client's train set, the rest its local test
    set (docs/reference.md 1.5 T-C).

    Args:
        train_labels: labels of the (long-tailed) training set, shape (N_train,).
        test_labels: labels of the test set, shape (N_test,).
        num_clients: number of clients K.
        superclasses: coarse id of every fine class, length C (any integer ids; S = number of distinct ids).
        beta: concentration of the coarse (superclass) Dirichlet.
        fine_concentration: concentration of the fine-within-coarse Dirichlet (FedPuReL: 10).
        seed: seed of the ``np.random.default_rng`` stream (pool shuffles, then the clients' weights and draws).

    Returns:
        ``indices`` (into the train labels), ``test_indices`` (into the test labels) and ``unassigned``.

    Raises:
        PartitionError: invalid arguments, or labels without a superclass.
    """
    train_labels = np.asarray(train_labels).astype(np.int64, copy=False)
    test_labels = np.asarray(test_labels).astype(np.int64, copy=False)
    pool = validate_labels(np.concatenate([train_labels, test_labels]), num_clients, beta)
    if not fine_concentration > 0:
        raise PartitionError(f"fine_concentration must be > 0, got {fine_concentration}")
    superclasses = np.asarray(superclasses, dtype=np.int64)
    num_classes = superclasses.shape[0]
    if superclasses.ndim != 1 or (pool.size and (pool.min() < 0 or pool.max() >= num_classes)):
        raise PartitionError(f"superclasses must give the coarse id of each of the classes 0 .. {int(pool.max())}, "
                             f"got shape {superclasses.shape}")
    _, coarse_of = np.unique(superclasses, return_inverse=True)
    coarse_of = coarse_of.reshape(-1)
    members = [np.flatnonzero(coarse_of == s) for s in range(int(coarse_of.max()) + 1)]
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(pool == c)) for c in range(num_classes)]
    left = np.array([p.shape[0] for p in pools], dtype=np.int64)
    owner = np.full(pool.shape[0], -1, dtype=np.int64)
    budget = pool.shape[0] // num_clients
    for k in range(num_clients):
        coarse_w = np.nan_to_num(rng.dirichlet(np.full(len(members), beta)), nan=0.0)
        fine_w = np.empty(num_classes)
        for m in members:
            fine_w[m] = rng.dirichlet(np.full(m.shape[0], fine_concentration))
        taken = left.copy()
        drawn = np.bincount(_hierarchical_draws(coarse_w, fine_w, coarse_of, left, budget, rng), minlength=num_classes)
        for c in np.flatnonzero(drawn):
            start = pools[c].shape[0] - taken[c]  # the shuffled pool is consumed from the front
            owner[pools[c][start : start + drawn[c]]] = k
    n_train = train_labels.shape[0]
    return PartitionResult(
        indices=group_by_owner(owner[:n_train], num_clients),
        test_indices=group_by_owner(owner[n_train:], num_clients),
        unassigned=int((owner < 0).sum()),
    )


@PARTITIONERS.register("dirichlet_no_cap")
class DirichletNoCap(Partitioner):
    """P-F per-class Dirichlet proportions without capacity cap or min-size retry (FedPuReL ImageNet-LT/Places-LT).

    Records the proportions p_{k,c} it used (``split(...).proportions``), for ``same_share`` (T-B).

    Args:
        alpha: Dirichlet concentration alpha; smaller means more label skew per client (FedPuReL: 1.0).
    """

    name = "dirichlet_no_cap"
    records_proportions = True

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def _partition(self, labels: np.ndarray, num_clients: int, seed: int) -> PartitionResult:
        return dirichlet_no_cap_split(labels, num_clients, self.alpha, seed)

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return self._partition(labels, num_clients, seed).indices

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


@PARTITIONERS.register("hierarchical_pooled")
class HierarchicalPooled(Partitioner):
    """P-E hierarchical superclass/class Dirichlet over the pool LT-train + test set (FedPuReL CIFAR-100 default).

    Each client draws floor(|pool| / K) pool items (see ``hierarchical_pooled_partition``); the train items form
    its train set and the test items its local test set (``local_test: pooled``, T-C). ``FederatedDataset`` calls
    ``split_pooled``; the plain call, which sees no test set, raises.

    Args:
        beta: concentration beta of the coarse (superclass) Dirichlet; FedPuReL's CIFAR-100 "alpha" sweep
            (0.1 / 0.5 / 1 / 5) is this value.
        fine_concentration: concentration of the fine-class Dirichlet inside each superclass (FedPuReL: 10).
        superclasses: coarse id of each fine class, for sources that do not provide ``superclasses`` (e.g.
            ``[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]`` for the embedded digits); None uses the source's.
    """

    name = "hierarchical_pooled"
    pools_test_set = True

    def __init__(
        self, beta: float = 1.0, fine_concentration: float = 10.0, superclasses: list[int] | None = None
    ) -> None:
        self.beta = beta
        self.fine_concentration = fine_concentration
        self.superclasses = None if superclasses is None else [int(s) for s in superclasses]

    def resolve_superclasses(self, source_superclasses: np.ndarray | None, num_classes: int) -> np.ndarray:
        """The superclass of every class: the source's, else this partitioner's ``superclasses`` argument.

        Args:
            source_superclasses: the source's ``superclasses`` (C,), or None.
            num_classes: number of classes C.

        Returns:
            int64 array (C,).

        Raises:
            PartitionError: neither is given, they disagree, or the length is not C.
        """
        given = None if self.superclasses is None else np.asarray(self.superclasses, dtype=np.int64)
        source = None if source_superclasses is None else np.asarray(source_superclasses, dtype=np.int64)
        if given is not None and source is not None and not np.array_equal(given, source):
            raise PartitionError("hierarchical_pooled: the superclasses argument differs from the source's own "
                                 "class hierarchy; drop the argument to use the source's")
        out = source if source is not None else given
        if out is None:
            raise PartitionError(
                "hierarchical_pooled (P-E) needs the superclass of every class: this source has no class hierarchy, "
                f"so pass partition.init_args.superclasses, a list of {num_classes} coarse ids (one per class)"
            )
        if out.shape != (num_classes,):
            raise PartitionError(f"hierarchical_pooled: superclasses must list {num_classes} coarse ids (one per "
                                 f"class), got {out.shape[0] if out.ndim == 1 else out.shape}")
        return out

    def _partition_pooled(self, train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, seed: int,
                          num_classes: int, source_superclasses: np.ndarray | None) -> PartitionResult:
        # ``source_superclasses`` or the ``superclasses`` argument (``resolve_superclasses``); the result also counts
        # the ``unassigned`` pool items (< K).
        superclasses = self.resolve_superclasses(source_superclasses, num_classes)
        return hierarchical_pooled_partition(train_labels, test_labels, num_clients, superclasses, self.beta,
                                             self.fine_concentration, seed)

    def _partition(self, labels: np.ndarray, num_clients: int, seed: int) -> PartitionResult:
        raise PartitionError("hierarchical_pooled (P-E) splits the training and test sets together: use "
                             "split_pooled(train_labels, test_labels, ...) (FederatedDataset does)")

    def _split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        return self._partition(labels, num_clients, seed).indices

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "fine_concentration": self.fine_concentration, "superclasses": self.superclasses}
