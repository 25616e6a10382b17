"""Tests of fedlt.data.federated (FederatedDataset, TensorSplit) and fedlt.data.plot on embedded digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt.data.federated import FederatedDataset, TensorSplit
from fedlt.data.longtail import class_groups, longtail_counts
from fedlt.data.partition import Dirichlet, Shards
from fedlt.data.plot import plot_partition
from fedlt.data.sources import EmbeddedDigits

_SMALL = {"image_size": 16, "train_per_class": 300, "test_per_class": 40}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedlt_cache")


@pytest.fixture
def fed(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FederatedDataset:
    monkeypatch.setenv("FEDLT_CACHE", str(cache_dir))
    ds = FederatedDataset(
        EmbeddedDigits(**_SMALL), num_clients=6, imbalance_factor=10.0, partition=Dirichlet(0.5, min_size=5), seed=2
    )
    ds.setup("cpu")
    return ds


def test_setup_attributes(fed: FederatedDataset) -> None:
    assert (fed.num_classes, fed.num_clients, fed.in_channels, fed.image_size) == (10, 6, 1, 16)
    assert fed.train.x.dtype == torch.uint8 and fed.train.y.dtype == torch.int64
    assert len(fed.test) == 400 and torch.bincount(fed.test.y).tolist() == [40] * 10
    assert len(fed.client_indices) == 6 and len(fed.client_test_indices) == 6
    assert all(p.dtype == torch.int64 for p in fed.client_indices + fed.client_test_indices)


def test_class_counts_follow_lt_profile(fed: FederatedDataset) -> None:
    expected = longtail_counts(300, 10, 10.0)
    np.testing.assert_array_equal(fed.class_counts, expected)
    np.testing.assert_array_equal(torch.bincount(fed.train.y, minlength=10).numpy(), expected)
    np.testing.assert_array_equal(fed.groups, class_groups(expected, "counts"))
    assert len(fed.train) == expected.sum()


def test_clients_cover_train_exactly(fed: FederatedDataset) -> None:
    allidx = torch.cat(fed.client_indices)
    assert allidx.numel() == len(fed.train)
    assert torch.equal(allidx.sort().values, torch.arange(len(fed.train)))
    for k, idx in enumerate(fed.client_indices):
        counts = torch.bincount(fed.train.y[idx], minlength=10).numpy()
        np.testing.assert_array_equal(counts, fed.client_class_counts[k])
    np.testing.assert_array_equal(fed.client_sizes, [p.numel() for p in fed.client_indices])
    np.testing.assert_array_equal(fed.client_class_counts.sum(0), fed.class_counts)


def test_local_tests_proportional(fed: FederatedDataset) -> None:
    quotas = fed.client_class_counts * len(fed.test) // fed.class_counts.sum()
    for k, idx in enumerate(fed.client_test_indices):
        drawn = torch.bincount(fed.test.y[idx], minlength=10).numpy()
        np.testing.assert_array_equal(drawn + fed.local_test_shortfall[k], quotas[k])


def test_setup_is_idempotent_and_deterministic(fed: FederatedDataset, cache_dir: Path) -> None:
    before = [p.clone() for p in fed.client_indices]
    fed.setup("cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, fed.client_indices, strict=True))
    twin = FederatedDataset(
        EmbeddedDigits(root=str(cache_dir), **_SMALL),
        num_clients=6,
        imbalance_factor=10.0,
        partition=Dirichlet(0.5, min_size=5),
        seed=2,
    )
    twin.setup()
    assert torch.equal(twin.train.x, fed.train.x)
    assert all(torch.equal(a, b) for a, b in zip(before, twin.client_indices, strict=True))


def test_summary_round_trips(fed: FederatedDataset, tmp_path: Path) -> None:
    path = tmp_path / "run" / "partition.json"
    fed.save_summary(path)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(fed.summary()))
    assert loaded["source"] == "digits" and loaded["num_clients"] == 6 and loaded["imbalance_factor"] == 10.0
    assert loaded["partition"] == {"name": "dirichlet", "alpha": 0.5, "min_size": 5, "max_tries": 100}
    assert loaded["client_class_counts"] == fed.client_class_counts.tolist()
    assert sum(loaded["group_sizes"].values()) == 10
    assert loaded["group_sizes"]["many"] == int((fed.class_counts > 100).sum())
    assert loaded["local_test_sizes"] == [p.numel() for p in fed.client_test_indices]
    assert not list(path.parent.glob("*.tmp"))


def test_get_batch_normalises(fed: FederatedDataset) -> None:
    idx = torch.arange(len(fed.train))
    x, y = fed.get_batch(fed.train, idx)
    assert x.dtype == torch.float32 and x.shape == (len(fed.train), 1, 16, 16)
    assert torch.equal(y, fed.train.y)
    # Source mean/std come from the balanced train set; the LT subsample is close to it.
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1
    stats = fed.source.load()
    expected = (fed.train.x[:5].float() / 255 - stats.mean[0]) / stats.std[0]
    torch.testing.assert_close(x[:5], expected, rtol=1e-5, atol=1e-5)
    assert fed.train.x.dtype == torch.uint8  # the stored split is untouched


def test_get_batch_augments_only_when_training(fed: FederatedDataset) -> None:
    idx = torch.arange(64)
    plain, _ = fed.get_batch(fed.train, idx)
    no_gen, _ = fed.get_batch(fed.train, idx, train=True)
    aug_a, _ = fed.get_batch(fed.train, idx, torch.Generator().manual_seed(1), train=True)
    aug_b, _ = fed.get_batch(fed.train, idx, torch.Generator().manual_seed(1), train=True)
    eval_gen, _ = fed.get_batch(fed.train, idx, torch.Generator().manual_seed(1), train=False)
    assert torch.equal(plain, no_gen) and torch.equal(plain, eval_gen)
    assert torch.equal(aug_a, aug_b)
    assert not torch.equal(aug_a, plain)


def test_augment_flag_off(cache_dir: Path) -> None:
    ds = FederatedDataset(
        EmbeddedDigits(root=str(cache_dir), **_SMALL), num_clients=3, partition=Shards(), augment=False
    )
    ds.setup()
    idx = torch.arange(32)
    a, _ = ds.get_batch(ds.train, idx, torch.Generator().manual_seed(0), train=True)
    b, _ = ds.get_batch(ds.train, idx)
    assert torch.equal(a, b)
    assert ds.summary()["partition"] == {"name": "shards", "shards_per_client": 2}


def test_unknown_local_test_protocol(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="proportional"):
        FederatedDataset(EmbeddedDigits(root=str(cache_dir)), local_test="stratified")


def test_from_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(30, 2, 4, 4, generator=g), torch.randn(9, 2, 4, 4, generator=g)
    train_y = torch.tensor([0] * 20 + [1] * 7 + [2] * 3)
    test_y = torch.tensor([0, 1, 2] * 3)
    parts = [torch.arange(0, 12), torch.arange(12, 30)]
    ds = FederatedDataset.from_tensors(train_x, train_y, test_x, test_y, parts, num_classes=3)
    assert (ds.num_clients, ds.num_classes, ds.in_channels, ds.image_size) == (2, 3, 2, 4)
    assert ds.class_counts.tolist() == [20, 7, 3]
    assert ds.client_class_counts.tolist() == [[12, 0, 0], [8, 7, 3]]
    assert ds.client_sizes.tolist() == [12, 18]
    assert [p.numel() for p in ds.client_test_indices] == [0, 0]
    idx = torch.tensor([3, 25, 29])
    x, y = ds.get_batch(ds.train, idx, torch.Generator().manual_seed(0), train=True)
    assert torch.equal(x, train_x[idx]) and torch.equal(y, train_y[idx])
    summary = json.loads(json.dumps(ds.summary()))
    assert summary["partition"] == {"name": "given"} and summary["train_size"] == 30
    ds.setup("cpu")  # already set up: no-op
    assert ds.train.x is train_x


def test_tensor_split() -> None:
    split = TensorSplit(torch.zeros(5, 1, 2, 2), torch.arange(5), domain=torch.zeros(5, dtype=torch.int64))
    moved = split.to("cpu")
    assert len(moved) == 5 and moved.domain is not None and torch.equal(moved.y, split.y)


def test_plot_partition_writes_png(fed: FederatedDataset, tmp_path: Path) -> None:
    path = tmp_path / "plots" / "partition.png"
    plot_partition(fed.summary(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1024
