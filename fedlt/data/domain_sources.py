"""Folder-backed multi-domain datasets of domain generalization: PACS, Digits-DG, mini-DomainNet and Office-Home.

Each reads the images of every domain from the usual folder layout (``root/<domain>/<class>/<image>``, with the
dataset's official split files where they exist), decodes them once with PIL to uint8 ``image_size`` squares and
caches the tensors, so later loads read one file. A missing or incomplete folder raises
:class:`~fedlt.data.sources.DatasetNotFoundError` with the expected layout and where to download the data.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedlt.data.domains import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VAL, DomainData, DomainSource
from fedlt.data.sources import (
    SOURCES,
    DatasetNotFoundError,
    dataset_not_found,
    default_cache_dir,
    read_cache,
    read_split_file,
    write_cache,
)
from fedlt.data.transforms import ImageAugment

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PACS", "DigitsDG", "MiniDomainNet", "OfficeHome"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1  # bump when the decoding changes, so stale caches are not reused
_DECODE_CHUNK = 256  # images per thread-pool task


class _Image(NamedTuple):
    rel: str  # path relative to root, "/"-separated
    label: int
    domain: int
    split: int


def _decode(path: str, size: int) -> Tensor:
    """One image file as uint8 (3, size, size): RGB, bilinear resize (PIL filters antialias when shrinking)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except OSError as err:  # includes PIL.UnidentifiedImageError
        raise OSError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _alias_key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _FolderDomainSource(DomainSource):
    """Shared folder scanning, split files, decoding, caching and missing-data errors of the folder datasets.

    Subclasses set the class attributes; the default ``_scan`` reads ``<base>/<domain>/[<split folder>/]<class>/*``
    where ``<base>`` is ``root`` or one of ``_extra_bases`` under it.
    """

    classes: ClassVar[tuple[str, ...] | None] = None  # the expected class folder names, when fixed
    num_expected_classes: ClassVar[int | None] = None  # the expected number of classes, when the names are not fixed
    layout: ClassVar[str] = ""  # the expected folder tree; "{root}" is replaced by the root folder
    download: ClassVar[str] = ""  # where to get the data
    augment: ClassVar[ImageAugment] = ImageAugment()  # type: ignore[assignment]
    _extra_bases: ClassVar[tuple[str, ...]] = ()  # folders under root that may hold the domain folders instead
    _split_folders: ClassVar[tuple[tuple[str, int], ...]] = (("", SPLIT_TRAIN),)  # (sub-folder of a domain, split)

    def __init__(self, root: str, image_size: int = 224, cache_dir: str | None = None, num_workers: int = 4) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = root
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.last_build_s: float | None = None  # seconds of the last decode, None when the cache was read

    # ----------------------------------------------------------------------------------------------- errors
    def _missing(self, root: Path, what: str) -> DatasetNotFoundError:
        tree = self.layout.strip("\n").replace("{root}", str(root))
        return dataset_not_found(self.name, what, f"root={self.root!r}", tree, self.download)

    # ----------------------------------------------------------------------------------------------- folders
    def _root_dir(self) -> Path:
        root = Path(os.path.abspath(os.path.expanduser(self.root)))
        if not root.is_dir():
            raise self._missing(root, f"the root folder {root} does not exist")
        return root

    def _match_domain(self, base: Path, domain: str) -> Path | None:
        """The folder of ``domain`` in ``base``: the exact name, else a case/space/underscore-insensitive alias."""
        if (base / domain).is_dir():
            return base / domain
        if not base.is_dir():
            return None
        aliases = [p for p in _subfolders(base) if _alias_key(p.name) == _alias_key(domain)]
        return aliases[0] if aliases else None

    def _domain_dirs(self, root: Path) -> list[Path]:
        """The domain folders, from the first base folder (root or an extra base) holding any of them."""
        for base in (root, *(root / b for b in self._extra_bases)):
            found = [self._match_domain(base, d) for d in self.domains]
            if any(found):
                missing = [d for d, f in zip(self.domains, found) if f is None]
                if missing:
                    raise self._missing(root, f"no folder for domain(s) {', '.join(missing)} in {base} (found: "
                                              f"{', '.join(p.name for p in _subfolders(base)) or 'nothing'})")
                return [f for f in found if f is not None]
        raise self._missing(root, f"none of the domain folders {', '.join(self.domains)} is in {root}")

    def _class_folders(self, root: Path, folder: Path) -> dict[str, list[Path]]:
        """Class name -> sorted image files of ``folder``; every class folder must hold images."""
        if not folder.is_dir():
            raise self._missing(root, f"the folder {folder} does not exist")
        classes = {p.name: _list_images(p) for p in _subfolders(folder)}
        if not classes:
            raise self._missing(root, f"no class folders in {folder}")
        empty = [c for c, files in classes.items() if not files]
        if empty:
            raise self._missing(root, f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folder(s) "
                                      f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} of {folder}")
        return classes

    def _check_classes(self, root: Path, names: Iterable[str], where: Path, reference: list[str] | None) -> None:
        names = sorted(names)
        expected = sorted(self.classes) if self.classes is not None else reference
        if expected is not None and names != expected:
            lack, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
            raise self._missing(root, f"the class folders of {where} differ from the expected classes (missing: "
                                      f"{', '.join(lack) or '-'}; unexpected: {', '.join(extra) or '-'})")
        if self.num_expected_classes is not None and len(names) != self.num_expected_classes:
            raise self._missing(root, f"{where} has {len(names)} classes, expected {self.num_expected_classes}")

    def _scan(self, root: Path) -> tuple[list[str], list[_Image]]:
        """Class names and every image (unsorted) of the folder layout, all with ``_split_folders``' split ids."""
        found: list[tuple[str, Path, int, int]] = []  # class, file, domain, split
        reference: list[str] | None = None
        for d, ddir in enumerate(self._domain_dirs(root)):
            for sub, split in self._split_folders:
                folder = ddir / sub if sub else ddir
                classes = self._class_folders(root, folder)
                self._check_classes(root, classes, folder, reference)
                reference = sorted(classes)
                found += [(c, f, d, split) for c, files in classes.items() for f in files]
        assert reference is not None
        label = {c: i for i, c in enumerate(reference)}
        images = [_Image(f.relative_to(root).as_posix(), label[c], d, s) for c, f, d, s in found]
        return reference, images

    def _check_listed(self, root: Path, rels: Iterable[str], known: set[str] | None = None) -> None:
        """Raises when a file named by a split file is not on disk (``known``: the files found, else os.path)."""
        absent = [r for r in rels if (r not in known if known is not None else not (root / r).is_file())]
        if absent:
            raise self._missing(root, f"{len(absent)} file(s) named by the split files do not exist under {root} "
                                      f"(first: {', '.join(absent[:3])})")

    # ----------------------------------------------------------------------------------------------- cache
    def _cache_path(self, root: Path, images: list[_Image]) -> Path:
        h = hashlib.sha1(f"v{_CACHE_VERSION}\n{root}\n".encode())
        for im in images:
            h.update(f"{im.rel}\t{im.split}\n".encode())
        folder = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        return folder / f"{self.name}-{self.image_size}-{h.hexdigest()[:12]}.pt"

    @staticmethod
    def _read_cache(path: Path, expected: dict[str, Tensor]) -> Tensor | None:
        """The cached images when the cache exists, is readable and matches the labels, domains and splits."""
        data = read_cache(path) if path.exists() else None
        if not isinstance(data, dict):
            return None  # missing or unreadable (e.g. truncated): decode again
        ok = all(isinstance(data.get(k), Tensor) and torch.equal(data[k], v) for k, v in expected.items())
        return data["x"] if ok and isinstance(data.get("x"), Tensor) else None

    def _decode_all(self, root: Path, files: list[str]) -> Tensor:
        s = self.image_size
        x = torch.empty(len(files), 3, s, s, dtype=torch.uint8)
        paths = [str(root / f) for f in files]
        decode = _decode  # looked up at call time (tests replace it)

        def work(lo: int) -> None:
            for i in range(lo, min(lo + _DECODE_CHUNK, len(paths))):
                x[i] = decode(paths[i], s)

        starts = range(0, len(paths), _DECODE_CHUNK)
        if self.num_workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:
                list(pool.map(work, starts))  # list(): re-raises a worker's exception
        else:
            for lo in starts:
                work(lo)
        return x

    # ----------------------------------------------------------------------------------------------- load
    def load(self) -> DomainData:
        """Scans the folders, then reads the cache or decodes every image once (and caches it).

        Raises:
            DatasetNotFoundError: the root, a domain folder, the class folders, a required split file or a file it
                names is missing.
        """
        root = self._root_dir()
        class_names, images = self._scan(root)
        images.sort(key=lambda im: (im.domain, im.rel))
        meta = {
            "y": torch.tensor([im.label for im in images], dtype=torch.int64),
            "domain": torch.tensor([im.domain for im in images], dtype=torch.int64),
            "split": torch.tensor([im.split for im in images], dtype=torch.int64),
        }
        files = [im.rel for im in images]
        path = self._cache_path(root, images)
        x = self._read_cache(path, meta)
        self.last_build_s = None
        if x is None:
            print(f"decoding {len(files)} images of {self.name} once; cached at {path}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            x = self._decode_all(root, files)
            self.last_build_s = time.perf_counter() - start
            write_cache(path, {"x": x, **meta})
        return DomainData(
            domains=list(self.domains),
            x=x,
            y=meta["y"],
            domain=meta["domain"],
            split=meta["split"],
            num_classes=len(class_names),
            class_names=class_names,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            files=files,
        )


@SOURCES.register("pacs")
class PACS(_FolderDomainSource):
    """PACS (Li et al. 2017): 9,991 images of 7 classes in 4 domains (art painting, cartoon, photo, sketch).

    Reads the DomainBed layout ``root/<domain>/<class>/*`` or the original release's ``root/kfold/<domain>/<class>/*``.
    With the official split files in ``root/splits/`` (``<domain>_{train,crossval,test}_kfold.txt``) an image
    listed for training is ``SPLIT_TRAIN``, one listed for cross-validation ``SPLIT_VAL`` and any other
    ``SPLIT_TEST``; without them every image is ``SPLIT_TRAIN``.

    Args:
        root: dataset folder (the one holding the domain folders, or ``kfold/``).
        image_size: side of the square uint8 images the files are resized to (bilinear, antialiased).
        cache_dir: folder of the decoded-tensor cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "pacs"
    domains = ("art_painting", "cartoon", "photo", "sketch")
    classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    augment = ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4)
    _extra_bases = ("kfold",)
    download = ("https://domaingeneralization.github.io/#data (the kfold/ images, optionally the split .txt files "
                "into splits/), or DomainBed's `python -m domainbed.scripts.download --data_dir=data` (data/PACS).")
    layout = """
  {root}/
    art_painting/            (or kfold/art_painting/ as in the original release)
      dog/
        pic_001.jpg
        ...
      elephant/ giraffe/ guitar/ horse/ house/ person/
    cartoon/  photo/  sketch/  (the same 7 class folders)
    splits/                  (optional, the official splits)
      art_painting_train_kfold.txt     (lines 'art_painting/dog/pic_001.jpg 1', 1-based labels)
      art_painting_crossval_kfold.txt
      art_painting_test_kfold.txt
      ...
"""

    def _scan(self, root: Path) -> tuple[list[str], list[_Image]]:
        class_names, images = super()._scan(root)
        kinds = ("train", "crossval", "test")
        files = {(d, k): root / "splits" / f"{d}_{k}_kfold.txt" for d in self.domains for k in kinds}
        lack = [f.name for f in files.values() if not f.is_file()]
        if len(lack) == len(files):
            return class_names, images  # no official splits
        if lack:
            raise self._missing(root, f"the split files {', '.join(lack)} are missing in {root / 'splits'} (the "
                                      "others exist; keep all or none)")
        prefix = "kfold/" if images[0].rel.startswith("kfold/") else ""  # split files are relative to kfold/
        listed = {k: {prefix + rel for d in self.domains for rel, _ in read_split_file(files[d, k], lstrip_dots=True)}
                  for k in kinds}
        self._check_listed(root, sorted(set().union(*listed.values())), {im.rel for im in images})

        def split(rel: str) -> int:  # an image in the train and test lists (the test lists hold whole domains)
            return SPLIT_TRAIN if rel in listed["train"] else SPLIT_VAL if rel in listed["crossval"] else SPLIT_TEST

        return class_names, [im._replace(split=split(im.rel)) for im in images]


@SOURCES.register("digitsdg")
class DigitsDG(_FolderDomainSource):
    """Digits-DG (Zhou et al. 2020): digits 0-9 in 4 domains (MNIST, MNIST-M, SVHN, SYN), with train/val folders.

    Reads ``root/<domain>/{train,val}/<digit>/*``; ``train`` images are ``SPLIT_TRAIN``, ``val`` ones ``SPLIT_VAL``.

    Args:
        root: dataset folder (the one holding the domain folders).
        image_size: side of the square uint8 images the files are resized to (bilinear, antialiased).
        cache_dir: folder of the decoded-tensor cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "digitsdg"
    domains = ("mnist", "mnist_m", "svhn", "syn")
    classes = tuple(str(c) for c in range(10))
    augment = ImageAugment(scale=(0.8, 1.0), hflip=False, color_jitter=0.0)
    _split_folders = (("train", SPLIT_TRAIN), ("val", SPLIT_VAL))
    download = "https://github.com/KaiyangZhou/Dassl.pytorch/blob/master/DATASETS.md#digits-dg (digits_dg.zip)."
    layout = """
  {root}/
    mnist/
      train/
        0/
          00000.jpg
          ...
        1/ ... 9/
      val/
        0/ ... 9/
    mnist_m/  svhn/  syn/   (the same train/ and val/ folders)
"""

    def __init__(self, root: str, image_size: int = 32, cache_dir: str | None = None, num_workers: int = 4) -> None:
        super().__init__(root, image_size, cache_dir, num_workers)


@SOURCES.register("minidomainnet")
class MiniDomainNet(_FolderDomainSource):
    """mini-DomainNet (Zhou et al. 2021): 126 classes of DomainNet in 4 domains (clipart, painting, real, sketch).

    Only the images listed in the required split files ``root/splits_mini/<domain>_{train,test}.txt`` are used
    (``train`` -> ``SPLIT_TRAIN``, ``test`` -> ``SPLIT_TEST``); labels and class names come from those files (the
    class name of label c is the class folder of its listed paths).

    Args:
        root: DomainNet folder (the one holding the domain folders and ``splits_mini/``).
        image_size: side of the square uint8 images the files are resized to (bilinear, antialiased).
        cache_dir: folder of the decoded-tensor cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "minidomainnet"
    domains = ("clipart", "painting", "real", "sketch")
    num_expected_classes = 126
    augment = ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4)
    split_kinds: ClassVar[tuple[tuple[str, int], ...]] = (("train", SPLIT_TRAIN), ("test", SPLIT_TEST))
    download = ("the images of http://ai.bu.edu/M3SDA/ (clipart.zip, painting.zip, real.zip, sketch.zip) plus "
                "splits_mini/ from https://github.com/KaiyangZhou/Dassl.pytorch/blob/master/DATASETS.md "
                "(mini-DomainNet).")
    layout = """
  {root}/
    clipart/
      aircraft_carrier/
        clipart_001_000018.jpg
        ...
      ... (class folders)
    painting/  real/  sketch/
    splits_mini/             (required)
      clipart_train.txt      (lines 'clipart/aircraft_carrier/clipart_001_000018.jpg 0', 0-based labels)
      clipart_test.txt
      painting_train.txt  painting_test.txt  real_train.txt  real_test.txt  sketch_train.txt  sketch_test.txt
"""

    def __init__(self, root: str, image_size: int = 96, cache_dir: str | None = None, num_workers: int = 4) -> None:
        super().__init__(root, image_size, cache_dir, num_workers)

    def _class_names(self, root: Path, label_folders: set[tuple[int, str]]) -> list[str]:
        names = dict(label_folders)
        if len(names) != len(label_folders) or len(set(names.values())) != len(names):
            raise ValueError(f"{self.name}: the split files in {root / 'splits_mini'} map a label to several class "
                             "folders or a class folder to several labels")
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{self.name}: the labels of {root / 'splits_mini'} are not 0..C-1")
        class_names = [names[c] for c in range(len(names))]
        self._check_classes(root, class_names, root / "splits_mini", None)
        return class_names

    def _scan(self, root: Path) -> tuple[list[str], list[_Image]]:
        self._domain_dirs(root)  # a clear error for a missing domain folder before the split files' file list
        seen: dict[str, _Image] = {}
        for d, domain in enumerate(self.domains):
            for kind, split in self.split_kinds:
                path = root / "splits_mini" / f"{domain}_{kind}.txt"
                if not path.is_file():
                    raise self._missing(root, f"the split file {path} does not exist")
                for rel, label in read_split_file(path, lstrip_dots=True):
                    seen.setdefault(rel, _Image(rel, label, d, split))  # train listed first wins over test
        self._check_listed(root, seen)
        class_names = self._class_names(root, {(im.label, im.rel.split("/")[-2]) for im in seen.values()})
        return class_names, list(seen.values())


@SOURCES.register("officehome")
class OfficeHome(_FolderDomainSource):
    """Office-Home (Venkateswara et al. 2017): 15,588 images of 65 classes in 4 domains, no official splits.

    Reads ``root/<domain>/<class>/*``; the domain folders may use any case and space/underscore variant of the
    names ("Real World", "real_world", "RealWorld", ...). Every image is ``SPLIT_TRAIN``.

    Args:
        root: dataset folder (the one holding the domain folders).
        image_size: side of the square uint8 images the files are resized to (bilinear, antialiased).
        cache_dir: folder of the decoded-tensor cache; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        num_workers: threads decoding the images on the first load.
    """

    name = "officehome"
    domains = ("Art", "Clipart", "Product", "Real_World")
    num_expected_classes = 65
    augment = ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4)
    download = ("https://www.hemanthdv.org/officeHomeDataset.html (OfficeHomeDataset_10072016.zip), or DomainBed's "
                "`python -m domainbed.scripts.download --data_dir=data` (data/office_home).")
    layout = """
  {root}/
    Art/
      Alarm_Clock/
        00001.jpg
        ...
      ... (65 class folders)
    Clipart/  Product/  Real_World/   (the same 65 class folders; 'Real World' etc. accepted)
"""
