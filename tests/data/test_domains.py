"""Leave-one-domain-out (docs/reference.md 1.8): ``leave_one_domain_out`` on hand-made domain data whose every image
has a file name encoding its domain, and ``FederatedDataset`` on multi-domain sources (a fake source whose pixels encode
the image index, and the embedded digit_domains)."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedlt.data import EmbeddedDigitDomains, EmbeddedDigits, FederatedDataset
from fedlt.data.domains import (
    DOMAIN_LAYOUTS,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VAL,
    DomainData,
    DomainSource,
    leave_one_domain_out,
)

NAMES = ("art", "cartoon", "photo", "sketch")
C = 3
SIZES = (8, 10, 12, 6)  # images per class of each domain
DG = {"image_size": 16, "per_class": 30, "val_per_class": 5}
DG_DOMAINS = ("plain", "textured", "inverted", "thick")


def make_domain_data(official: tuple[int, ...] = (), sizes: tuple[int, ...] = SIZES) -> DomainData:
    """Four domains x C classes; image n carries its index in pixels (0, 0, 0) + 256 (0, 0, 1) and the file name
    ``<domain>/class_<c>/img_<i>.png``. Domains in ``official`` have split files: image i of a class is
    validation when i % 4 == 1, test when i % 4 == 2, else training."""
    ys, doms, splits, files = [], [], [], []
    for d, per_class in enumerate(sizes):
        for c in range(C):
            for i in range(per_class):
                ys.append(c)
                doms.append(d)
                kind = (SPLIT_VAL if i % 4 == 1 else SPLIT_TEST if i % 4 == 2 else SPLIT_TRAIN) if d in official \
                    else SPLIT_TRAIN
                splits.append(kind)
                files.append(f"{NAMES[d]}/class_{c}/img_{i:03d}.png")
    n = len(ys)
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    ids = torch.arange(n)
    x[:, 0, 0, 0] = (ids % 256).to(torch.uint8)
    x[:, 0, 0, 1] = (ids // 256).to(torch.uint8)
    x[:, 1] = torch.tensor(doms, dtype=torch.uint8).view(n, 1, 1)
    return DomainData(domains=list(NAMES), x=x, y=torch.tensor(ys), domain=torch.tensor(doms),
                      split=torch.tensor(splits), num_classes=C, class_names=[f"class_{c}" for c in range(C)],
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), files=files)


class FakeDomains(DomainSource):
    """A multi-domain source over :func:`make_domain_data`."""

    name = "fake_domains"
    domains: ClassVar[tuple[str, ...]] = NAMES

    def __init__(self, official: tuple[int, ...] = ()) -> None:
        self.official = official

    def load(self) -> DomainData:
        return make_domain_data(self.official)


def arrays(data: DomainData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return data.y.numpy(), data.domain.numpy(), data.split.numpy()


def split_of(data: DomainData, target: int, layout: str = "per_domain", **kwargs):
    return leave_one_domain_out(*arrays(data), target, layout, **kwargs)


def decode_ids(x: torch.Tensor) -> np.ndarray:
    """The original image indices encoded in the pixels of :func:`make_domain_data`."""
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).numpy()


LAYOUT_KWARGS = [("per_domain", {}), ("clients_per_domain", {"clients_per_domain": 2}),
                 ("clients_per_domain", {"clients_per_domain": 3, "domain_alpha": 0.0}), ("centralized", {})]


# -- leave_one_domain_out ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,kwargs,expected", [
    ("per_domain", {}, 3), ("clients_per_domain", {"clients_per_domain": 2}, 6),
    ("clients_per_domain", {"clients_per_domain": 3, "domain_alpha": 0.5}, 9), ("centralized", {}, 1)])
@pytest.mark.parametrize("target", [0, 3])
def test_client_counts_per_layout(layout, kwargs, expected, target):
    ds = split_of(make_domain_data(), target, layout, **kwargs)
    assert len(ds.train) == len(ds.client_val) == expected
    assert ds.target == target and ds.sources == [d for d in range(4) if d != target]
    assert all(t.size > 0 for t in ds.train)


@pytest.mark.parametrize("layout,kwargs", LAYOUT_KWARGS)
@pytest.mark.parametrize("official", [(), (0, 1, 2, 3)])
@pytest.mark.parametrize("target", [1, 2])
def test_train_val_test_partition_the_images(layout, kwargs, official, target):
    data = make_domain_data(official, sizes=(24, 28, 32, 20))  # enough training images for 6 Dirichlet clients
    _, dom, _ = arrays(data)
    ds = split_of(data, target, layout, **kwargs)
    train = np.concatenate(ds.train)
    assert np.unique(train).size == train.size  # no image in two clients
    for part in (*ds.train, ds.val, ds.test):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    assert not set(train) & set(ds.val) and not set(train) & set(ds.test) and not set(ds.val) & set(ds.test)
    assert set(train) | set(ds.val) == set(np.flatnonzero(dom != target))  # every source image, once
    np.testing.assert_array_equal(ds.test, np.flatnonzero(dom == target))  # every target image, whatever its split


@pytest.mark.parametrize("layout,kwargs", LAYOUT_KWARGS)
@pytest.mark.parametrize("target", range(4))
def test_no_target_domain_file_in_any_client_split(layout, kwargs, target):
    data = make_domain_data(official=(0, 2))
    _, dom, _ = arrays(data)
    files = np.array(data.files)
    ds = split_of(data, target, layout, **kwargs)
    prefix = f"{NAMES[target]}/"
    for k, (tr, va) in enumerate(zip(ds.train, ds.client_val)):
        for part in (tr, va):
            assert not np.any(dom[part] == target), k
            assert not any(f.startswith(prefix) for f in files[part]), k
    assert not any(f.startswith(prefix) for f in files[ds.val])
    assert all(f.startswith(prefix) for f in files[ds.test]) and len(ds.test) == C * SIZES[target]


def test_official_split_ids_are_respected_and_other_domains_use_val_fraction():
    data = make_domain_data(official=(0, 1))  # domains 2 and 3 have no split files
    _, dom, split = arrays(data)
    ds = split_of(data, target=1, val_fraction=0.25, seed=3)
    # Domain 0 (source, official): its val and test images are validation, its training images stay training.
    assert set(ds.train[0]) == set(np.flatnonzero((dom == 0) & (split == SPLIT_TRAIN)))
    assert set(ds.val[dom[ds.val] == 0]) == set(np.flatnonzero((dom == 0) & (split != SPLIT_TRAIN)))
    assert np.any(split[ds.val] == SPLIT_TEST) and np.any(split[ds.val] == SPLIT_VAL)
    # Domain 1 is the target: its official train / val / test images are all test images.
    assert set(split[ds.test]) == {SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST}
    # Domains 2 and 3: a seeded val_fraction hold-out.
    for client, d in ((1, 2), (2, 3)):
        n = C * SIZES[d]
        held = ds.val[dom[ds.val] == d]
        assert held.size == round(0.25 * n) and ds.train[client].size == n - held.size
        assert set(dom[ds.train[client]]) == {d}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5])
def test_val_fraction_hold_out_without_official_split(fraction):
    data = make_domain_data()
    _, dom, _ = arrays(data)
    ds = split_of(data, target=0, val_fraction=fraction, seed=1)
    for d in (1, 2, 3):
        assert int((dom[ds.val] == d).sum()) == int(round(fraction * C * SIZES[d]))
    again = split_of(data, target=0, val_fraction=fraction, seed=1)
    np.testing.assert_array_equal(again.val, ds.val)  # deterministic
    if fraction:
        other = split_of(data, target=0, val_fraction=fraction, seed=2)
        assert not np.array_equal(other.val, ds.val)  # the seed draws the hold-out
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_of(data, target=0, val_fraction=bad)


@pytest.mark.parametrize("layout,kwargs", LAYOUT_KWARGS)
def test_client_validation_is_the_validation_of_its_domains(layout, kwargs):
    data = make_domain_data(official=(2,))
    _, dom, _ = arrays(data)
    ds = split_of(data, target=3, layout=layout, val_fraction=0.2, **kwargs)
    for tr, va in zip(ds.train, ds.client_val):
        held = set(np.unique(dom[tr]))
        np.testing.assert_array_equal(va, np.sort(ds.val[np.isin(dom[ds.val], list(held))]))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_clients_per_domain_with_nonpositive_alpha_gives_pure_even_clients(alpha):
    data = make_domain_data()
    _, dom, _ = arrays(data)
    ds = split_of(data, target=2, layout="clients_per_domain", clients_per_domain=3, domain_alpha=alpha)
    assert len(ds.train) == 9
    for j, d in enumerate(ds.sources):
        parts = ds.train[3 * j : 3 * j + 3]
        for part in parts:
            assert set(dom[part]) == {d}
        sizes = [p.size for p in parts]
        assert max(sizes) - min(sizes) <= 1
        pool = np.flatnonzero(dom == d)
        assert set(np.concatenate(parts)) | set(ds.val[dom[ds.val] == d]) == set(pool)


def test_clients_per_domain_with_positive_alpha_mixes_domains():
    data = make_domain_data(sizes=(40, 40, 40, 40))
    _, dom, _ = arrays(data)
    ds = split_of(data, target=0, layout="clients_per_domain", clients_per_domain=2, domain_alpha=1.0)
    domains_per_client = [np.unique(dom[t]).size for t in ds.train]
    assert max(domains_per_client) >= 2
    # Each source domain's training images are all spread over the clients (Dirichlet over all K clients).
    train = np.concatenate(ds.train)
    for d in ds.sources:
        assert int((dom[train] == d).sum()) + int((dom[ds.val] == d).sum()) == 3 * 40


def test_errors():
    data = make_domain_data()
    with pytest.raises(ValueError, match=r"clients_per_domain left client\(s\) \[.*\] without images"):
        split_of(data, target=0, layout="clients_per_domain", clients_per_domain=6, domain_alpha=1e-3)
    with pytest.raises(ValueError, match="unknown domain_layout 'ring'; valid layouts: per_domain"):
        split_of(data, target=0, layout="ring")
    with pytest.raises(ValueError, match=r"target domain id 7 not among the domain ids \[0, 1, 2, 3\]"):
        split_of(data, target=7)
    with pytest.raises(ValueError, match="clients_per_domain must be >= 1"):
        split_of(data, target=0, layout="clients_per_domain", clients_per_domain=0)
    assert DOMAIN_LAYOUTS == ("per_domain", "clients_per_domain", "centralized")


def test_same_seed_same_split_for_every_layout():
    data = make_domain_data()
    for layout, kwargs in LAYOUT_KWARGS:
        a = split_of(data, 1, layout, seed=5, **kwargs)
        b = split_of(data, 1, layout, seed=5, **kwargs)
        for x, y in zip(a.train + a.client_val + [a.val, a.test], b.train + b.client_val + [b.val, b.test]):
            np.testing.assert_array_equal(x, y)


# -- FederatedDataset on a fake source (image identity in the pixels) --------------------------------------------------
@pytest.mark.parametrize("layout,kwargs", [("per_domain", {}), ("clients_per_domain", {"clients_per_domain": 2}),
                                           ("centralized", {})])
@pytest.mark.parametrize("target", ["art", "sketch"])
def test_federated_dataset_never_trains_or_validates_on_the_target(layout, kwargs, target):
    raw = make_domain_data(official=(1,))
    files = np.array(raw.files)
    data = FederatedDataset(FakeDomains(official=(1,)), target_domain=target, domain_layout=layout,
                            imbalance_factor=1, augment=False, val_fraction=0.2, **kwargs)
    data.setup("cpu")
    t = NAMES.index(target)
    train_ids, val_ids, test_ids = decode_ids(data.train.x), decode_ids(data.val.x), decode_ids(data.test.x)
    # The stored domain ids and labels are those of the decoded images.
    for split, ids in ((data.train, train_ids), (data.val, val_ids), (data.test, test_ids)):
        np.testing.assert_array_equal(split.domain.numpy(), raw.domain.numpy()[ids])
        np.testing.assert_array_equal(split.y.numpy(), raw.y.numpy()[ids])
    prefix = f"{target}/"
    for k in range(data.num_clients):
        for ids in (train_ids[data.client_indices[k].numpy()], val_ids[data.client_val_indices[k].numpy()]):
            assert ids.size and not any(f.startswith(prefix) for f in files[ids])
    assert not any(f.startswith(prefix) for f in files[np.concatenate([train_ids, val_ids])])
    np.testing.assert_array_equal(np.sort(test_ids), np.flatnonzero(raw.domain.numpy() == t))
    assert set(train_ids) | set(val_ids) == set(np.flatnonzero(raw.domain.numpy() != t))
    counts = np.stack([np.bincount(raw.domain.numpy()[train_ids[c.numpy()]], minlength=4)
                       for c in data.client_indices])
    np.testing.assert_array_equal(data.client_domain_counts, counts)
    assert counts[:, t].sum() == 0


# -- FederatedDataset on the embedded digit_domains --------------------------------------------------------------------
def dg(target: str = "textured", **kwargs) -> FederatedDataset:
    kwargs.setdefault("imbalance_factor", 1)
    return FederatedDataset(EmbeddedDigitDomains(**DG), target_domain=target, augment=False, **kwargs)


def test_get_batch_returns_images_labels_and_domain_ids():
    data = dg("textured")
    data.setup("cpu")
    raw = EmbeddedDigitDomains(**DG).load()
    mean = torch.tensor(raw.mean).view(1, 3, 1, 1)
    std = torch.tensor(raw.std).view(1, 3, 1, 1)
    source_ids = {0, 2, 3}
    for split, allowed in ((data.train, source_ids), (data.val, source_ids), (data.test, {1})):
        idx = torch.arange(0, len(split), 7)
        batch = data.get_batch(split, idx, None, train=False)
        assert len(batch) == 3
        x, y, d = batch
        assert x.dtype == torch.float32 and x.shape == (idx.numel(), 3, 16, 16)
        assert y.dtype == d.dtype == torch.int64
        assert set(d.tolist()) == allowed
        torch.testing.assert_close(d, split.domain[idx])
    # The training batch is the normalised raw images of the kept indices, with their labels and domains.
    idx = torch.arange(0, len(data.train), 11)
    x, y, d = data.get_batch(data.train, idx, None, train=False)
    orig = torch.from_numpy(data.lt_indices)[idx]
    torch.testing.assert_close(x, (raw.x[orig].float() / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, raw.y[orig])
    torch.testing.assert_close(d, raw.domain[orig])
    # Every test image is a target image and every target image is a test image.
    assert len(data.test) == int((raw.domain == 1).sum()) == 300


def test_summary_of_a_domain_split():
    data = dg("thick", domain_layout="per_domain")
    data.setup("cpu")
    s = data.summary()
    json.dumps(s)
    assert s["domains"] == list(DG_DOMAINS) and s["target_domain"] == "thick"
    assert s["source_domains"] == ["plain", "textured", "inverted"]
    assert s["domain_layout"] == "per_domain" and s["clients_per_domain"] is None and s["domain_alpha"] is None
    assert s["client_domain_counts"] == [[250, 0, 0, 0], [0, 250, 0, 0], [0, 0, 250, 0]]  # 25 train x 10 classes
    assert s["num_clients"] == 3 and s["train_size"] == 750 and s["val_size"] == 150 and s["test_size"] == 300
    assert s["local_test_sizes"] == [0, 0, 0]  # domain data evaluates no personalised model by default
    mixed = dg("plain", domain_layout="clients_per_domain", clients_per_domain=2, domain_alpha=0.0)
    mixed.setup("cpu")
    s = mixed.summary()
    assert s["num_clients"] == 6 and s["clients_per_domain"] == 2 and s["domain_alpha"] == 0.0
    assert all(sum(v > 0 for v in row) == 1 for row in s["client_domain_counts"])  # pure domains
    assert [sum(row) for row in zip(*s["client_domain_counts"])] == [0, 250, 250, 250]


def test_imbalance_factor_subsamples_every_source_domain_with_class_0_as_head():
    data = dg("inverted", imbalance_factor=10)
    data.setup("cpu")
    expected = [int(np.floor(25 * 10 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert expected[0] == 25 and expected[-1] == 2
    train_dom, train_y = data.train.domain.numpy(), data.train.y.numpy()
    for d in (0, 1, 3):
        np.testing.assert_array_equal(np.bincount(train_y[train_dom == d], minlength=10), expected)
    assert not np.any(train_dom == 2)
    np.testing.assert_array_equal(data.client_class_counts, np.tile(expected, (3, 1)))
    # Validation and test images are not subsampled.
    val_dom, val_y = data.val.domain.numpy(), data.val.y.numpy()
    for d in (0, 1, 3):
        np.testing.assert_array_equal(np.bincount(val_y[val_dom == d], minlength=10), [5] * 10)
    np.testing.assert_array_equal(np.bincount(data.test.y.numpy(), minlength=10), [30] * 10)


def test_target_domain_errors():
    valid = "plain, textured, inverted, thick, all"
    with pytest.raises(ValueError, match=f"set data.target_domain to one of {valid}"):
        FederatedDataset(EmbeddedDigitDomains(**DG))
    with pytest.raises(ValueError, match=f"unknown target_domain 'mnist' for digit_domains; valid: {valid}"):
        FederatedDataset(EmbeddedDigitDomains(**DG), target_domain="mnist")
    data = FederatedDataset(EmbeddedDigitDomains(**DG), target_domain="all")
    with pytest.raises(ValueError, match="`fedlt fit`"):
        data.setup("cpu")
    assert not data.is_setup
    with pytest.raises(ValueError, match="needs a multi-domain source; digits has no domains"):
        FederatedDataset(EmbeddedDigits(image_size=16, train_per_class=20, test_per_class=5, holdout_per_class=5),
                         target_domain="plain")
    with pytest.raises(ValueError, match="unknown domain_layout 'star'"):
        FederatedDataset(EmbeddedDigitDomains(**DG), target_domain="plain", domain_layout="star")
