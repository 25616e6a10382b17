"""``FederatedDataset``: LT subsampling, partition, local test sets and class groups on device tensors.

Small datasets live on the device as uint8 tensors and are batched by index with tensor augmentation
(DESIGN.md 3), so there is no DataLoader per client. See methods.md 1.2 (LT profile), 1.3 (partitions),
1.5 (local test sets) and 1.6 (class groups).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlt.data.domains import DOMAIN_LAYOUTS, DomainData, leave_one_domain_out
from fedlt.data.local_test import proportional_local_test
from fedlt.data.longtail import GROUP_NAMES, class_groups, longtail_indices
from fedlt.data.partition import Dirichlet, Partitioner
from fedlt.data.sources import DataSource, SourceData
from fedlt.data.transforms import TensorAugment

__all__ = ["LOCAL_TEST_PROTOCOLS", "FederatedDataset", "TensorSplit"]



def _no_local_test(counts: np.ndarray, test_y: np.ndarray, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    # Domain generalization: the test set is an unseen domain, so there is no per-client local test set.
    return [np.zeros(0, dtype=np.int64) for _ in counts], np.zeros_like(counts)


LOCAL_TEST_PROTOCOLS: dict[str, Callable[..., tuple[list[np.ndarray], np.ndarray]]] = {
    "proportional": proportional_local_test,
    "none": _no_local_test,
}
"""Local test protocols of methods.md 1.5 by config name (T-A ``proportional`` is the library default; ``none``,
the default for multi-domain data, evaluates no personalised model)."""


@dataclass
class TensorSplit:
    """Images, labels and optional domain ids of one split, all on the same device."""

    x: Tensor
    y: Tensor
    domain: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> TensorSplit:
        """Returns a copy on ``device`` (tensors already there are not copied)."""
        domain = None if self.domain is None else self.domain.to(device)
        return TensorSplit(self.x.to(device), self.y.to(device), domain)


class FederatedDataset:
    """A long-tailed, partitioned federated dataset held as tensors on one device.

    Args:
        source: where the images come from (e.g. ``EmbeddedDigits``, ``CIFAR10``).
        num_clients: number of clients K.
        imbalance_factor: long-tail imbalance factor IF = n_max / n_min (>= 1; 1 keeps the classes balanced).
        lt_profile: long-tail profile, ``exp`` (Cao et al.) or ``step``.
        partition: how training samples are split over clients; default ``Dirichlet()`` (NIID-Bench, alpha 0.5).
        local_test: local test protocol for personalised evaluation: ``proportional`` (methods.md 1.5 T-A, the
            default) or ``none``; multi-domain sources default to ``none`` (the test set is an unseen domain).
        group_convention: many/medium/few rule: ``counts`` (>100 / <20), ``cumulative`` (75 % / 95 %) or
            ``thirds``.
        augment: apply the source's default training augmentation in ``get_batch(train=True)``.
        mask_absent_classes: PM evaluation only: classes with no sample in a client's local test set can never be
            predicted for that client (their logits are set to the lowest value). FedLoGe's official code does
            this (methods.md 1.5); it leaks the local label support into PM, so it is off by default and recorded
            in the partition summary.
        seed: seed of the LT subsample, the partition and the local test draws; ``None`` (default) uses the
            experiment seed, so a seed sweep also varies the split.
        target_domain: multi-domain sources only (PACS, Digits-DG, ...; methods.md 1.8): the held-out domain whose
            every image is the test set and never a training or validation image. ``all`` is expanded by
            ``fedlt fit`` into one run per domain plus the mean.
        domain_layout: multi-domain sources only: ``per_domain`` (one client per source domain, the default),
            ``clients_per_domain`` (FedCCRL-style Dirichlet spread) or ``centralized`` (one client holding every
            source domain). ``num_clients`` and ``partition`` are then ignored: the layout fixes the clients.
        clients_per_domain: clients per source domain in the ``clients_per_domain`` layout.
        domain_alpha: Dirichlet concentration of the ``clients_per_domain`` layout (<= 0: pure domains).
        val_fraction: multi-domain sources only: share of a source domain held out for in-domain validation
            (``val/domain/<name>/acc``) when the dataset has no official validation split. ``imbalance_factor`` > 1
            additionally subsamples every source domain's training images with the long-tail profile (class 0
            head); 1 keeps the natural class balance of the dataset.
    """

    def __init__(
        self,
        source: DataSource,
        num_clients: int = 20,
        imbalance_factor: float = 100.0,
        lt_profile: str = "exp",
        partition: Partitioner | None = None,
        local_test: str | None = None,
        group_convention: str = "counts",
        augment: bool = True,
        mask_absent_classes: bool = False,
        seed: int | None = None,
        target_domain: str | None = None,
        domain_layout: str = "per_domain",
        clients_per_domain: int = 2,
        domain_alpha: float = 1.0,
        val_fraction: float = 0.1,
    ) -> None:
        domain_names = tuple(getattr(source, "domains", ()))
        if local_test is None:
            local_test = "none" if domain_names else "proportional"
        if local_test not in LOCAL_TEST_PROTOCOLS:
            raise ValueError(
                f"unknown local_test protocol {local_test!r}; valid protocols: {', '.join(LOCAL_TEST_PROTOCOLS)}"
            )
        self.source = source
        self.num_clients = num_clients
        self.imbalance_factor = imbalance_factor
        self.lt_profile = lt_profile
        self.partition = partition if partition is not None else Dirichlet()
        self.local_test = local_test
        self.group_convention = group_convention
        self.augment = augment
        self.mask_absent_classes = mask_absent_classes
        self.seed = seed
        if domain_names:
            valid = ", ".join((*domain_names, "all"))
            if target_domain is None:
                raise ValueError(f"{source.name} is a multi-domain dataset: set data.target_domain to one of {valid}")
            if target_domain != "all" and target_domain not in domain_names:
                raise ValueError(f"unknown target_domain {target_domain!r} for {source.name}; valid: {valid}")
            if domain_layout not in DOMAIN_LAYOUTS:
                raise ValueError(f"unknown domain_layout {domain_layout!r}; valid: {', '.join(DOMAIN_LAYOUTS)}")
        elif target_domain is not None:
            raise ValueError(f"data.target_domain needs a multi-domain source; {source.name} has no domains")
        self.domain_names: list[str] = list(domain_names)
        self.target_domain = target_domain
        self.domain_layout = domain_layout
        self.clients_per_domain = clients_per_domain
        self.domain_alpha = domain_alpha
        self.val_fraction = val_fraction
        self.val: TensorSplit | None = None  # source-domain validation images (multi-domain data)
        self.client_val_indices: list[Tensor] = []  # per client, indices into ``val``
        self.device: torch.device | None = None
        self.source_name = source.name
        self._augment: TensorAugment | None = None
        self._scale: Tensor | None = None  # 1 / (255 std), shape (1, C, 1, 1)
        self._shift: Tensor | None = None  # mean / std, shape (1, C, 1, 1)
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.class_names: list[str] = []
        self.lt_indices: np.ndarray | None = None  # indices of the LT subsample into the source's train set

    @property
    def is_setup(self) -> bool:
        """Whether ``setup`` (or ``from_tensors``) has run."""
        return self.device is not None

    def setup(self, device: torch.device | str = "cpu") -> None:
        """Loads, subsamples, partitions and moves everything to ``device``.

        Idempotent: a second call only moves the tensors if ``device`` differs.

        Args:
            device: device for the image, label and index tensors.
        """
        device = torch.device(device)
        if self.device is None:
            if self.target_domain == "all":
                raise ValueError("target_domain 'all' is expanded by `fedlt fit` into one run per domain; a single "
                                 f"dataset needs one of {', '.join(self.domain_names)}")
            data = self.source.load()
            if isinstance(data, DomainData):
                self._build_domains(data)
            else:
                self._build(data)
        if self.device != device:
            self._move(device)

    def _build(self, data: SourceData) -> None:
        train_y = data.train_y.numpy()
        seed = 0 if self.seed is None else self.seed
        lt_idx = longtail_indices(train_y, data.num_classes, self.imbalance_factor, self.lt_profile, seed)
        lt_y = train_y[lt_idx]
        parts = self.partition(lt_y, self.num_clients, seed)
        counts = np.stack([np.bincount(lt_y[p], minlength=data.num_classes) for p in parts]).astype(np.int64)
        local, shortfall = LOCAL_TEST_PROTOCOLS[self.local_test](counts, data.test_y.numpy(), seed)
        lt_t = torch.from_numpy(lt_idx)
        self._install(
            train=TensorSplit(data.train_x[lt_t], data.train_y[lt_t]),
            test=TensorSplit(data.test_x, data.test_y),
            client_indices=parts,
            client_test_indices=local,
            num_classes=data.num_classes,
            shortfall=shortfall,
        )
        self.class_names = list(data.class_names)
        self._stats = (tuple(data.mean), tuple(data.std))
        self._augment = self.source.augment if self.augment else None
        self.lt_indices = lt_idx

    def _build_domains(self, data: DomainData) -> None:
        """Leave-one-domain-out split (methods.md 1.8) of a multi-domain dataset."""
        seed = 0 if self.seed is None else self.seed
        labels, dom = data.y.numpy(), data.domain.numpy()
        target = data.domains.index(self.target_domain)
        ds = leave_one_domain_out(labels, dom, data.split.numpy(), target, self.domain_layout,
                                  self.clients_per_domain, self.domain_alpha, self.val_fraction, seed)
        train_all = np.sort(np.concatenate(ds.train))
        if self.imbalance_factor > 1:
            # Long-tail subsample of every source domain's training images (class 0 = head), before the layout's
            # clients see them: a client keeps its images that survive its domain's subsample.
            keep = [train_all[dom[train_all] == d][longtail_indices(
                labels[train_all[dom[train_all] == d]], data.num_classes, self.imbalance_factor, self.lt_profile,
                seed + d)] for d in ds.sources]
            train_all = np.sort(np.concatenate(keep))
        pos = np.full(labels.shape[0], -1, dtype=np.int64)
        pos[train_all] = np.arange(train_all.size)
        clients = [pos[t][pos[t] >= 0] for t in ds.train]
        empty = [k for k, c in enumerate(clients) if c.size == 0]
        if empty:
            raise ValueError(f"client(s) {empty} hold no training image after the long-tail subsample; "
                             "lower imbalance_factor")
        val_pos = np.full(labels.shape[0], -1, dtype=np.int64)
        val_pos[ds.val] = np.arange(ds.val.size)

        def split(idx: np.ndarray) -> TensorSplit:
            t = torch.from_numpy(idx)
            return TensorSplit(data.x[t], data.y[t], data.domain[t])

        train, test = split(train_all), split(ds.test)
        counts = np.stack([np.bincount(labels[train_all[c]], minlength=data.num_classes) for c in clients])
        local, shortfall = LOCAL_TEST_PROTOCOLS[self.local_test](counts, data.y[torch.from_numpy(ds.test)].numpy(),
                                                                 seed)
        self._install(train=train, test=test, client_indices=clients, client_test_indices=local,
                      num_classes=data.num_classes, shortfall=shortfall)
        self.val = split(ds.val)
        self.client_val_indices = [torch.from_numpy(val_pos[v]) for v in ds.client_val]
        self.class_names = list(data.class_names)
        self.domain_names = list(data.domains)
        self.source_domain_ids = list(ds.sources)
        self.target_domain_id = ds.target
        self.client_domain_counts = np.stack(
            [np.bincount(dom[train_all[c]], minlength=len(data.domains)) for c in clients]).astype(np.int64)
        self._stats = (tuple(data.mean), tuple(data.std))
        self._augment = self.source.augment if self.augment else None
        self.lt_indices = train_all

    @property
    def num_domains(self) -> int:
        """Number of domains M of a multi-domain dataset (1 for single-domain data)."""
        return max(1, len(self.domain_names))

    def _install(
        self,
        train: TensorSplit,
        test: TensorSplit,
        client_indices: list[np.ndarray],
        client_test_indices: list[np.ndarray],
        num_classes: int,
        shortfall: np.ndarray,
    ) -> None:
        # Shared by setup() and from_tensors(): counts and groups come from the final index lists.
        train_y = train.y.cpu().numpy()
        self.num_classes = num_classes
        self.num_clients = len(client_indices)
        self.in_channels = int(train.x.shape[1])
        self.image_size = int(train.x.shape[-1])
        self.train, self.test = train, test
        self.client_indices = [torch.as_tensor(np.asarray(p), dtype=torch.int64) for p in client_indices]
        self.client_test_indices = [torch.as_tensor(np.asarray(p), dtype=torch.int64) for p in client_test_indices]
        self.client_class_counts = np.stack(
            [np.bincount(train_y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in client_indices]
        ).astype(np.int64)
        self.class_counts = np.bincount(train_y, minlength=num_classes).astype(np.int64)
        self.client_sizes = self.client_class_counts.sum(1)
        self.groups = class_groups(self.class_counts, self.group_convention)
        self.local_test_shortfall = np.asarray(shortfall, dtype=np.int64)
        test_y = test.y.cpu()
        self.client_test_classes = torch.stack([
            torch.bincount(test_y[torch.as_tensor(np.asarray(p), dtype=torch.int64)], minlength=num_classes) > 0
            for p in client_test_indices
        ]) if client_test_indices else torch.zeros(0, num_classes, dtype=torch.bool)

    def _move(self, device: torch.device) -> None:
        self.train, self.test = self.train.to(device), self.test.to(device)
        if self.val is not None:
            self.val = self.val.to(device)
            self.client_val_indices = [p.to(device) for p in self.client_val_indices]
        self.client_indices = [p.to(device) for p in self.client_indices]
        self.client_test_indices = [p.to(device) for p in self.client_test_indices]
        self.client_test_classes = self.client_test_classes.to(device)
        if self._stats is not None:
            mean = torch.tensor(self._stats[0], dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self._stats[1], dtype=torch.float32, device=device).view(1, -1, 1, 1)
            # (x / 255 - mean) / std folded into one multiply-subtract on the hot path.
            self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self.device = device

    def get_batch(
        self, split: TensorSplit, idx: Tensor, generator: torch.Generator | None = None, train: bool = False
    ) -> tuple[Tensor, ...]:
        """Gathers a batch, converts to float, augments (training only) and normalises.

        Multi-domain splits also return the domain ids, so every batch of domain data carries them; methods take
        ``batch[0]``, ``batch[1]`` (and ``batch[2]`` when they use domains).

        Args:
            split: ``self.train`` or ``self.test`` (or any split on the same device).
            idx: int64 indices into ``split`` (on the split's device).
            generator: CPU generator for the augmentation; no augmentation without one.
            train: whether this is a training batch (augmentation on).

        Returns:
            (x float (B, C, H, W), y int64 (B,)), plus domain ids int64 (B,) when the split has them.
        """
        x = split.x[idx]
        if x.dtype == torch.uint8:
            # Augmenting the 0..255 floats equals augmenting x / 255: crop pads zeros and flips do not scale.
            x = x.float()
        if train and generator is not None and self._augment is not None:
            x = self._augment(x, generator)
        if self._scale is not None:
            # In place is safe: tensor indexing above always produced a fresh tensor.
            x = x.mul_(self._scale).sub_(self._shift)
        if split.domain is not None:
            return x, split.y[idx], split.domain[idx]
        return x, split.y[idx]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description of the federated split for logs and plots."""
        group_sizes = np.bincount(self.groups, minlength=len(GROUP_NAMES))
        out = {
            "source": self.source_name,
            "num_classes": int(self.num_classes),
            "num_clients": int(self.num_clients),
            "imbalance_factor": self.imbalance_factor,
            "lt_profile": self.lt_profile,
            "partition": self.partition.describe() if self.partition is not None else {"name": "given"},
            "local_test": self.local_test,
            "mask_absent_classes": self.mask_absent_classes,
            "seed": self.seed,
            "group_convention": self.group_convention,
            "group_sizes": {name: int(group_sizes[g]) for g, name in enumerate(GROUP_NAMES)},
            "groups": [GROUP_NAMES[g] for g in self.groups],
            "train_size": len(self.train),
            "test_size": len(self.test),
            "class_counts": self.class_counts.tolist(),
            "client_sizes": self.client_sizes.tolist(),
            "client_class_counts": self.client_class_counts.tolist(),
            "local_test_sizes": [int(p.numel()) for p in self.client_test_indices],
            "local_test_shortfall": int(self.local_test_shortfall.sum()),
        }
        if self.domain_names and hasattr(self, "target_domain_id"):
            out.update({
                "domains": self.domain_names,
                "target_domain": self.domain_names[self.target_domain_id],
                "source_domains": [self.domain_names[d] for d in self.source_domain_ids],
                "domain_layout": self.domain_layout,
                "clients_per_domain": self.clients_per_domain if self.domain_layout == "clients_per_domain" else None,
                "domain_alpha": self.domain_alpha if self.domain_layout == "clients_per_domain" else None,
                "val_size": len(self.val) if self.val is not None else 0,
                "client_domain_counts": self.client_domain_counts.tolist(),
            })
        return out

    def save_summary(self, path: str | os.PathLike[str]) -> None:
        """Writes ``summary()`` as JSON, atomically (temporary file + rename).

        Args:
            path: destination file; parent folders are created.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_tensors(
        cls,
        train_x: Tensor,
        train_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        client_indices: list[Tensor],
        num_classes: int,
        client_test_indices: list[Tensor] | None = None,
        group_convention: str = "counts",
        mask_absent_classes: bool = False,
    ) -> FederatedDataset:
        """An already set-up dataset from given tensors and partition (benchmarks, tests).

        No LT subsampling, no normalisation and no augmentation: ``get_batch`` returns ``split.x[idx]``.

        Args:
            train_x: training inputs (N, ...), typically float.
            train_y: int64 training labels (N,).
            test_x: test inputs.
            test_y: int64 test labels.
            client_indices: per-client index tensors into the training set.
            num_classes: number of classes C.
            client_test_indices: per-client index tensors into the test set; default empty for every client.
            group_convention: many/medium/few rule (see ``class_groups``).
            mask_absent_classes: see the class docstring.

        Returns:
            A dataset whose tensors stay on ``train_x``'s device.
        """
        obj = cls.__new__(cls)
        obj.source, obj.source_name, obj.partition, obj._stats = None, "tensors", None, None
        obj.imbalance_factor, obj.lt_profile, obj.local_test, obj.seed = None, "given", "given", None
        obj.group_convention, obj.augment, obj._augment = group_convention, False, None
        obj.mask_absent_classes = mask_absent_classes
        obj.domain_names, obj.target_domain, obj.val, obj.client_val_indices = [], None, None, []
        obj._scale = obj._shift = None
        obj.class_names, obj.lt_indices = [str(c) for c in range(num_classes)], None
        device = train_x.device
        if client_test_indices is None:
            client_test_indices = [torch.zeros(0, dtype=torch.int64) for _ in client_indices]
        obj._install(
            train=TensorSplit(train_x, train_y.to(device)),
            test=TensorSplit(test_x, test_y.to(test_x.device)),
            client_indices=[p.cpu().numpy() for p in client_indices],
            client_test_indices=[p.cpu().numpy() for p in client_test_indices],
            num_classes=num_classes,
            shortfall=np.zeros((len(client_indices), num_classes), dtype=np.int64),
        )
        obj.device = None
        obj._move(device)
        return obj
