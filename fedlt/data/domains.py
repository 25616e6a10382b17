"""Multi-domain data and the leave-one-domain-out protocol of federated domain generalization (docs/reference.md 1.8).

A :class:`DomainSource` loads every image of every domain at once as a :class:`DomainData` (flat uint8 tensors
with a label, a domain id and an official-split id per image). :func:`leave_one_domain_out` turns it into the
federated split: every image of the target domain becomes the test set, the source domains are spread over
clients in one of three layouts, and part of each source domain is held out for in-domain validation.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from torch import Tensor

from fedlt.data.sources import DataSource

__all__ = [
    "DOMAIN_LAYOUTS",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "SPLIT_VAL",
    "DomainData",
    "DomainSource",
    "DomainSplit",
    "leave_one_domain_out",
]

SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2
"""Values of ``DomainData.split``: the official split an image belongs to (``SPLIT_TRAIN`` when none exists)."""

DOMAIN_LAYOUTS = ("per_domain", "clients_per_domain", "centralized")
"""Client layouts: (i) one client per source domain, (ii) FedCCRL-style Dirichlet spread, and one client holding
every source domain (the paper's centralised comparison)."""


@dataclass
class DomainData:
    """Every image of a multi-domain dataset as flat tensors.

    Attributes:
        domains: domain names; ``domain`` indexes this list.
        x: uint8 images (N, 3, S, S).
        y: int64 class labels (N,).
        domain: int64 domain ids (N,).
        split: int64 official-split ids (N,): ``SPLIT_TRAIN``, ``SPLIT_VAL`` or ``SPLIT_TEST``.
        num_classes: C.
        class_names: C class names.
        mean: per-channel mean of x / 255 used for normalisation.
        std: per-channel std of x / 255.
        files: optional relative file path per image (used by the no-leak tests and for debugging).
    """

    domains: list[str]
    x: Tensor
    y: Tensor
    domain: Tensor
    split: Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: list[str] = field(default_factory=list)


class DomainSource(DataSource):
    """A data source whose images come from named domains (PACS, Digits-DG, mini-DomainNet, Office-Home, ...).

    Subclasses set ``domains`` (the canonical domain names, in the order of the ids) and implement ``load``.
    """

    domains: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def load(self) -> DomainData:
        """Loads (or builds) every image of every domain."""


@dataclass
class DomainSplit:
    """The federated split of one leave-one-domain-out task (indices into ``DomainData``'s flat arrays).

    Attributes:
        target: the held-out domain id.
        sources: the source domain ids.
        train: training image indices per client.
        val: source-domain validation image indices (never seen in training).
        test: every image of the target domain.
        client_val: validation indices per client: the validation images of the domains the client trains on.
    """

    target: int
    sources: list[int]
    train: list[np.ndarray]
    val: np.ndarray
    test: np.ndarray
    client_val: list[np.ndarray]


def _hold_out(idx: np.ndarray, split: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[
        np.ndarray, np.ndarray]:
    """(train, val) of one source domain: the official split when the domain has one, else a seeded fraction."""
    official_val = idx[split[idx] != SPLIT_TRAIN]
    if official_val.size:
        return idx[split[idx] == SPLIT_TRAIN], official_val
    n_val = int(round(fraction * idx.size))
    perm = rng.permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _spread(pools: list[np.ndarray], clients_per_domain: int, alpha: float,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Layout (ii): each source domain's pool spread over all K clients with Dir(alpha 1_K) proportions, or split
    evenly over its own ``clients_per_domain`` clients when ``alpha <= 0``."""
    if clients_per_domain < 1:
        raise ValueError(f"clients_per_domain must be >= 1, got {clients_per_domain}")
    k = len(pools) * clients_per_domain
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for j, pool in enumerate(pools):
        perm = rng.permutation(pool)
        if alpha > 0:
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * perm.size).astype(np.int64)[:-1]
            chunks = list(enumerate(np.split(perm, cuts)))
        else:
            chunks = [(j * clients_per_domain + c, ch) for c, ch in enumerate(np.array_split(perm, clients_per_domain))]
        for c, chunk in chunks:
            parts[c].append(chunk)
    train = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    empty = [c for c, t in enumerate(train) if t.size == 0]
    if empty:
        raise ValueError(
            f"domain layout clients_per_domain left client(s) {empty} without images (domain_alpha={alpha}); "
            "raise domain_alpha or lower clients_per_domain"
        )
    return train


def leave_one_domain_out(
    labels: np.ndarray,
    domain: np.ndarray,
    split: np.ndarray,
    target: int,
    layout: str = "per_domain",
    clients_per_domain: int = 2,
    domain_alpha: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DomainSplit:
    """Splits a multi-domain dataset for one target domain (docs/reference.md 1.8).

    Every image of ``target`` (whatever its official split) is test data and nothing else. Each source domain's
    images are divided into train and validation: by the official split files when the dataset has them (val and
    test images of a source domain become validation), otherwise ``val_fraction`` of the domain at random.

    Layouts of the source training images:

    * ``per_domain`` (i): one client per source domain, K = M - 1.
    * ``clients_per_domain`` (ii, FedCCRL): K = (M - 1) * ``clients_per_domain``; each source domain's training
      images are spread over all K clients with proportions ~ Dir(``domain_alpha`` 1_K) drawn per domain, so
      clients can mix domains; ``domain_alpha <= 0`` keeps the domains pure (``clients_per_domain`` clients per
      domain, an even random split).
    * ``centralized``: one client holding every source domain.

    Args:
        labels: class labels (N,).
        domain: domain ids (N,).
        split: official-split ids (N,).
        target: the held-out domain id.
        layout: one of ``DOMAIN_LAYOUTS``.
        clients_per_domain: clients per source domain in layout (ii).
        domain_alpha: Dirichlet concentration of layout (ii).
        val_fraction: validation fraction of a source domain without official split files.
        seed: seed of the hold-out and of the Dirichlet spread.

    Returns:
        The split; every index array is sorted int64.

    Raises:
        ValueError: unknown layout, bad target, or a layout that leaves a client without images.
    """
    domain = np.asarray(domain, dtype=np.int64)
    split = np.asarray(split, dtype=np.int64)
    ids = np.unique(domain)
    if target not in ids:
        raise ValueError(f"target domain id {target} not among the domain ids {ids.tolist()}")
    if layout not in DOMAIN_LAYOUTS:
        raise ValueError(f"unknown domain_layout {layout!r}; valid layouts: {', '.join(DOMAIN_LAYOUTS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 1, target])
    sources = [int(d) for d in ids if d != target]
    pools, vals = [], []
    for d in sources:
        tr, va = _hold_out(np.flatnonzero(domain == d), split, val_fraction, rng)
        pools.append(tr)
        vals.append(va)
    if layout == "per_domain":
        train = pools
    elif layout == "centralized":
        train = [np.sort(np.concatenate(pools))]
    else:
        train = _spread(pools, clients_per_domain, domain_alpha, rng)
    val_of = dict(zip(sources, vals))
    client_val = [
        np.sort(np.concatenate([val_of[int(d)] for d in np.unique(domain[t])])) if t.size else np.zeros(0, np.int64)
        for t in train
    ]
    return DomainSplit(
        target=int(target),
        sources=sources,
        train=[t.astype(np.int64) for t in train],
        val=np.sort(np.concatenate(vals)).astype(np.int64) if vals else np.zeros(0, np.int64),
        test=np.flatnonzero(domain == target).astype(np.int64),
        client_val=[v.astype(np.int64) for v in client_val],
    )
