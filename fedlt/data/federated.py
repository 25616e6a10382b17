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

from fedlt.data.local_test import proportional_local_test
from fedlt.data.longtail import GROUP_NAMES, class_groups, longtail_indices
from fedlt.data.partition import Dirichlet, Partitioner
from fedlt.data.sources import DataSource, SourceData
from fedlt.data.transforms import TensorAugment

__all__ = ["LOCAL_TEST_PROTOCOLS", "FederatedDataset", "TensorSplit"]

LOCAL_TEST_PROTOCOLS: dict[str, Callable[..., tuple[list[np.ndarray], np.ndarray]]] = {
    "proportional": proportional_local_test,
}
"""Local test protocols of methods.md 1.5 by config name (T-A ``proportional`` is the library default)."""


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
        local_test: local test protocol for personalised evaluation; ``proportional`` (methods.md 1.5 T-A).
        group_convention: many/medium/few rule: ``counts`` (>100 / <20), ``cumulative`` (75 % / 95 %) or
            ``thirds``.
        augment: apply the source's default training augmentation in ``get_batch(train=True)``.
        mask_absent_classes: PM evaluation only: classes with no sample in a client's local test set can never be
            predicted for that client (their logits are set to the lowest value). FedLoGe's official code does
            this (methods.md 1.5); it leaks the local label support into PM, so it is off by default and recorded
            in the partition summary.
        seed: seed of the LT subsample, the partition and the local test draws; ``None`` (default) uses the
            experiment seed, so a seed sweep also varies the split.
    """

    def __init__(
        self,
        source: DataSource,
        num_clients: int = 20,
        imbalance_factor: float = 100.0,
        lt_profile: str = "exp",
        partition: Partitioner | None = None,
        local_test: str = "proportional",
        group_convention: str = "counts",
        augment: bool = True,
        mask_absent_classes: bool = False,
        seed: int | None = None,
    ) -> None:
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
            self._build(self.source.load())
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
    ) -> tuple[Tensor, Tensor]:
        """Gathers a batch, converts to float, augments (training only) and normalises.

        Args:
            split: ``self.train`` or ``self.test`` (or any split on the same device).
            idx: int64 indices into ``split`` (on the split's device).
            generator: CPU generator for the augmentation; no augmentation without one.
            train: whether this is a training batch (augmentation on).

        Returns:
            (x float (B, C, H, W), y int64 (B,)).
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
        return x, split.y[idx]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description of the federated split for logs and plots."""
        group_sizes = np.bincount(self.groups, minlength=len(GROUP_NAMES))
        return {
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
