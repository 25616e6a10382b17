"""``FederatedDataset``: LT subsampling, partition, local test sets and class groups on device tensors.

Small datasets live on the device as uint8 tensors and are batched by index with tensor augmentation
(docs/architecture.md 3), so there is no DataLoader per client. Large or file-backed (memory-mapped) images stay on
the host
and only each batch travels to the device; how a batch is gathered, augmented, resized and normalised lives in
``fedlt.data.batching``. See docs/reference.md 1.2 (LT profile), 1.3 (partitions), 1.5 (local test sets), 1.6 (class
groups) and 1.9 (FedPuReL's CLIP inputs).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlt.data.batching import AUGMENTATIONS, STORAGE_MODES, BatchPipeline, TensorSplit, check_choice
from fedlt.data.domains import DOMAIN_LAYOUTS, DomainData, leave_one_domain_out
from fedlt.data.local_test_sets import LOCAL_TEST_PROTOCOLS, LocalTestContext, check_local_test
from fedlt.data.longtail import class_groups, longtail_indices
from fedlt.data.partition import Dirichlet, Partitioner, PartitionResult
from fedlt.data.sources import DataSource, SourceData
from fedlt.data.summary import federated_summary, write_summary
from fedlt.data.transforms import NORMALIZATIONS

__all__ = ["AUGMENTATIONS", "LOCAL_TEST_PROTOCOLS", "STORAGE_MODES", "FederatedDataset", "TensorSplit"]

GROUP_SOURCES: tuple[str, ...] = ("train", "local_test")
PM_GROUP_SOURCES: tuple[str, ...] = ("global", "local_test")


def check_group_sources(group_source: str, pm_group_source: str, local_test: str) -> None:
    """Validates ``group_source`` / ``pm_group_source``; both ``local_test`` choices need local test sets."""
    check_choice("group_source", group_source, GROUP_SOURCES)
    check_choice("pm_group_source", pm_group_source, PM_GROUP_SOURCES)
    if local_test == "none" and "local_test" in (group_source, pm_group_source):
        raise ValueError("group_source / pm_group_source 'local_test' need local test sets (data.local_test is none)")


class FederatedDataset:
    """A long-tailed, partitioned federated dataset held as tensors on one device.

    Args:
        source: where the images come from (e.g. ``EmbeddedDigits``, ``CIFAR10``).
        num_clients: number of clients K.
        imbalance_factor: long-tail imbalance factor IF = n_max / n_min (>= 1; 1 keeps the classes balanced);
            None keeps the training set as loaded, for sources that are long-tailed already (ImageNet-LT, Places-LT).
        lt_profile: long-tail profile, ``exp`` (Cao et al.) or ``step``.
        partition: how training samples are split over clients; default ``Dirichlet()`` (NIID-Bench, alpha 0.5).
            ``HierarchicalPooled`` (P-E) splits the pool LT-train + test set: client train sets come from the
            train part, local test sets from the test part; the global test set stays the full balanced one.
        local_test: local test protocol for personalised evaluation (docs/reference.md 1.5): ``proportional`` (T-A, the
            default), ``same_share`` (T-B: the test set cut with the train split's Dirichlet proportions; needs a
            partitioner that records them, ``dirichlet`` or ``dirichlet_no_cap``), ``balanced`` (T-D: every class
            split evenly over all clients), ``independent`` (T-E: a fresh P-F draw with the partitioner's alpha),
            ``pooled`` (T-C, the default and only choice with ``HierarchicalPooled``) or ``none``; multi-domain
            sources default to ``none`` (the test set is an unseen domain).
        group_convention: many/medium/few rule: ``counts`` (>100 / <20), ``cumulative`` (75 % / 95 %),
            ``thirds`` or ``fedpurel``.
        group_source: which class counts the GM groups are computed from (docs/reference.md 1.6): ``train`` (the
            global training counts, the default) or ``local_test`` (the local test sets' class counts summed over
            all clients, as FedLoGe's released evaluation does). Needs local test sets.
        pm_group_source: which groups PM many / medium / few use: ``global`` (the GM groups, the default) or
            ``local_test`` (every client's own groups, from its local test set's class counts with the same
            convention; a group's PM accuracy is then averaged over the clients that have it, as FedLoGe's released
            evaluation does). Needs local test sets.
        augment: apply the training augmentation (``augmentation``) in ``get_batch(train=True)``; False switches
            augmentation off entirely.
        mask_absent_classes: PM evaluation only: classes with no sample in a client's local test set can never be
            predicted for that client (their logits are set to the lowest value). FedLoGe's official code does
            this (docs/reference.md 1.5); it leaks the local label support into PM, so it is off by default and recorded
            in the partition summary.
        seed: seed of the LT subsample, the partition and the local test draws; ``None`` (default) uses the
            experiment seed, so a seed sweep also varies the split.
        target_domain: multi-domain sources only (PACS, Digits-DG, ...; docs/reference.md 1.8): the held-out domain
            whose
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
        image_size: side of the batches ``get_batch`` returns; None keeps the stored side. The stored images stay
            as loaded (e.g. 32 px CIFAR) and each batch is resized on the device: evaluation batches with a bicubic,
            antialiased resize, training batches by the augmentation (``clip``: random-resized crop straight to
            this size; ``source``: the source's augmentation, then the bicubic resize).
        normalization: mean/std of the normalisation: None uses the source's statistics, ``clip`` OpenAI CLIP's,
            ``imagenet`` torchvision's ImageNet ones. A 3-channel normalisation of a 1-channel source repeats the
            channel (``in_channels`` becomes 3).
        augmentation: training augmentation: ``source`` (the source's default, e.g. crop + flip) or ``clip``
            (CoOp/Dassl CLIP fine-tuning: random-resized crop, scale 0.08-1, bicubic, + horizontal flip).
        storage: where the images live: ``device`` (moved to the training device with everything else),
            ``host`` (images stay in host memory, possibly memory-mapped; each batch is gathered there and sent to
            the device; labels and indices live on the device) or ``auto`` (``host`` for file-backed sources or
            images above 4 GiB, else ``device``).

    ``in_channels`` and ``image_size`` describe the batches ``get_batch`` returns (what the model sees);
    ``stored_image_size`` is the side of the stored images.
    """

    def __init__(
        self,
        source: DataSource,
        num_clients: int = 20,
        imbalance_factor: float | None = 100.0,
        lt_profile: str = "exp",
        partition: Partitioner | None = None,
        local_test: str | None = None,
        group_convention: str = "counts",
        group_source: str = "train",
        pm_group_source: str = "global",
        augment: bool = True,
        mask_absent_classes: bool = False,
        seed: int | None = None,
        target_domain: str | None = None,
        domain_layout: str = "per_domain",
        clients_per_domain: int = 2,
        domain_alpha: float = 1.0,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        normalization: str | None = None,
        augmentation: str = "source",
        storage: str = "auto",
    ) -> None:
        domain_names = tuple(getattr(source, "domains", ()))
        partition = partition if partition is not None else Dirichlet()
        if local_test is None:
            local_test = "none" if domain_names else "pooled" if partition.pools_test_set else "proportional"
        # Multi-domain layouts fix the clients themselves: no partitioner (and no proportions) behind them.
        check_local_test(local_test, None if domain_names else partition)
        check_choice("normalization", normalization, (None, *NORMALIZATIONS))
        check_choice("augmentation", augmentation, AUGMENTATIONS)
        check_choice("storage", storage, STORAGE_MODES)
        check_group_sources(group_source, pm_group_source, local_test)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive side length or None, got {image_size}")
        # None for a dataset built from tensors (from_tensors): no source to load and no partitioner.
        self.source: DataSource | None = source
        self.num_clients = num_clients
        self.imbalance_factor = imbalance_factor
        self.lt_profile = lt_profile
        self.partition: Partitioner | None = partition
        self.local_test = local_test
        self.group_convention = group_convention
        self.group_source, self.pm_group_source = group_source, pm_group_source
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
        self.normalization = normalization
        self.augmentation = augmentation
        self.storage = storage
        self.image_size = image_size  # after setup: the side of the batches get_batch returns
        self._batches = BatchPipeline(image_size)  # storage, augmentation, resize, normalisation (set up by setup())
        self.partition_unassigned = 0  # pooled items no client drew (P-E)
        self.class_names: list[str] = []
        self.lt_indices: np.ndarray | None = None  # indices of the LT subsample into the source's train set

    @property
    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The (mean, std) per channel that ``get_batch`` normalises with (``None``: batches are not normalised,
        e.g. ``from_tensors`` datasets). Methods that feed another network (a CLIP teacher) undo it with these."""
        return self._batches.stats

    @property
    def host_images(self) -> bool:
        """Resolved storage: whether the images are kept on the host (set up by ``setup``)."""
        return self._batches.host_images

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
            assert self.source is not None  # a dataset from tensors is set up (device set) when it is made
            data = self.source.load()
            if isinstance(data, DomainData):
                self._build_domains(data)
            else:
                self._build(data)
        if self.device != device:
            self._move(device)

    def _configure_inputs(self, data: Any, images: tuple[Tensor, ...]) -> None:
        """Normalisation statistics, training augmentation and storage, before ``_install``."""
        self._batches.configure(data, images, self.normalization, self.augmentation if self.augment else None,
                                self.source, self.storage)

    def _build(self, data: SourceData) -> None:
        train_y, test_y = data.train_y.numpy(), data.test_y.numpy()
        seed = 0 if self.seed is None else self.seed
        self._configure_inputs(data, (data.train_x, data.test_x))
        if self.imbalance_factor is None:
            lt_idx = np.arange(train_y.size, dtype=np.int64)
        else:
            lt_idx = longtail_indices(train_y, data.num_classes, self.imbalance_factor, self.lt_profile, seed)
        lt_idx, result = self._split_train(data, lt_idx, seed)
        lt_y = train_y[lt_idx]
        counts = np.stack([np.bincount(lt_y[p], minlength=data.num_classes) for p in result.indices]).astype(np.int64)
        ctx = LocalTestContext(counts, test_y, seed, partition=result, partitioner=self.partition)
        local, shortfall = LOCAL_TEST_PROTOCOLS[self.local_test](ctx)
        if lt_idx.size == train_y.size:  # sorted and unique: the whole train set, no copy (memory-mapped data)
            train = TensorSplit(data.train_x, data.train_y)
        else:
            lt_t = torch.from_numpy(lt_idx)
            train = TensorSplit(data.train_x[lt_t], data.train_y[lt_t])
        self._install(
            train=train,
            test=TensorSplit(data.test_x, data.test_y),
            client_indices=result.indices,
            client_test_indices=local,
            num_classes=data.num_classes,
            shortfall=shortfall,
        )
        self.class_names = list(data.class_names)
        self.lt_indices = lt_idx

    def _split_train(self, data: SourceData, lt_idx: np.ndarray, seed: int) -> tuple[np.ndarray, PartitionResult]:
        """Partitions the LT subsample; returns the (possibly reduced) subsample and the partition into it."""
        lt_y = data.train_y.numpy()[lt_idx]
        partition = self.partition
        assert partition is not None  # a dataset built from tensors has its clients already
        if not partition.pools_test_set:
            return lt_idx, partition.split(lt_y, self.num_clients, seed)
        result = partition.split_pooled(lt_y, data.test_y.numpy(), self.num_clients, seed, data.num_classes,
                                        data.superclasses)
        self.partition_unassigned = result.unassigned
        kept = np.sort(np.concatenate(result.indices))
        if kept.size == lt_idx.size:
            return lt_idx, result
        # The (< K) train items no client drew leave the training set, so the clients still cover it exactly.
        pos = np.full(lt_idx.size, -1, dtype=np.int64)
        pos[kept] = np.arange(kept.size)
        return lt_idx[kept], dataclasses.replace(result, indices=[pos[p] for p in result.indices])

    def _build_domains(self, data: DomainData) -> None:
        """Leave-one-domain-out split (docs/reference.md 1.8) of a multi-domain dataset."""
        seed = 0 if self.seed is None else self.seed
        labels, dom = data.y.numpy(), data.domain.numpy()
        assert self.target_domain is not None  # checked against the source's domains in __init__
        target = data.domains.index(self.target_domain)
        ds = leave_one_domain_out(labels, dom, data.split.numpy(), target, self.domain_layout,
                                  self.clients_per_domain, self.domain_alpha, self.val_fraction, seed)
        train_all = np.sort(np.concatenate(ds.train))
        if self.imbalance_factor is not None and self.imbalance_factor > 1:
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

        self._configure_inputs(data, (data.x,))
        train, test = split(train_all), split(ds.test)
        counts = np.stack([np.bincount(labels[train_all[c]], minlength=data.num_classes) for c in clients])
        ctx = LocalTestContext(counts.astype(np.int64), labels[ds.test], seed)
        local, shortfall = LOCAL_TEST_PROTOCOLS[self.local_test](ctx)
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
        self._set_output_shape(int(train.x.shape[1]), int(train.x.shape[-1]))
        self.train, self.test = train, test
        self.client_indices = [torch.as_tensor(np.asarray(p), dtype=torch.int64) for p in client_indices]
        self.client_test_indices = [torch.as_tensor(np.asarray(p), dtype=torch.int64) for p in client_test_indices]
        self.client_class_counts = np.stack(
            [np.bincount(train_y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in client_indices]
        ).astype(np.int64)
        self.class_counts = np.bincount(train_y, minlength=num_classes).astype(np.int64)
        self.client_sizes = self.client_class_counts.sum(1)
        test_y = test.y.cpu()
        #: (K, C) class counts of every client's local test set (its quotas).
        self.client_test_counts = np.stack([
            np.bincount(test_y.numpy()[np.asarray(p, dtype=np.int64)], minlength=num_classes)
            for p in client_test_indices
        ]).astype(np.int64) if client_test_indices else np.zeros((0, num_classes), dtype=np.int64)
        source = getattr(self, "group_source", "train")
        counts = self.class_counts if source == "train" else self.client_test_counts.sum(0)
        self.groups = class_groups(counts, self.group_convention)
        #: (K, C) per-client groups for PM (``pm_group_source="local_test"``), else None (PM uses ``groups``).
        self.client_groups = np.stack([class_groups(c, self.group_convention) for c in self.client_test_counts]) \
            if getattr(self, "pm_group_source", "global") == "local_test" else None
        self.local_test_shortfall = np.asarray(shortfall, dtype=np.int64)
        self.client_test_classes = torch.stack([
            torch.bincount(test_y[torch.as_tensor(np.asarray(p), dtype=torch.int64)], minlength=num_classes) > 0
            for p in client_test_indices
        ]) if client_test_indices else torch.zeros(0, num_classes, dtype=torch.bool)

    def _set_output_shape(self, stored_channels: int, stored_size: int) -> None:
        # The model is built from in_channels / image_size, so they describe get_batch's output, not the storage.
        self.stored_image_size = stored_size
        self.in_channels, self.image_size = self._batches.output_shape(stored_channels, stored_size, self.normalization)

    def _move(self, device: torch.device) -> None:
        images = not self.host_images
        self.train, self.test = self.train.to(device, images), self.test.to(device, images)
        if self.val is not None:
            self.val = self.val.to(device, images)
            self.client_val_indices = [p.to(device) for p in self.client_val_indices]
        self.client_indices = [p.to(device) for p in self.client_indices]
        self.client_test_indices = [p.to(device) for p in self.client_test_indices]
        self.client_test_classes = self.client_test_classes.to(device)
        self._batches.to(device)
        self.device = device

    def get_batch(
        self, split: TensorSplit, idx: Tensor, generator: torch.Generator | None = None, train: bool = False
    ) -> tuple[Tensor, ...]:
        """Gathers a batch, converts to float, augments (training only), resizes and normalises.

        Multi-domain splits also return the domain ids, so every batch of domain data carries them; methods take
        ``batch[0]``, ``batch[1]`` (and ``batch[2]`` when they use domains). With host storage the images are
        gathered on the host and only the batch is copied to the device.

        Args:
            split: ``self.train`` or ``self.test`` (or any split on the same device).
            idx: int64 indices into ``split`` (on the device of the split's labels).
            generator: CPU generator for the augmentation; no augmentation without one.
            train: whether this is a training batch (augmentation on).

        Returns:
            (x float (B, in_channels, image_size, image_size), y int64 (B,)), plus domain ids int64 (B,) when the
            split has them.
        """
        x = self._batches(split.x, idx, generator, train)
        if split.domain is not None:
            return x, split.y[idx], split.domain[idx]
        return x, split.y[idx]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description of the federated split for logs and plots."""
        return federated_summary(self)

    def save_summary(self, path: str | os.PathLike[str]) -> None:
        """Writes ``summary()`` as JSON, atomically (temporary file + rename).

        Args:
            path: destination file; parent folders are created.
        """
        write_summary(self.summary(), path)

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
        group_source: str = "train",
        pm_group_source: str = "global",
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
            group_source: see the class docstring.
            pm_group_source: see the class docstring.

        Returns:
            A dataset whose tensors stay on ``train_x``'s device.
        """
        obj = cls.__new__(cls)
        obj.source, obj.source_name, obj.partition, obj._batches = None, "tensors", None, BatchPipeline()
        obj.normalization, obj.augmentation, obj.storage, obj.partition_unassigned = None, "source", "device", 0
        obj.imbalance_factor, obj.lt_profile, obj.local_test, obj.seed = None, "given", "given", None
        obj.group_convention, obj.augment = group_convention, False
        check_group_sources(group_source, pm_group_source, "given" if client_test_indices else "none")
        obj.group_source, obj.pm_group_source = group_source, pm_group_source
        obj.mask_absent_classes = mask_absent_classes
        obj.domain_names, obj.target_domain, obj.val, obj.client_val_indices = [], None, None, []
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
