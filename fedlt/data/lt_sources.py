"""ImageNet-LT and Places-LT from the standard split files of Liu et al. 2019 (OLTR), memory-mapped from a cache.

The split files (``ImageNet_LT_{train,val,test}.txt``, ``Places_LT_{train,val,test}.txt``; lines
``<relative image path> <label>``) are the long-tailed subsample: every listed image is used, nothing is
subsampled further (docs/reference.md 1.2). Decoded at 224 px these sets do not fit in RAM (ImageNet-LT train: 115,846
images, 17 GB), so each split is decoded once (PIL, RGB, shorter side resized to ``image_size`` with bicubic
filtering, centre crop: CLIP's test preprocessing) into a uint8 NCHW ``.npy`` file in the cache folder, written
through ``numpy.lib.format.open_memmap`` and renamed into place when complete. Loads map that file
copy-on-write (``np.load(mmap_mode="c")``), so ``train_x`` / ``test_x`` are file-backed tensors paged in by the
OS and ``SourceData.file_backed`` is True. The cache name hashes the split file, the image folder and the size, so
a changed split file is decoded again.

A missing root, split file or image raises :class:`~fedlt.data.sources.DatasetNotFoundError` naming the missing
path, the expected layout and where to get the data.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from torch import Tensor

from fedlt.data.domain_sources import IMAGENET_MEAN, IMAGENET_STD
from fedlt.data.sources import (
    SOURCES,
    DatasetNotFoundError,
    DataSource,
    SourceData,
    dataset_not_found,
    default_cache_dir,
    read_split_file,
)
from fedlt.data.transforms import ImageAugment

__all__ = ["ImageNetLT", "PlacesLT", "decode_center_crop", "read_split_file"]

_CACHE_VERSION = 1  # bump when the decoding changes, so stale caches are not reused
_DECODE_CHUNK = 64  # images per thread-pool task
_PROGRESS_EVERY = 5000  # images between two progress lines on stderr

_OLTR = ("https://github.com/zhmiao/OpenLongTailRecognition-OLTR (the Google Drive links of its README hold the "
         "split files)")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path`` for the block (POSIX ``flock``; no lock where unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds stay correct (atomic rename), only wasteful
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def decode_center_crop(path: str, size: int) -> np.ndarray:
    """One image file as uint8 (3, size, size): RGB, shorter side resized to ``size`` (bicubic), centre crop.

    Matches ``torchvision.transforms.Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image (CLIP's
    preprocessing): the longer side becomes ``int(size * long / short)`` and the crop offset
    ``round((side - size) / 2)``.

    Args:
        path: image file.
        size: side of the output square.

    Returns:
        uint8 array (3, size, size).

    Raises:
        OSError: the file cannot be read or decoded (the message names it).
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            w, h = rgb.size
            if w <= h:
                new_w, new_h = size, int(size * h / w)
            else:
                new_w, new_h = int(size * w / h), size
            if (new_w, new_h) != (w, h):
                rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
            rgb = rgb.crop((left, top, left + size, top + size))
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as err:  # includes PIL.UnidentifiedImageError
        raise OSError(f"cannot decode image {path}: {err}") from err


