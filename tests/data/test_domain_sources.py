"""Tests of the folder-backed domain datasets (fedlt.data.domain_sources) on tiny fake trees."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch
from fake_domains import (
    DIGITS_DOMAINS,
    MINI_DOMAINS,
    PACS_CLASSES,
    PACS_DOMAINS,
    fake_color,
    mini_class_names,
    write_fake_digitsdg,
    write_fake_minidomainnet,
    write_fake_officehome,
    write_fake_pacs,
)

from fedlt.data import domain_sources
from fedlt.data.domain_sources import IMAGENET_MEAN, IMAGENET_STD, PACS, DigitsDG, MiniDomainNet, OfficeHome
from fedlt.data.domains import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, DomainData, DomainSource
from fedlt.data.sources import SOURCES, DatasetNotFoundError
from fedlt.data.transforms import ImageAugment


def _check_common(data: DomainData, n: int, size: int, domains: tuple[str, ...]) -> None:
    assert data.x.shape == (n, 3, size, size) and data.x.dtype == torch.uint8
    for t in (data.y, data.domain, data.split):
        assert t.shape == (n,) and t.dtype == torch.int64
    assert data.domains == list(domains)
    assert data.num_classes == len(data.class_names)
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    assert len(data.files) == n
    # Deterministic order: by domain id, then by relative path.
    keys = list(zip(data.domain.tolist(), data.files))
    assert keys == sorted(keys)
    assert len(set(data.files)) == n
    # Every fake image is one flat colour encoding (class, domain): pixels, labels and domains agree.
    expected = torch.tensor([fake_color(int(y), int(d)) for y, d in zip(data.y, data.domain)])
    diff = (data.x.float().mean(dim=(2, 3)) - expected).abs()
    assert diff.max() <= 4.0  # JPEG of a flat colour is within a couple of levels


def _no_office_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OfficeHome, "num_expected_classes", None)


def test_registry_keys_and_types() -> None:
    for key, cls in (("pacs", PACS), ("digitsdg", DigitsDG), ("minidomainnet", MiniDomainNet),
                     ("officehome", OfficeHome)):
        assert SOURCES.get(key) is cls
        assert issubclass(cls, DomainSource)
        assert cls.name == key
        assert isinstance(cls.augment, ImageAugment)
        assert "Args:" in (cls.__doc__ or "")
    defaults = {cls: inspect.signature(cls).parameters["image_size"].default
                for cls in (PACS, DigitsDG, MiniDomainNet, OfficeHome)}
    assert defaults == {PACS: 224, DigitsDG: 32, MiniDomainNet: 96, OfficeHome: 224}
    assert DigitsDG.augment.hflip is False and DigitsDG.augment.color_jitter == 0.0
    assert PACS.augment.scale == (0.8, 1.0) and PACS.augment.hflip and PACS.augment.color_jitter == 0.4


def test_pacs_without_splits(tmp_path: Path) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=2)
    data = PACS(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    _check_common(data, 4 * 7 * 2, 8, PACS_DOMAINS)
    assert data.class_names == list(PACS_CLASSES)
    assert (data.split == SPLIT_TRAIN).all()
    assert torch.equal(torch.bincount(data.domain), torch.full((4,), 14))
    assert torch.equal(torch.bincount(data.y), torch.full((7,), 8))
    assert data.files[0] == "art_painting/dog/pic_001.jpg"
    assert data.files[-1] == "sketch/person/pic_002.png"
    for f, y, d in zip(data.files, data.y.tolist(), data.domain.tolist()):
        dom, cls, _ = f.split("/")
        assert dom == PACS_DOMAINS[d] and cls == PACS_CLASSES[y]


@pytest.mark.parametrize("kfold", [False, True])
def test_pacs_official_splits(tmp_path: Path, kfold: bool) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=3, with_splits=True, kfold=kfold)
    data = PACS(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    _check_common(data, 4 * 7 * 3, 8, PACS_DOMAINS)
    want = {"pic_001": SPLIT_TRAIN, "pic_002": SPLIT_VAL, "pic_003": SPLIT_TEST}
    assert [want[f.rsplit("/", 1)[1].split(".")[0]] for f in data.files] == data.split.tolist()
    assert all(f.startswith("kfold/") == kfold for f in data.files)


def test_pacs_kfold_without_splits(tmp_path: Path) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=1, kfold=True)
    data = PACS(str(root), image_size=4, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    assert data.files[0] == "kfold/art_painting/dog/pic_001.jpg" and (data.split == SPLIT_TRAIN).all()


def test_digitsdg(tmp_path: Path) -> None:
    root = write_fake_digitsdg(tmp_path / "digitsdg", per_class=2)
    data = DigitsDG(str(root), cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    _check_common(data, 4 * 2 * 10 * 2, 32, DIGITS_DOMAINS)
    assert data.class_names == [str(c) for c in range(10)]
    assert [SPLIT_TRAIN if "/train/" in f else SPLIT_VAL for f in data.files] == data.split.tolist()
    assert (data.split == SPLIT_VAL).sum() == 80
    assert data.files[0] == "mnist/train/0/train_00000.png"


def test_minidomainnet_uses_only_listed_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MiniDomainNet, "num_expected_classes", 3)
    root = write_fake_minidomainnet(tmp_path / "domainnet", classes=3, per_class=3)
    data = MiniDomainNet(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    _check_common(data, 4 * 3 * 3, 8, MINI_DOMAINS)
    assert data.class_names == mini_class_names(3)  # ordered by label, not alphabetically
    assert data.class_names != sorted(data.class_names)
    assert all(f.rsplit("_", 1)[1] != "000003.jpg" for f in data.files)  # the unlisted images are left out
    assert [SPLIT_TRAIN if f.endswith("_000000.jpg") else SPLIT_TEST for f in data.files] == data.split.tolist()


def test_minidomainnet_default_size_and_class_count(tmp_path: Path) -> None:
    root = write_fake_minidomainnet(tmp_path / "domainnet", classes=2, per_class=1, unlisted=False)
    with pytest.raises(DatasetNotFoundError, match="expected 126"):
        MiniDomainNet(str(root), cache_dir=str(tmp_path / "cache")).load()


@pytest.mark.parametrize(
    "folders",
    [
        ("Art", "Clipart", "Product", "Real World"),
        ("Art", "Clipart", "Product", "Real_World"),
        ("art", "clipart", "product", "real_world"),
        ("ART", "CLIPART", "PRODUCT", "RealWorld"),
    ],
)
def test_officehome_domain_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folders: tuple[str, ...]) -> None:
    _no_office_count(monkeypatch)
    root = write_fake_officehome(tmp_path / "office_home", classes=3, per_class=2, domain_folders=folders)
    data = OfficeHome(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    _check_common(data, 4 * 3 * 2, 8, ("Art", "Clipart", "Product", "Real_World"))
    assert data.class_names == ["Class_00", "Class_01", "Class_02"]
    assert (data.split == SPLIT_TRAIN).all()
    assert data.files[-1] == f"{folders[3]}/Class_02/00002.jpg"


def test_officehome_class_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fake_officehome(tmp_path / "office_home", classes=3)
    with pytest.raises(DatasetNotFoundError, match="expected 65"):
        OfficeHome(str(root), image_size=8, cache_dir=str(tmp_path / "cache")).load()
    _no_office_count(monkeypatch)
    shutil.rmtree(root / "Product" / "Class_01")
    with pytest.raises(DatasetNotFoundError, match="missing: Class_01") as err:
        OfficeHome(str(root), image_size=8, cache_dir=str(tmp_path / "cache")).load()
    assert "hemanthdv.org/officeHomeDataset.html" in str(err.value)


def test_cache_is_reused_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=1)
    cache = tmp_path / "cache"
    src = PACS(str(root), image_size=8, cache_dir=str(cache), num_workers=0)
    first = src.load()
    assert src.last_build_s is not None
    assert "decoding 28 images of pacs once; cached at" in capsys.readouterr().err
    (path,) = cache.glob("*.pt")
    assert path.name.startswith("pacs-8-")

    def fail(path: str, size: int) -> torch.Tensor:
        raise AssertionError("decoded although the cache exists")

    monkeypatch.setattr(domain_sources, "_decode", fail)
    second = PACS(str(root), image_size=8, cache_dir=str(cache), num_workers=0).load()
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y) and first.files == second.files
    assert capsys.readouterr().err == ""
    # Another image size or file list is another cache entry (and would decode).
    with pytest.raises(AssertionError, match="decoded"):
        PACS(str(root), image_size=4, cache_dir=str(cache), num_workers=0).load()
    (root / "photo" / "dog" / "pic_002.jpg").write_bytes((root / "photo" / "dog" / "pic_001.jpg").read_bytes())
    with pytest.raises(AssertionError, match="decoded"):
        PACS(str(root), image_size=8, cache_dir=str(cache), num_workers=0).load()


def test_default_cache_dir_and_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLT_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(domain_sources, "_DECODE_CHUNK", 5)  # several chunks: the thread pool is used
    root = write_fake_pacs(tmp_path / "PACS", per_class=2)
    threaded = PACS(str(root), image_size=8, num_workers=2).load()
    assert len(list((tmp_path / "env-cache").glob("pacs-8-*.pt"))) == 1
    serial = PACS(str(root), image_size=8, cache_dir=str(tmp_path / "other"), num_workers=0).load()
    assert torch.equal(threaded.x, serial.x) and threaded.files == serial.files


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=1)
    (root / "cartoon" / "horse" / "pic_001.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="cartoon/horse/pic_001.jpg"):
        PACS(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0).load()


# ------------------------------------------------------------------------------------------------ missing data
def _expect_missing(src: DomainSource, *needles: str) -> str:
    with pytest.raises(DatasetNotFoundError) as err:
        src.load()
    msg = str(err.value)
    assert "Expected layout" in msg and "To get it:" in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    return msg


_PACS_HINT = "domaingeneralization.github.io"


def test_missing_root_messages(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    cases = [
        (PACS, ("art_painting/", "dog/", _PACS_HINT, "domainbed.scripts.download")),
        (DigitsDG, ("mnist_m/", "train/", "Dassl.pytorch/blob/master/DATASETS.md#digits-dg")),
        (MiniDomainNet, ("splits_mini/", "clipart_train.txt", "ai.bu.edu/M3SDA", "Dassl.pytorch")),
        (OfficeHome, ("Real_World/", "hemanthdv.org/officeHomeDataset.html")),
    ]
    for cls, needles in cases:
        msg = _expect_missing(cls(str(missing), cache_dir=str(tmp_path / "cache")), str(missing), "does not exist",
                              *needles)
        assert "\n    " in msg  # an indented tree


def test_pacs_missing_domain_class_and_images(tmp_path: Path) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=1)
    src = PACS(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0)
    shutil.rmtree(root / "sketch")
    _expect_missing(src, "sketch", str(root), _PACS_HINT)
    write_fake_pacs(root, per_class=1)
    shutil.rmtree(root / "cartoon" / "giraffe")
    _expect_missing(src, "missing: giraffe", str(root / "cartoon"))
    (root / "cartoon" / "giraffe").mkdir()
    _expect_missing(src, "no images", "giraffe")
    shutil.rmtree(root / "cartoon")
    (root / "cartoon").mkdir()
    _expect_missing(src, "no class folders", str(root / "cartoon"))
    for d in PACS_DOMAINS:
        shutil.rmtree(root / d)
    _expect_missing(src, "none of the domain folders")


def test_pacs_incomplete_split_files(tmp_path: Path) -> None:
    root = write_fake_pacs(tmp_path / "PACS", per_class=2, with_splits=True)
    src = PACS(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0)
    (root / "splits" / "photo_crossval_kfold.txt").unlink()
    _expect_missing(src, "photo_crossval_kfold.txt", str(root / "splits"))
    write_fake_pacs(root, per_class=2, with_splits=True)
    with open(root / "splits" / "cartoon_train_kfold.txt", "a") as f:
        f.write("cartoon/dog/pic_999.jpg 1\n")
    _expect_missing(src, "cartoon/dog/pic_999.jpg", "do not exist")


def test_digitsdg_missing_val_folder(tmp_path: Path) -> None:
    root = write_fake_digitsdg(tmp_path / "digitsdg")
    shutil.rmtree(root / "svhn" / "val")
    _expect_missing(DigitsDG(str(root), cache_dir=str(tmp_path / "cache")), str(root / "svhn" / "val"))
    write_fake_digitsdg(root)
    shutil.rmtree(root / "syn" / "train" / "7")
    _expect_missing(DigitsDG(str(root), cache_dir=str(tmp_path / "cache")), "missing: 7")


def test_minidomainnet_missing_split_file_and_listed_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MiniDomainNet, "num_expected_classes", None)
    root = write_fake_minidomainnet(tmp_path / "domainnet", classes=2, per_class=2)
    src = MiniDomainNet(str(root), image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=0)
    (root / "splits_mini" / "real_test.txt").unlink()
    _expect_missing(src, str(root / "splits_mini" / "real_test.txt"), "ai.bu.edu/M3SDA")
    write_fake_minidomainnet(root, classes=2, per_class=2)
    (root / "painting" / "class_y" / "painting_001_000000.jpg").unlink()
    _expect_missing(src, "painting/class_y/painting_001_000000.jpg", "do not exist")
    shutil.rmtree(root / "sketch")
    _expect_missing(src, "sketch")
