"""Tests of fedlt.data.sources: embedded digits (deterministic, cached, held-out test) and torchvision errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt.data.digits import _digit_source_split
from fedlt.data.sources import (
    CIFAR10,
    CIFAR100,
    MNIST,
    SOURCES,
    DatasetNotFoundError,
    EmbeddedDigits,
    FashionMNIST,
    SourceData,
    channel_stats,
)


@pytest.fixture(scope="module")
def default_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddedDigits, SourceData, float]:
    source = EmbeddedDigits(root=str(tmp_path_factory.mktemp("digits_cache")))
    start = time.perf_counter()
    data = source.load()
    return source, data, time.perf_counter() - start


def test_registry() -> None:
    assert SOURCES.names() == ["cifar10", "cifar100", "digit_domains", "digits", "digitsdg", "fashionmnist",
                               "imagenet_lt", "minidomainnet", "mnist", "officehome", "pacs", "places_lt"]
    assert SOURCES.get("digits") is EmbeddedDigits


def test_default_digits_shapes_and_balance(default_digits: tuple[EmbeddedDigits, SourceData, float]) -> None:
    source, data, seconds = default_digits
    print(f"EmbeddedDigits default build (cold): {seconds:.2f} s, synthesis {source.last_build_s:.2f} s")
    assert data.train_x.shape == (10000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (1000, 1, 28, 28) and data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == torch.int64 and data.test_y.dtype == torch.int64
    assert torch.bincount(data.train_y, minlength=10).min() >= 1000
    assert torch.bincount(data.test_y, minlength=10).tolist() == [100] * 10
    assert data.num_classes == 10 and data.class_names == [str(c) for c in range(10)]
    mean, std = channel_stats(data.train_x)
    assert data.mean == mean and data.std == std
    assert 0.05 < data.mean[0] < 0.4 and 0.15 < data.std[0] < 0.45  # MNIST-like: dark background, bright strokes
    # Images vary: the 1000 images of class 0 are not copies of the ~130 source digits.
    assert torch.unique(data.train_x[data.train_y == 0].flatten(1), dim=0).shape[0] == 1000


def test_cache_hit_is_identical(default_digits: tuple[EmbeddedDigits, SourceData, float]) -> None:
    source, data, _ = default_digits
    assert source.cache_path.exists()
    assert source.cache_path.name == "digits-28-1000-100-50-s0-v1.pt"
    again = EmbeddedDigits(root=source.root)
    start = time.perf_counter()
    cached = again.load()
    print(f"EmbeddedDigits cached load: {time.perf_counter() - start:.3f} s")
    assert again.last_build_s is None  # read from the cache, not rebuilt
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(cached, name), getattr(data, name))
    assert not list(Path(source.root).glob("*.tmp"))  # atomic write left no temporary file


def test_two_builds_bit_identical(tmp_path: Path) -> None:
    params = {"image_size": 16, "train_per_class": 120, "test_per_class": 30, "seed": 3}
    a = EmbeddedDigits(root=str(tmp_path / "a"), **params).load()
    b = EmbeddedDigits(root=str(tmp_path / "b"), **params).load()
    c = EmbeddedDigits(root=str(tmp_path / "c"), **{**params, "seed": 4}).load()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (1200, 1, 16, 16)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLT_CACHE", str(tmp_path))
    source = EmbeddedDigits(image_size=8, train_per_class=10, test_per_class=5, holdout_per_class=20)
    assert source.cache_path.parent == tmp_path
    source.load()
    assert (tmp_path / "digits-8-10-5-20-s0-v1.pt").exists()


def test_holdout_sources_disjoint_and_sized() -> None:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train_src, test_src = _digit_source_split(targets, holdout_per_class=50, seed=0)
    assert np.intersect1d(train_src, test_src).size == 0
    assert train_src.size + test_src.size == targets.size
    assert np.bincount(targets[test_src], minlength=10).tolist() == [50] * 10
    other_train, _ = _digit_source_split(targets, holdout_per_class=50, seed=1)
    assert not np.array_equal(train_src, other_train)
    with pytest.raises(ValueError, match="holdout_per_class"):
        _digit_source_split(targets, holdout_per_class=500, seed=0)


@pytest.mark.parametrize(
    ("cls", "folder", "channels"),
    [
        (CIFAR10, "cifar-10-batches-py", 3),
        (CIFAR100, "cifar-100-python", 3),
        (MNIST, "MNIST", 1),
        (FashionMNIST, "FashionMNIST", 1),
    ],
)
def test_torchvision_missing_dataset(tmp_path: Path, cls: type, folder: str, channels: int) -> None:
    source = cls(root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        source.load()
    message = str(info.value)
    assert str(tmp_path.resolve()) in message
    assert folder in message
    assert "download: true" in message
    assert isinstance(info.value, FileNotFoundError)
    assert source.augment.crop_padding == (4 if channels == 3 else 2)
    assert len(source._mean) == channels == len(source._std)