class _SplitFileLTSource(DataSource):
    """Shared split-file reading, memory-mapped decoding cache and missing-data errors of ImageNet-LT / Places-LT.

    Subclasses set the class attributes and ``_class_names``.
    """

    file_prefix: ClassVar[str] = ""  # split files are <file_prefix>_{train,val,test}.txt
    num_expected_classes: ClassVar[int | None] = None
    layout: ClassVar[str] = ""  # the expected folder tree; "{root}" / "{image_root}" are replaced
    download: ClassVar[str] = ""  # where to get the data
    # CoOp / Dassl training augmentation (random resized crop, scale (0.08, 1), flip) on the cached squares.
    augment: ClassVar[ImageAugment] = ImageAugment(scale=(0.08, 1.0), hflip=True)  # type: ignore[assignment]

    def __init__(
        self,
        root: str,
        image_root: str | None = None,
        image_size: int = 224,
        val_as_test: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 4,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = root
        self.image_root = image_root
        self.image_size = image_size
        self.val_as_test = val_as_test
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.last_build_s: float | None = None  # seconds decoding during the last load, None when fully cached

    # ----------------------------------------------------------------------------------------------- paths
    @staticmethod
    def _abs(path: str) -> Path:
        return Path(os.path.abspath(os.path.expanduser(path)))

    def _paths(self) -> tuple[Path, Path]:
        root = self._abs(self.root)
        return root, self._abs(self.image_root) if self.image_root is not None else root

    def _missing(self, what: str) -> DatasetNotFoundError:
        root, image_root = self._paths()
        tree = self.layout.strip("\n").replace("{root}", str(root)).replace("{image_root}", str(image_root))
        return dataset_not_found(self.name, what, f"root={self.root!r}, image_root={self.image_root!r}", tree,
                                 self.download)

    def _split_file(self, kind: str) -> Path:
        root, _ = self._paths()
        if not root.is_dir():
            raise self._missing(f"the root folder {root} does not exist")
        path = root / f"{self.file_prefix}_{kind}.txt"
        if not path.is_file():
            raise self._missing(f"the split file {path} does not exist")
        return path

    # ----------------------------------------------------------------------------------------------- classes
    @abc.abstractmethod
    def _class_names(self, label_dirs: dict[int, str]) -> list[str]:
        """Class names indexed by label; ``label_dirs`` maps each label to the class folder of its train paths."""

    def _label_dirs(self, path: Path, entries: list[tuple[str, int]], key: str) -> dict[int, str]:
        """Label -> class key (``key`` of the train paths); checks labels are 0..C-1 and the map is one-to-one."""
        found: dict[int, set[str]] = {}
        for rel, label in entries:
            found.setdefault(label, set()).add(self._class_key(rel))
        bad = {c: sorted(k) for c, k in found.items() if len(k) != 1}
        if bad:
            c, keys = next(iter(sorted(bad.items())))
            raise ValueError(f"{path}: label {c} is given to images of several {key}s ({', '.join(keys[:4])})")
        labels = {c: next(iter(k)) for c, k in found.items()}
        if sorted(labels) != list(range(len(labels))):
            raise ValueError(f"{path}: the labels are not 0..C-1 (found {len(labels)} distinct labels from "
                             f"{min(labels)} to {max(labels)})")
        if len(set(labels.values())) != len(labels):
            raise ValueError(f"{path}: a {key} is given several labels")
        if self.num_expected_classes is not None and len(labels) != self.num_expected_classes:
            raise self._missing(f"{path} has {len(labels)} classes, expected {self.num_expected_classes}")
        return labels

    @staticmethod
    @abc.abstractmethod
    def _class_key(rel: str) -> str:
        """The class key of a train image path (its class folder)."""

    # ----------------------------------------------------------------------------------------------- cache
    def _cache_path(self, kind: str, split_file: Path, image_root: Path) -> Path:
        h = hashlib.sha1(f"v{_CACHE_VERSION}\n{image_root}\n{self.image_size}\n".encode())
        h.update(split_file.read_bytes())
        folder = self._abs(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        return folder / f"{self.name}-{kind}-{self.image_size}-{h.hexdigest()[:16]}.npy"

    def _read_cache(self, path: Path, n: int) -> np.ndarray | None:
        """The memory-mapped cache when it exists and holds (n, 3, S, S) uint8, else None."""
        if not path.is_file():
            return None
        try:
            x = np.load(path, mmap_mode="c")  # copy-on-write: writable, so torch.from_numpy does not warn
        except (OSError, ValueError):
            return None  # unreadable: decode again
        s = self.image_size
        return x if x.dtype == np.uint8 and x.shape == (n, 3, s, s) else None

    def _build(self, path: Path, kind: str, image_root: Path, split_file: Path, files: list[str]) -> None:
        """Decodes ``files`` into the uint8 (N, 3, S, S) ``.npy`` at ``path`` (temporary file, then renamed)."""
        if not image_root.is_dir():
            raise self._missing(f"the image folder {image_root} does not exist")
        paths = [str(image_root / f) for f in files]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise self._missing(f"the image {absent[0]} named by {split_file} does not exist ({len(absent)} of "
                                f"{len(paths)} listed images are missing)")
        print(f"decoding {len(paths)} {kind} images of {self.name} once into {path}", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self._decode_into(tmp, kind, paths)
            os.replace(tmp, path)  # atomic: concurrent readers see no file or the complete one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _decode_into(self, tmp: Path, kind: str, paths: list[str]) -> None:
        """Decodes ``paths`` into a new uint8 (N, 3, S, S) ``.npy`` file, chunk by chunk, reporting progress."""
        n, s = len(paths), self.image_size
        x = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, s, s))  # on disk, never all in RAM
        decode = decode_center_crop  # looked up at call time (tests replace it)

        def work(lo: int) -> int:
            hi = min(lo + _DECODE_CHUNK, n)
            for i in range(lo, hi):
                x[i] = decode(paths[i], s)
            return hi - lo

        starts = range(0, n, _DECODE_CHUNK)
        pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 1 and len(starts) > 1 else None
        start, done, reported = time.perf_counter(), 0, 0
        try:
            # pool.map yields in order and re-raises a worker's exception; PIL releases the GIL while decoding.
            for count in pool.map(work, starts) if pool is not None else map(work, starts):
                done += count
                if done - reported >= _PROGRESS_EVERY:
                    reported = done
                    print(f"  {self.name} {kind}: {done}/{n} images ({time.perf_counter() - start:.0f} s)",
                          file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        x.flush()

    def _entries(self, kind: str) -> tuple[Path, list[tuple[str, int]]]:
        """The split file of ``kind`` and its (relative path, label) lines."""
        split_file = self._split_file(kind)
        entries = read_split_file(split_file)
        if not entries:
            raise self._missing(f"the split file {split_file} lists no images")
        return split_file, entries

    def _split(
        self, kind: str, image_root: Path, split_file: Path, entries: list[tuple[str, int]]
    ) -> tuple[Tensor, Tensor, float]:
        """(x, y, decode seconds) of one split: the memory-mapped images and the split file's labels."""
        path = self._cache_path(kind, split_file, image_root)
        seconds = 0.0
        x = self._read_cache(path, len(entries))
        if x is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # One decoder per cache file: the ranks of a run (or concurrent runs) sharing a cache directory wait
            # for the first one instead of each decoding (ImageNet-LT's train cache is 17 GB at 224 px).
            with _exclusive(path.with_name(path.name + ".lock")):
                x = self._read_cache(path, len(entries))
                if x is None:
                    start = time.perf_counter()
                    self._build(path, kind, image_root, split_file, [rel for rel, _ in entries])
                    seconds = time.perf_counter() - start
                    x = self._read_cache(path, len(entries))
            assert x is not None, f"the cache {path} just written cannot be read"
        y = torch.tensor([label for _, label in entries], dtype=torch.int64)
        return torch.from_numpy(x), y, seconds

    # ----------------------------------------------------------------------------------------------- load
    def load(self) -> SourceData:
        """Reads the split files, then maps the cached images or decodes every image once (and caches them).

        Raises:
            DatasetNotFoundError: the root, a split file, the image folder or a listed image is missing.
            ValueError: a split file is malformed or its labels are not consistent with its class folders.
        """
        _, image_root = self._paths()
        test_kind = "val" if self.val_as_test else "test"
        train_file, train = self._entries("train")
        test_file, test = self._entries(test_kind)  # both split files are checked before any decoding
        class_names = self._class_names(self._label_dirs(train_file, train, "class folder"))
        train_x, train_y, s_train = self._split("train", image_root, train_file, train)
        test_x, test_y, s_test = self._split(test_kind, image_root, test_file, test)
        if test_y.numel() and (test_y.min() < 0 or test_y.max() >= len(class_names)):
            raise ValueError(f"{self.name}: the {test_kind} split file has labels outside 0..{len(class_names) - 1}")
        self.last_build_s = s_train + s_test if s_train or s_test else None
        return SourceData(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            num_classes=len(class_names),
            class_names=class_names,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            file_backed=True,
        )


@SOURCES.register("imagenet_lt")
class ImageNetLT(_SplitFileLTSource):
    """ImageNet-LT (Liu et al. 2019): 1,000 classes, 115,846 train images (1,280 ... 5 per class), 50 test per class.

    Labels come from ``ImageNet_LT_{train,test}.txt`` (``train/n01440764/n01440764_190.JPEG 0``); class names from
    a CoOp-style ``classnames.txt`` (``n01440764 tench`` per line) through the wnid folder of the train paths. Without
    that file the wnids themselves are the class names (with a warning: CLIP text prompts need real names).

    Args:
        root: folder holding the split files (and, by default, the images).
        image_root: folder the split files' paths are relative to (holding ``train/`` and ``val/``); default ``root``.
        class_names_file: CoOp ``classnames.txt``; default ``<root>/classnames.txt``.
        image_size: side of the square uint8 images (shorter side resized bicubic, centre crop).
        val_as_test: use ``ImageNet_LT_val.txt`` (20 per class) as the test split instead of the test file.
        cache_dir: folder of the decoded ``.npy`` cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "imagenet_lt"
    file_prefix = "ImageNet_LT"
    num_expected_classes = 1000
    download = (f"the split files from {_OLTR}; the ILSVRC-2012 train and val images from https://image-net.org "
                "(val/ sorted into wnid folders as the split paths expect); classnames.txt from CoOp's DATASETS.md "
                "(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md, ImageNet section).")
    layout = """
  {root}/
    ImageNet_LT_train.txt    (lines 'train/n01440764/n01440764_190.JPEG 0')
    ImageNet_LT_test.txt     (lines 'val/n01440764/ILSVRC2012_val_00000293.JPEG 0')
    ImageNet_LT_val.txt      (only with val_as_test)
    classnames.txt           (optional, CoOp format: 'n01440764 tench')
  {image_root}/
    train/
      n01440764/
        n01440764_190.JPEG
        ...
    val/
      n01440764/
        ILSVRC2012_val_00000293.JPEG
        ...
"""

    def __init__(
        self,
        root: str = "data/ImageNet_LT",
        image_root: str | None = None,
        class_names_file: str | None = None,
        image_size: int = 224,
        val_as_test: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 4,
    ) -> None:
        super().__init__(root, image_root, image_size, val_as_test, cache_dir, num_workers)
        self.class_names_file = class_names_file

    @staticmethod
    def _class_key(rel: str) -> str:
        parts = rel.split("/")
        return parts[-2] if len(parts) >= 2 else ""

    def _class_names(self, label_dirs: dict[int, str]) -> list[str]:
        wnids = [label_dirs[c] for c in range(len(label_dirs))]
        root, _ = self._paths()
        path = self._abs(self.class_names_file) if self.class_names_file is not None else root / "classnames.txt"
        if not path.is_file():
            warnings.warn(f"{self.name}: no class names file {path}; using the wnids (n01440764, ...) as class names, "
                          "so CLIP text prompts will be poor. Get classnames.txt from CoOp's DATASETS.md.",
                          stacklevel=3)
            return wnids
        names: dict[str, str] = {}
        for line in path.read_text().splitlines():
            parts = line.strip().split(maxsplit=1)
            if parts:
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
        lack = [w for w in wnids if w not in names]
        if lack:
            warnings.warn(f"{self.name}: {path} has no name for {len(lack)} wnid(s) ({', '.join(lack[:3])}); "
                          "using the wnid for those", stacklevel=3)
        return [names.get(w, w) for w in wnids]


@SOURCES.register("places_lt")
class PlacesLT(_SplitFileLTSource):
    """Places-LT (Liu et al. 2019): 365 classes, 62,500 train images (4,980 ... 5 per class), 100 test per class.

    Labels come from ``Places_LT_{train,test}.txt`` (``data_256/a/airfield/00000013.jpg 0``); the class name of a
    label is the category path of its train images after the single-letter folder, with ``/`` and ``_`` as
    spaces (``data_256/a/apartment_building/outdoor/...`` -> ``apartment building outdoor``). Test paths need not
    name the class (``val_256/Places365_val_00000001.jpg 12``).

    Args:
        root: folder holding the split files (and, by default, the images).
        image_root: folder the split files' paths are relative to (holding ``data_256/`` and ``val_256/``);
            default ``root``.
        image_size: side of the square uint8 images (shorter side resized bicubic, centre crop).
        val_as_test: use ``Places_LT_val.txt`` (20 per class) as the test split instead of the test file.
        cache_dir: folder of the decoded ``.npy`` cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "places_lt"
    file_prefix = "Places_LT"
    num_expected_classes = 365
    download = (f"the split files from {_OLTR}; the Places365-Standard small images (256x256: places365standard_"
                "easyformat / data_256 and val_256) from http://places2.csail.mit.edu.")
    layout = """
  {root}/
    Places_LT_train.txt      (lines 'data_256/a/airfield/00000013.jpg 0')
    Places_LT_test.txt       (lines 'val_256/Places365_val_00000001.jpg 12')
    Places_LT_val.txt        (only with val_as_test)
  {image_root}/
    data_256/
      a/
        airfield/
          00000013.jpg
          ...
        apartment_building/
          outdoor/
            ...
      b/ ... z/
    val_256/
      Places365_val_00000001.jpg
      ...
"""

    def __init__(
        self,
        root: str = "data/Places_LT",
        image_root: str | None = None,
        image_size: int = 224,
        val_as_test: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 4,
    ) -> None:
        super().__init__(root, image_root, image_size, val_as_test, cache_dir, num_workers)

    @staticmethod
    def _class_key(rel: str) -> str:
        folders = rel.split("/")[:-1]
        letter = next((i for i, p in enumerate(folders) if len(p) == 1 and p.isalpha()), None)
        category = folders[letter + 1:] if letter is not None else folders[-1:]
        return "/".join(category)

    def _class_names(self, label_dirs: dict[int, str]) -> list[str]:
        return [label_dirs[c].replace("/", " ").replace("_", " ") for c in range(len(label_dirs))]
