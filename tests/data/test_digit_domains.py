"""Tests of fedlt.data.digit_domains: the embedded four-domain digits (deterministic, cached, distinct, legible)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fedlt.data.digit_domains as digit_domains_module
from fedlt.data.digit_domains import (
    DIGIT_DOMAIN_NAMES,
    DIGIT_DOMAINS_VERSION,
    EmbeddedDigitDomains,
    _domain_plan,
    build_digit_domains,
    digit_domains_class_counts,
    digit_domains_pools,
)
from fedlt.data.domains import SPLIT_TRAIN, SPLIT_VAL, DomainData, DomainSource
from fedlt.data.sources import SOURCES, channel_stats

# floor(100 * 10^(-r / 9)) for r = 0..9
_IF10_COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


@pytest.fixture(scope="module")
def default_dg(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddedDigitDomains, DomainData, float]:
    source = EmbeddedDigitDomains(root=str(tmp_path_factory.mktemp("digit_domains_cache")))
    start = time.perf_counter()
    data = source.load()
    return source, data, time.perf_counter() - start


def _counts(data: DomainData, split: int | None = None) -> np.ndarray:
    """Images per (domain, class), optionally of one split only."""
    keep = np.ones(len(data.y), bool) if split is None else data.split.numpy() == split
    d, y = data.domain.numpy()[keep], data.y.numpy()[keep]
    return np.bincount(d * 10 + y, minlength=40).reshape(4, 10)


def test_registry_and_class_attributes() -> None:
    assert SOURCES.get("digit_domains") is EmbeddedDigitDomains
    assert issubclass(EmbeddedDigitDomains, DomainSource)
    assert EmbeddedDigitDomains.name == "digit_domains"
    assert EmbeddedDigitDomains.domains == ("plain", "textured", "inverted", "thick") == DIGIT_DOMAIN_NAMES
    assert EmbeddedDigitDomains.augment.crop_padding == 2 and not EmbeddedDigitDomains.augment.hflip


def test_default_shapes_dtypes_and_order(default_dg: tuple[EmbeddedDigitDomains, DomainData, float]) -> None:
    source, data, seconds = default_dg
    print(f"EmbeddedDigitDomains default build (cold): {seconds:.2f} s, synthesis {source.last_build_s:.2f} s")
    assert data.x.shape == (8000, 3, 32, 32) and data.x.dtype == torch.uint8
    for t in (data.y, data.domain, data.split):
        assert t.shape == (8000,) and t.dtype == torch.int64
    assert int(data.x.min()) == 0 and int(data.x.max()) == 255
    assert data.domains == list(DIGIT_DOMAIN_NAMES)
    assert data.num_classes == 10 and data.class_names == [str(c) for c in range(10)]
    assert data.files == []
    mean, std = channel_stats(data.x)
    assert data.mean == mean and data.std == std
    # Domain-major, then class-major.
    assert torch.equal(data.domain, torch.arange(4).repeat_interleave(2000))
    assert torch.equal(data.y[:2000], torch.arange(10).repeat_interleave(200))
    # Images vary: the 200 images of one class and domain are not copies of the ~45 source digits.
    for d in range(4):
        assert torch.unique(data.x[(data.domain == d) & (data.y == 3)].flatten(1), dim=0).shape[0] == 200


def test_domain_looks(default_dg: tuple[EmbeddedDigitDomains, DomainData, float]) -> None:
    _, data, _ = default_dg
    x = data.x.float() / 255.0
    plain, textured, inverted, thick = (x[data.domain == d] for d in range(4))
    assert torch.equal(plain[:, 0], plain[:, 1]) and torch.equal(plain[:, 0], plain[:, 2])  # grey
    assert plain.mean() < 0.3  # dark background, bright digit
    assert inverted.mean() > 0.6  # light background, dark digit
    corners = thick[:, :, :2, :2].flatten(2)
    assert (corners.std(2) < 1e-6).float().mean() > 0.95  # flat background
    sat = textured.max(1).values - textured.min(1).values
    assert sat.mean() > 0.2  # coloured


def test_cache_round_trip(
    default_dg: tuple[EmbeddedDigitDomains, DomainData, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data, _ = default_dg
    assert source.cache_path.exists()
    assert source.cache_path.name == f"digit_domains-32-200-20-if1.0-shared-s0-v{DIGIT_DOMAINS_VERSION}.pt"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(digit_domains_module, "build_digit_domains", fail)
    again = EmbeddedDigitDomains(root=source.root)
    start = time.perf_counter()
    cached = again.load()
    print(f"EmbeddedDigitDomains cached load: {time.perf_counter() - start:.3f} s")
    assert again.last_build_s is None
    for name in ("x", "y", "domain", "split"):
        assert torch.equal(getattr(cached, name), getattr(data, name))
    assert cached.mean == data.mean and cached.std == data.std
    assert not list(Path(source.root).glob("*.tmp"))  # atomic write left no temporary file


def test_cache_name_holds_every_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLT_CACHE", str(tmp_path))
    source = EmbeddedDigitDomains(
        image_size=16, per_class=50, val_per_class=5, imbalance_factor=10, imbalance_order="per_domain", seed=2
    )
    assert source.cache_path == tmp_path / f"digit_domains-16-50-5-if10.0-per_domain-s2-v{DIGIT_DOMAINS_VERSION}.pt"


def test_two_builds_bit_identical() -> None:
    params = {"image_size": 16, "per_class": 30, "val_per_class": 5, "seed": 3}
    a, b = build_digit_domains(**params), build_digit_domains(**params)
    c = build_digit_domains(**{**params, "seed": 4})
    for name in ("x", "y", "domain", "split"):
        assert torch.equal(a[name], b[name])
    assert a["x"].shape == (1200, 3, 16, 16)
    assert not torch.equal(a["x"], c["x"])
    for d in range(4):  # every domain depends on the seed
        assert not torch.equal(a["x"][a["domain"] == d], c["x"][c["domain"] == d])


def test_balanced_splits(default_dg: tuple[EmbeddedDigitDomains, DomainData, float]) -> None:
    _, data, _ = default_dg
    assert set(data.split.unique().tolist()) == {SPLIT_TRAIN, SPLIT_VAL}
    assert (_counts(data) == 200).all()
    assert (_counts(data, SPLIT_VAL) == 20).all()
    assert (_counts(data, SPLIT_TRAIN) == 180).all()
    # The last val_per_class images of every (domain, class) block are the validation ones.
    blocks = data.split.view(40, 200)
    assert (blocks[:, 180:] == SPLIT_VAL).all() and (blocks[:, :180] == SPLIT_TRAIN).all()


def test_shared_imbalance_counts(tmp_path: Path) -> None:
    data = EmbeddedDigitDomains(
        root=str(tmp_path), image_size=8, per_class=100, val_per_class=5, imbalance_factor=10.0
    ).load()
    assert _counts(data).tolist() == [_IF10_COUNTS] * 4
    assert (_counts(data, SPLIT_VAL) == 5).all()
    assert _counts(data, SPLIT_TRAIN).tolist() == [[n - 5 for n in _IF10_COUNTS]] * 4
    # Domain-major, class-major order; the last 5 images of each block are validation.
    starts = np.concatenate([[0], np.cumsum(np.tile(_IF10_COUNTS, 4))])
    split = data.split.numpy()
    for s, e in zip(starts[:-1], starts[1:]):
        assert (split[e - 5 : e] == SPLIT_VAL).all() and (split[s : e - 5] == SPLIT_TRAIN).all()
        assert len(set(data.y.numpy()[s:e])) == 1 and len(set(data.domain.numpy()[s:e])) == 1


def test_per_domain_imbalance_counts(tmp_path: Path) -> None:
    kwargs = {"per_class": 100, "val_per_class": 5, "imbalance_factor": 10.0, "imbalance_order": "per_domain"}
    data = EmbeddedDigitDomains(root=str(tmp_path), image_size=8, seed=1, **kwargs).load()
    counts = _counts(data)
    assert counts.tolist() == digit_domains_class_counts(seed=1, **kwargs).tolist()
    for d in range(4):
        assert sorted(counts[d].tolist(), reverse=True) == _IF10_COUNTS
    assert len({int(np.argmax(row)) for row in counts}) > 1  # the head class differs by domain
    assert (_counts(data, SPLIT_VAL) == 5).all()
    # Seeded: same seed, same orders; another seed, other orders.
    assert np.array_equal(digit_domains_class_counts(seed=1, **kwargs), digit_domains_class_counts(seed=1, **kwargs))
    assert not np.array_equal(digit_domains_class_counts(seed=2, **kwargs), counts)


def test_imbalance_keeps_a_training_image_per_class() -> None:
    counts = digit_domains_class_counts(per_class=20, val_per_class=5, imbalance_factor=100.0)
    # floor(20 * 100^(-r/9)) drops below val_per_class + 1 = 6 from r = 3 on.
    assert counts[0].tolist() == [20, 11, 7, 6, 6, 6, 6, 6, 6, 6]
    assert (digit_domains_class_counts(per_class=7, val_per_class=0) == 7).all()


def test_glyph_pools_disjoint() -> None:
    from sklearn.datasets import load_digits

    targets = np.asarray(load_digits().target)
    pools = digit_domains_pools(targets, seed=0)
    assert len(pools) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.intersect1d(pools[i], pools[j]).size == 0
    assert np.array_equal(np.sort(np.concatenate(pools)), np.arange(targets.size))
    per_class = np.stack([np.bincount(targets[p], minlength=10) for p in pools])
    assert (per_class.max(0) - per_class.min(0) <= 1).all() and per_class.min() >= 40
    assert not np.array_equal(digit_domains_pools(targets, seed=1)[0], pools[0])
    assert all(np.array_equal(a, b) for a, b in zip(digit_domains_pools(targets, seed=0), pools))
    # The builder draws each domain's glyphs from its own pool only.
    counts = digit_domains_class_counts(per_class=200)
    for d, pool in enumerate(pools):
        plan = _domain_plan(pool, targets, counts[d])
        assert np.isin(plan, pool).all()
        assert np.array_equal(targets[plan], np.repeat(np.arange(10), 200))


def _colour_stats(x: Tensor) -> np.ndarray:
    """Per image: per-channel mean and std, per-channel std of the 2-pixel border, mean saturation."""
    x = x.float() / 255.0
    border = torch.ones(x.shape[-2:], dtype=torch.bool)
    border[2:-2, 2:-2] = False
    sat = (x.max(1).values - x.min(1).values).mean((1, 2))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, border].std(2), sat[:, None]], 1).numpy()


def test_domains_distinct(default_dg: tuple[EmbeddedDigitDomains, DomainData, float]) -> None:
    _, data, _ = default_dg
    f, d = _colour_stats(data.x), data.domain.numpy()
    perm = np.random.default_rng(0).permutation(len(d))
    tr, te = perm[: len(d) // 2], perm[len(d) // 2 :]
    mu, sd = f[tr].mean(0), f[tr].std(0)
    z = (f - mu) / sd
    centroids = np.stack([z[tr][d[tr] == k].mean(0) for k in range(4)])
    pred = np.argmin(((z[te][:, None] - centroids[None]) ** 2).sum(-1), 1)
    accuracy = float((pred == d[te]).mean())
    print(f"nearest-centroid domain accuracy on colour statistics: {accuracy:.3f}")
    assert accuracy > 0.9


def _digit_features(x: Tensor) -> np.ndarray:
    """A domain-agnostic digit map: distance to the median (background) colour, smoothed, binarised on the top
    20 % of pixels, centred on its centre of mass and pooled 2x2."""
    x = x.float() / 255.0
    med = x.flatten(2).median(2).values[:, :, None, None]
    s = F.avg_pool2d((x - med).abs().sum(1, keepdim=True), 3, 1, 1, count_include_pad=False)
    s = (s >= torch.quantile(s.flatten(1), 0.8, dim=1)[:, None, None, None]).float()
    size = s.shape[-1]
    r = torch.arange(size, dtype=torch.float32)
    w = s.sum((1, 2, 3))
    cy, cx = (s.sum(3)[:, 0] * r).sum(1) / w, (s.sum(2)[:, 0] * r).sum(1) / w
    centre = (size - 1) / 2
    s = torch.stack(
        [
            torch.roll(im, (round(centre - a), round(centre - b)), (1, 2))
            for im, a, b in zip(s, cy.tolist(), cx.tolist())
        ]
    )
    return F.avg_pool2d(s, 2).flatten(1).numpy()


def test_digits_legible_per_domain(default_dg: tuple[EmbeddedDigitDomains, DomainData, float]) -> None:
    from sklearn.linear_model import LogisticRegression

    _, data, _ = default_dg
    rng = np.random.default_rng(0)
    for d, name in enumerate(DIGIT_DOMAIN_NAMES):
        idx = rng.permutation(np.flatnonzero(data.domain.numpy() == d))
        cut = int(0.6 * idx.size)
        feats, y = _digit_features(data.x[idx]), data.y.numpy()[idx]
        clf = LogisticRegression(C=0.1, max_iter=300).fit(feats[:cut], y[:cut])
        accuracy = clf.score(feats[cut:], y[cut:])
        print(f"{name}: linear digit accuracy {accuracy:.3f}")
        assert accuracy > 0.5, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"imbalance_order": "random"}, "imbalance_order"),
        ({"imbalance_factor": 0.5}, "imbalance_factor"),
        ({"imbalance_factor": float("nan")}, "imbalance_factor"),
        ({"val_per_class": 200}, "val_per_class"),
        ({"per_class": 10, "val_per_class": 20}, "per_class"),
        ({"val_per_class": -1}, "val_per_class"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddedDigitDomains(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        build_digit_domains(**kwargs)  # type: ignore[arg-type]
