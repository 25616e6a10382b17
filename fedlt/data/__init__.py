"""Data: sources, long-tailed subsampling, partitions, local test sets, augmentation, ``FederatedDataset``."""

from __future__ import annotations

from fedlt.data.digits_dg import EmbeddedDigitsDG
from fedlt.data.domain_sources import PACS, DigitsDG, MiniDomainNet, OfficeHome
from fedlt.data.domains import DOMAIN_LAYOUTS, DomainData, DomainSource, DomainSplit, leave_one_domain_out
from fedlt.data.federated import LOCAL_TEST_PROTOCOLS, FederatedDataset, TensorSplit
from fedlt.data.local_test import local_test_quotas, proportional_local_test
from fedlt.data.longtail import (
    GROUP_CONVENTIONS,
    GROUP_NAMES,
    LT_PROFILES,
    class_groups,
    longtail_counts,
    longtail_indices,
)
from fedlt.data.partition import (
    IID,
    PARTITIONERS,
    Dirichlet,
    DirichletPerSample,
    DirichletPrior,
    Partitioner,
    PartitionError,
    Shards,
    dirichlet_partition,
    dirichlet_per_sample_partition,
    dirichlet_prior_partition,
    iid_partition,
    shards_partition,
)
from fedlt.data.plot import plot_partition
from fedlt.data.sources import (
    CIFAR10,
    CIFAR100,
    MNIST,
    SOURCES,
    DatasetNotFoundError,
    DataSource,
    EmbeddedDigits,
    FashionMNIST,
    SourceData,
    channel_stats,
    default_cache_dir,
)
from fedlt.data.transforms import ImageAugment, TensorAugment

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DOMAIN_LAYOUTS",
    "PACS",
    "DigitsDG",
    "DomainData",
    "DomainSource",
    "DomainSplit",
    "EmbeddedDigitsDG",
    "ImageAugment",
    "MiniDomainNet",
    "OfficeHome",
    "leave_one_domain_out",
    "GROUP_CONVENTIONS",
    "GROUP_NAMES",
    "IID",
    "LOCAL_TEST_PROTOCOLS",
    "LT_PROFILES",
    "MNIST",
    "PARTITIONERS",
    "SOURCES",
    "DataSource",
    "DatasetNotFoundError",
    "Dirichlet",
    "DirichletPerSample",
    "DirichletPrior",
    "EmbeddedDigits",
    "FashionMNIST",
    "FederatedDataset",
    "PartitionError",
    "Partitioner",
    "Shards",
    "SourceData",
    "TensorAugment",
    "TensorSplit",
    "channel_stats",
    "class_groups",
    "default_cache_dir",
    "dirichlet_partition",
    "dirichlet_per_sample_partition",
    "dirichlet_prior_partition",
    "iid_partition",
    "local_test_quotas",
    "longtail_counts",
    "longtail_indices",
    "plot_partition",
    "proportional_local_test",
    "shards_partition",
]
