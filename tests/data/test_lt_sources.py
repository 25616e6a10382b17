"""Tests of ImageNet-LT / Places-LT (fedlt.data.lt_sources) on tiny fake trees, and CIFAR-100 superclasses."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedlt.data import lt_sources
from fedlt.data.domain_sources import IMAGENET_MEAN, IMAGENET_STD
from fedlt.data.lt_sources import ImageNetLT, PlacesLT, decode_center_crop
from fedlt.data.sources import CIFAR100, SOURCES, DatasetNotFoundError, SourceData, cifar100_superclasses
from fedlt.data.transforms import ImageAugment

S = 8  # image side of the tests
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")
NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray")
TRAIN_COUNTS = (4, 3, 2, 2, 1, 1)  # long-tailed, head = class 0
SIZES = ((20, 12), (12, 20), (16, 16), (33, 9), (9, 27))  # (width, height): both orientations, odd ratios
PLACES = ("a/airfield", "a/apartment_building/outdoor", "b/bus_interior", "c/church/indoor", "s/ski_slope",
          "w/water_tower")
PLACES_NAMES = ("airfield", "apartment building outdoor", "bus interior", "church indoor", "ski slope",
                "water tower")


def color(label: int) -> tuple[int, int, int]:
    """The flat colour of every fake image of class ``label`` (channels far apart)."""
    return (20 + 40 * label, 230 - 35 * label, 60 + 25 * (label % 3))


def _jpeg(path: Path, size: tuple[int, int], label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color(label)).save(path, quality=95)


def _write_lines(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))


def write_fake_imagenet_lt(root: Path, class_names: bool = True, val: bool = False) -> Path:
    """A 6-class ImageNet-LT: train/<wnid>/*.JPEG (4, 3, 2, 2, 1, 1 per class), val/<wnid>/* (1 test per class)."""
    train, test, k = [], [], 0
    for c, wnid in enumerate(WNIDS):
        for i in range(TRAIN_COUNTS[c]):
            rel = f"train/{wnid}/{wnid}_{100 + i}.JPEG"
            _jpeg(root / rel, SIZES[k % len(SIZES)], c)
            train.append((rel, c))
            k += 1
        rel = f"val/{wnid}/ILSVRC2012_val_{c:08d}.JPEG"
        _jpeg(root / rel, SIZES[c % len(SIZES)], c)
        test.append((rel, c))
    train = train[1::2] + train[::2]  # not sorted by class: labels must follow the file's order
    _write_lines(root / "ImageNet_LT_train.txt", train)
    _write_lines(root / "ImageNet_LT_test.txt", test[::-1])
    if val:
        _write_lines(root / "ImageNet_LT_val.txt", test[:3])
    if class_names:
        (root / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS[::-1], NAMES[::-1])))
    return root


def write_fake_places_lt(root: Path) -> Path:
    """A 6-class Places-LT: data_256/<letter>/<category>/*.jpg and val_256/Places365_val_*.jpg (no class folder)."""
    train, test = [], []
    for c, category in enumerate(PLACES):
        for i in range(TRAIN_COUNTS[c]):
            rel = f"data_256/{category}/{i:08d}.jpg"
            _jpeg(root / rel, (16, 16), c)
            train.append((rel, c))
        rel = f"val_256/Places365_val_{c + 1:08d}.jpg"
        _jpeg(root / rel, (16, 16), c)
        test.append((rel, c))
    _write_lines(root / "Places_LT_train.txt", train)
    _write_lines(root / "Places_LT_test.txt", test)
    return root


def _split_labels(path: Path) -> list[int]:
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.strip()]


def _check_colors(x: torch.Tensor, y: torch.Tensor) -> None:
    expected = torch.tensor([color(int(c)) for c in y], dtype=torch.float64)
    assert (x.double().mean(dim=(2, 3)) - expected).abs().max() <= 4.0  # JPEG of a flat colour


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file mapped at the tensor's memory (from /proc/self/maps), or None for anonymous (heap) memory."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 and parts[5].startswith("/") else None
    return None


@pytest.fixture(autouse=True)
def _fake_class_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageNetLT, "num_expected_classes", None)
    monkeypatch.setattr(PlacesLT, "num_expected_classes", None)


def test_registry_and_defaults() -> None:
    assert SOURCES.get("imagenet_lt") is ImageNetLT and SOURCES.get("places_lt") is PlacesLT
    for cls in (ImageNetLT, PlacesLT):
        assert isinstance(cls.augment, ImageAugment) and cls.augment.scale == (0.08, 1.0) and cls.augment.hflip
        assert "Args:" in (cls.__doc__ or "")
    src = ImageNetLT()
    assert (src.root, src.image_root, src.image_size, src.val_as_test) == ("data/ImageNet_LT", None, 224, False)
    assert PlacesLT().root == "data/Places_LT"


def test_imagenet_lt_values(tmp_path: Path) -> None:
    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT")
    data = ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache"), num_workers=0).load()
    n_train = sum(TRAIN_COUNTS)
    assert data.train_x.shape == (n_train, 3, S, S) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, S, S) and data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == torch.int64 and data.test_y.dtype == torch.int64
    assert data.train_y.tolist() == _split_labels(root / "ImageNet_LT_train.txt")
    assert data.test_y.tolist() == [5, 4, 3, 2, 1, 0]
    assert torch.bincount(data.train_y).tolist() == list(TRAIN_COUNTS)  # the split is used as is
    assert data.num_classes == 6 and data.class_names == list(NAMES)  # via the wnid, not the file's line order
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    assert data.file_backed and data.superclasses is None
    _check_colors(data.train_x, data.train_y)
    _check_colors(data.test_x, data.test_y)


def test_imagenet_lt_without_classnames_uses_wnids(tmp_path: Path) -> None:
    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT", class_names=False)
    with pytest.warns(UserWarning, match="wnids .* CLIP text prompts will be poor"):
        data = ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()
    assert data.class_names == list(WNIDS)
    # An explicit file elsewhere; a wnid it lacks keeps its wnid (with a warning).
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS[:-1], NAMES[:-1])))
    with pytest.warns(UserWarning, match="no name for 1 wnid"):
        data = ImageNetLT(str(root), class_names_file=str(names), image_size=S,
                          cache_dir=str(tmp_path / "cache")).load()
    assert data.class_names == [*NAMES[:-1], WNIDS[-1]]


def test_imagenet_lt_val_as_test_and_image_root(tmp_path: Path) -> None:
    images = write_fake_imagenet_lt(tmp_path / "images", val=True)
    root = tmp_path / "splits"
    root.mkdir()
    for name in ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt", "ImageNet_LT_val.txt", "classnames.txt"):
        (root / name).write_bytes((images / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # classnames.txt found: no warning
        data = ImageNetLT(str(root), image_root=str(images), image_size=S, val_as_test=True,
                          cache_dir=str(tmp_path / "cache")).load()
    assert data.test_y.tolist() == [0, 1, 2] and data.test_x.shape == (3, 3, S, S)
    _check_colors(data.test_x, data.test_y)


def test_places_lt_names_and_labels(tmp_path: Path) -> None:
    root = write_fake_places_lt(tmp_path / "Places_LT")
    data = PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()
    assert data.class_names == list(PLACES_NAMES)
    assert data.train_x.shape == (sum(TRAIN_COUNTS), 3, S, S) and data.test_x.shape == (6, 3, S, S)
    assert data.train_y.tolist() == _split_labels(root / "Places_LT_train.txt")
    assert data.test_y.tolist() == list(range(6))
    assert data.file_backed and data.mean == IMAGENET_MEAN
    _check_colors(data.train_x, data.train_y)
    _check_colors(data.test_x, data.test_y)


def test_tensors_are_file_backed(tmp_path: Path) -> None:
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps")
    root = write_fake_places_lt(tmp_path / "Places_LT")
    cache = tmp_path / "cache"
    data = PlacesLT(str(root), image_size=S, cache_dir=str(cache)).load()
    files = sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")  # (build locks stay, empty)
    assert len(files) == 2 and files[0].startswith(f"places_lt-test-{S}-") and files[0].endswith(".npy")
    assert files[1].startswith(f"places_lt-train-{S}-") and files[1].endswith(".npy")
    train_file, test_file = _mapped_file(data.train_x), _mapped_file(data.test_x)
    assert train_file is not None and Path(train_file).name.startswith("places_lt-train-")
    assert test_file is not None and Path(test_file).name.startswith("places_lt-test-")
    assert np.array_equal(np.load(train_file), data.train_x.numpy())
    assert _mapped_file(data.train_x.clone()) is None  # the check tells heap memory apart
    # Copy-on-write: writing to the tensor does not change the cache file.
    before = np.load(train_file).copy()
    data.train_x[0] = 0
    assert np.array_equal(np.load(train_file), before)


def test_center_crop_and_resize(tmp_path: Path) -> None:
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    # 300x100: green | red, blue | green thirds; the centre crop keeps exactly the middle third (red | blue).
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, :100] = wide[:, 200:] = (0, 255, 0)
    wide[:, 100:150] = (255, 0, 0)
    wide[:, 150:200] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    x = decode_center_crop(str(path), 40)
    assert x.shape == (3, 40, 40) and x.dtype == np.uint8
    red, blue = np.array([255, 0, 0])[:, None, None], np.array([0, 0, 255])[:, None, None]
    assert (x[:, :, 1:19] == red).all() and (x[:, :, 21:39] == blue).all()
    assert (x[1, :, 1:39] == 0).all() and x[1].max() <= 20  # no green inside: the side thirds are cropped away
    # The transposed (tall) image gives the transposed result.
    Image.fromarray(wide.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    assert np.array_equal(decode_center_crop(str(tmp_path / "tall.png"), 40), x.transpose(0, 2, 1))
    # Same as torchvision's Resize(S, bicubic) + CenterCrop(S), on both orientations and odd ratios.
    rng = np.random.default_rng(0)
    for w, h in ((60, 20), (20, 60), (33, 9), (9, 27), (8, 8), (5, 7)):
        p = tmp_path / f"r{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        ref = CenterCrop(S)(Resize(S, interpolation=InterpolationMode.BICUBIC)(Image.open(p).convert("RGB")))
        assert np.array_equal(decode_center_crop(str(p), S), np.asarray(ref).transpose(2, 0, 1)), (w, h)
    # Grey and RGBA files become RGB.
    Image.new("L", (10, 10), 77).save(tmp_path / "grey.png")
    assert (decode_center_crop(str(tmp_path / "grey.png"), 4) == 77).all()


def test_cache_reused_and_rebuilt_when_split_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT")
    cache = tmp_path / "cache"
    src = ImageNetLT(str(root), image_size=S, cache_dir=str(cache), num_workers=0)
    first = src.load()
    assert src.last_build_s is not None
    assert f"decoding {sum(TRAIN_COUNTS)} train images of imagenet_lt once into" in capsys.readouterr().err
    decoded: list[str] = []

    def counting(path: str, size: int) -> np.ndarray:
        decoded.append(path)
        return np.zeros((3, size, size), dtype=np.uint8)

    def fail(path: str, size: int) -> np.ndarray:
        raise AssertionError("decoded although the cache exists")

    monkeypatch.setattr(lt_sources, "decode_center_crop", fail)
    again = ImageNetLT(str(root), image_size=S, cache_dir=str(cache), num_workers=0)
    second = again.load()
    assert again.last_build_s is None and capsys.readouterr().err == ""
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    # Another size is another cache entry.
    with pytest.raises(AssertionError, match="decoded"):
        ImageNetLT(str(root), image_size=4, cache_dir=str(cache), num_workers=0).load()
    # A changed test split decodes the test images only; a changed train split decodes the train images.
    monkeypatch.setattr(lt_sources, "decode_center_crop", counting)
    test_file = root / "ImageNet_LT_test.txt"
    test_file.write_text("".join(test_file.read_text().splitlines(keepends=True)[:4]))
    changed = ImageNetLT(str(root), image_size=S, cache_dir=str(cache), num_workers=0).load()
    assert len(decoded) == 4 and all("/val/" in p for p in decoded)
    assert changed.test_y.tolist() == [5, 4, 3, 2] and torch.equal(changed.train_x, first.train_x)
    decoded.clear()
    train_file = root / "ImageNet_LT_train.txt"
    lines = train_file.read_text().splitlines(keepends=True)
    dropped = next(i for i, line in enumerate(lines) if line.endswith(" 0\n"))
    train_file.write_text("".join(lines[:dropped] + lines[dropped + 1:]))  # one head image less
    shorter = ImageNetLT(str(root), image_size=S, cache_dir=str(cache), num_workers=0).load()
    assert len(decoded) == sum(TRAIN_COUNTS) - 1 and all("/train/" in p for p in decoded)
    assert torch.bincount(shorter.train_y).tolist() == [3, *TRAIN_COUNTS[1:]]
    assert len(list(cache.glob("imagenet_lt-train-*.npy"))) == 2  # the old and the new split (size 4 failed)
    assert not list(cache.glob("*.tmp"))


def test_threads_progress_and_no_partial_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(lt_sources, "_DECODE_CHUNK", 2)
    monkeypatch.setattr(lt_sources, "_PROGRESS_EVERY", 4)
    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT")
    threaded = ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "a"), num_workers=3).load()
    assert "imagenet_lt train: 4/13 images" in capsys.readouterr().err
    serial = ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "b"), num_workers=0).load()
    assert torch.equal(threaded.train_x, serial.train_x) and torch.equal(threaded.test_x, serial.test_x)
    # A corrupt image: the error names it, and neither a cache file nor a temporary file is left behind.
    bad = root / "train" / WNIDS[2] / f"{WNIDS[2]}_101.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match=f"{WNIDS[2]}_101.JPEG"):
        ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "c"), num_workers=3).load()
    assert [p.name for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"] == []


# ------------------------------------------------------------------------------------------------ missing data
def _expect_missing(src: ImageNetLT | PlacesLT, *needles: str) -> str:
    with pytest.raises(DatasetNotFoundError) as err:
        src.load()
    msg = str(err.value)
    assert "Expected layout" in msg and "To get it:" in msg and "OpenLongTailRecognition-OLTR" in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    return msg


def test_missing_imagenet_lt(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    missing = tmp_path / "nowhere"
    msg = _expect_missing(ImageNetLT(str(missing), cache_dir=cache), f"the root folder {missing} does not exist",
                          "image-net.org", "CoOp", "ImageNet_LT_train.txt", "classnames.txt", "val/n01440764/")
    assert issubclass(DatasetNotFoundError, FileNotFoundError) and msg.startswith("imagenet_lt dataset not found")
    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT")
    _expect_missing(ImageNetLT(str(root), image_size=S, val_as_test=True, cache_dir=cache),
                    f"the split file {root / 'ImageNet_LT_val.txt'} does not exist")
    _expect_missing(ImageNetLT(str(root), image_root=str(tmp_path / "no_images"), image_size=S, cache_dir=cache),
                    f"the image folder {tmp_path / 'no_images'} does not exist")
    image = root / "val" / WNIDS[3] / "ILSVRC2012_val_00000003.JPEG"
    image.unlink()
    _expect_missing(ImageNetLT(str(root), image_size=S, cache_dir=cache),
                    f"the image {image} named by {root / 'ImageNet_LT_test.txt'} does not exist (1 of 6")
    (root / "ImageNet_LT_train.txt").unlink()
    _expect_missing(ImageNetLT(str(root), image_size=S, cache_dir=cache),
                    f"the split file {root / 'ImageNet_LT_train.txt'} does not exist")


def test_missing_places_lt_and_class_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_fake_places_lt(tmp_path / "Places_LT")
    (root / "Places_LT_test.txt").unlink()
    _expect_missing(PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")),
                    f"the split file {root / 'Places_LT_test.txt'} does not exist", "places2.csail.mit.edu",
                    "data_256/", "val_256/")
    root = write_fake_places_lt(tmp_path / "Places_LT2")
    monkeypatch.setattr(PlacesLT, "num_expected_classes", 365)
    _expect_missing(PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")),
                    "has 6 classes, expected 365")


def test_malformed_split_files(tmp_path: Path) -> None:
    root = write_fake_places_lt(tmp_path / "Places_LT")
    train = root / "Places_LT_train.txt"
    text = train.read_text()
    train.write_text(text.replace(" 5\n", " 7\n"))
    with pytest.raises(ValueError, match="not 0..C-1"):
        PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()
    train.write_text(text.replace("airfield/00000000.jpg 0", "airfield/00000000.jpg 1"))
    with pytest.raises(ValueError, match="label 1 is given to images of several"):
        PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()
    train.write_text(text + "no_label_here\n")
    with pytest.raises(ValueError, match="expected '<relative path> <integer label>'"):
        PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()
    train.write_text(text)
    (root / "Places_LT_test.txt").write_text("val_256/Places365_val_00000001.jpg 6\n")
    with pytest.raises(ValueError, match=r"labels outside 0..5"):
        PlacesLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache")).load()


# ------------------------------------------------------------------------------------------------ CIFAR-100
FINE_TO_COARSE = (3, 0, 1, 3, 2, 0, 1, 2, 3, 0)  # 10 fake fine classes in 4 superclasses
COARSE_NAMES = ("aquatic_mammals", "fish", "flowers", "food_containers")


def write_fake_cifar100(root: Path, per_class: int = 3, bytes_keys: bool = False) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` pickles in the release's format (10 fine classes)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_class), ("test", 1)):
        fine = np.tile(np.arange(len(FINE_TO_COARSE)), n)[::-1].tolist()
        entry = {
            key("data"): rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
            key("fine_labels"): fine,
            key("coarse_labels"): [FINE_TO_COARSE[f] for f in fine],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {key("fine_label_names"): [f"fine{c}" for c in range(len(FINE_TO_COARSE))],
            key("coarse_label_names"): [n.encode() if bytes_keys else n for n in COARSE_NAMES]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_cifar100_source_has_superclasses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fake files: no md5 match
    write_fake_cifar100(tmp_path)
    data = CIFAR100(str(tmp_path)).load()
    assert data.num_classes == 10 and data.train_x.shape == (30, 3, 32, 32)
    assert isinstance(data.superclasses, np.ndarray) and data.superclasses.dtype == np.int64
    assert data.superclasses.tolist() == list(FINE_TO_COARSE)
    assert data.superclass_names == list(COARSE_NAMES)
    assert not data.file_backed


def test_cifar100_superclasses_helper(tmp_path: Path) -> None:
    folder = write_fake_cifar100(tmp_path / "b", bytes_keys=True)  # as pickle.load(encoding="bytes") sees it
    superclasses, names = cifar100_superclasses(folder)
    assert superclasses.tolist() == list(FINE_TO_COARSE) and names == list(COARSE_NAMES)
    entry = pickle.loads((folder / "train").read_bytes())
    entry[b"coarse_labels"][0] = (entry[b"coarse_labels"][0] + 1) % 4  # one image disagrees
    (folder / "train").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match="have \\[2\\] coarse labels"):
        cifar100_superclasses(folder)
    (folder / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match=str(folder / "meta")):
        cifar100_superclasses(folder)


def test_source_data_defaults_are_backward_compatible() -> None:
    x, y = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    data = SourceData(x, y, x, y, 1, ["a"], (0.5,), (0.5,))
    assert data.superclasses is None and data.superclass_names is None and data.file_backed is False


def test_concurrent_loads_decode_once(tmp_path, monkeypatch) -> None:
    """Ranks sharing a cache directory: the first decodes under a file lock, the others wait and map its file."""
    import threading

    from fedlt.data import lt_sources

    root = write_fake_imagenet_lt(tmp_path / "ImageNet_LT")
    calls = []
    real = lt_sources.decode_center_crop

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(lt_sources, "decode_center_crop", counting)
    results = []

    def load():
        results.append(ImageNetLT(str(root), image_size=S, cache_dir=str(tmp_path / "cache"), num_workers=0).load())

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert len(calls) == len(set(calls))  # every image decoded once, not once per loader
    for r in results[1:]:
        assert torch.equal(r.train_x, results[0].train_x)
