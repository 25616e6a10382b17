"""Data sources: each loads a labelled train/test pair as uint8 NCHW tensors (docs/architecture.md 2 and 5).

``EmbeddedDigits`` needs no download (it is synthesised from scikit-learn's bundled digits and cached); the
torchvision sources read the usual torchvision folders and explain how to get the data when it is missing.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedlt.data.digits import DIGITS_VERSION, build_digits
from fedlt.data.transforms import TensorAugment
from fedlt.registry import Registry

if TYPE_CHECKING:
    from fedlt.data.domains import DomainData

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "SOURCES",
    "DataSource",
    "DatasetNotFoundError",
    "EmbeddedDigits",
    "FashionMNIST",
    "SourceData",
    "cifar100_superclasses",
    "default_cache_dir",
]


@dataclass
class SourceData:
    """A loaded dataset: uint8 images (N, C, H, W), int64 labels, and per-channel statistics of x / 255.

    Attributes:
        superclasses: (C,) int64 coarse class id of every fine class (CIFAR-100's 20 superclasses, for the
            hierarchical partition of docs/reference.md 1.3 P-E), or None when the dataset has no class hierarchy.
        superclass_names: names of the coarse classes, indexed by the ids in ``superclasses``, or None.
        file_backed: ``train_x`` / ``test_x`` are memory-mapped from a cache file (paged in by the OS) rather than
            held in RAM: index them in batches and do not copy or move the whole tensor.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    superclasses: np.ndarray | None = None
    superclass_names: list[str] | None = None
    file_backed: bool = False


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message says where it looked, the expected layout and how to get it."""

    def __str__(self) -> str:  # FileNotFoundError would print "(errno) strerror"; we want the plain sentence.
        return str(self.args[0]) if self.args else ""


def dataset_not_found(name: str, what: str, settings: str, layout: str, download: str) -> DatasetNotFoundError:
    """The error of a missing or incomplete dataset folder: what is missing, the expected layout, where to get it.

    Args:
        name: the source's name.
        what: what is missing (a sentence fragment naming the path).
        settings: the source's folder arguments as shown next to the layout (``root='data/PACS'``).
        layout: the expected folder tree.
        download: where to get the data.
    """
    return DatasetNotFoundError(
        f"{name} dataset not found or incomplete: {what}.\n"
        f"Expected layout ({settings}):\n{layout}\n"
        f"To get it: {download}"
    )


def read_split_file(path: Path, lstrip_dots: bool = False) -> list[tuple[str, int]]:
    """(relative path, label) per non-empty line ``<relative path> <integer label>`` of a split file.

    Backslashes in the path become ``/`` and a leading ``./`` is dropped; with ``lstrip_dots`` every leading ``.``
    and ``/`` is (the folder-backed domain datasets' rule, which also drops ``../`` and ``/``).

    Raises:
        ValueError: a line is not ``<path> <integer>``.
    """
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.strip().rsplit(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<relative path> <integer label>', got {line!r}")
        rel = parts[0].replace("\\", "/")
        out.append((rel.lstrip("./") if lstrip_dots else rel.removeprefix("./"), int(parts[1])))
    return out


def default_cache_dir() -> Path:
    """``$FEDLT_CACHE`` if set, else ``~/.cache/fedlt`` (read at call time so tests can redirect it)."""
    return Path(os.environ.get("FEDLT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fedlt")))


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1].

    Args:
        x: uint8 images (N, C, H, W).

    Returns:
        (mean, std) tuples of length C.
    """
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64) / 255.0
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1, unbiased=False).tolist())


def read_cache(path: Path) -> dict[str, Any] | None:
    """The tensors saved in ``path``, or None when the file is missing or unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        # Missing or unreadable (e.g. truncated by a crash before atomic writes existed): rebuild.
        return None


def write_cache(path: Path, tensors: dict[str, Tensor]) -> None:
    """Saves ``tensors`` to ``path`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the complete new one


def load_or_build(path: Path, build: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Any], float | None]:
    """Reads the cached tensors at ``path``, or calls ``build`` and caches its result.

    Args:
        path: cache file; its name should hold every parameter of the build and a synthesis version.
        build: builds the tensors when the cache is missing or unreadable.

    Returns:
        (tensors, seconds of the build, or None when read from the cache).
    """
    tensors = read_cache(path) if path.exists() else None
    if tensors is not None:
        return tensors, None
    start = time.perf_counter()
    tensors = build()
    seconds = time.perf_counter() - start
    write_cache(path, tensors)
    return tensors, seconds


class DataSource(ABC):
    """Base of the data sources: ``load()`` returns a ``SourceData`` (a train/test split) or, for a multi-domain
    source (:class:`~fedlt.data.domains.DomainSource`), a ``DomainData``; ``augment`` is the default augmentation."""

    name: ClassVar[str] = "source"
    augment: ClassVar[TensorAugment] = TensorAugment()

    @abstractmethod
    def load(self) -> SourceData | DomainData:
        """Loads (or builds) the dataset as uint8 NCHW tensors."""


SOURCES: Registry[type[DataSource]] = Registry("data source")


@SOURCES.register("digits")
class EmbeddedDigits(DataSource):
    """MNIST-like digits synthesised from scikit-learn's bundled 8x8 digits: no download, cached, deterministic.

    Held-out real digits feed only the (balanced) test set, so no test image shares a source with training.

    Args:
        root: cache folder; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        image_size: side of the square images.
        train_per_class: synthesised training images per class.
        test_per_class: synthesised test images per class.
        holdout_per_class: real source digits per class reserved for the test set.
        seed: seed of the source split and of the synthesis.
    """

    name = "digits"
    augment = TensorAugment(crop_padding=2, hflip=False)

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 28,
        train_per_class: int = 1000,
        test_per_class: int = 100,
        holdout_per_class: int = 50,
        seed: int = 0,
    ) -> None:
        self.root = root
        self.image_size = image_size
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.holdout_per_class = holdout_per_class
        self.seed = seed
        self.last_build_s: float | None = None  # seconds of the last uncached build, for reporting

    @property
    def cache_path(self) -> Path:
        """Cache file; its name holds every parameter and the synthesis version."""
        root = Path(self.root) if self.root is not None else default_cache_dir()
        params = f"{self.image_size}-{self.train_per_class}-{self.test_per_class}-{self.holdout_per_class}"
        return root / f"digits-{params}-s{self.seed}-v{DIGITS_VERSION}.pt"

    def load(self) -> SourceData:
        """Reads the cache, or builds the dataset (a few seconds) and caches it."""
        tensors, seconds = load_or_build(
            self.cache_path,
            lambda: build_digits(
                self.image_size, self.train_per_class, self.test_per_class, self.holdout_per_class, self.seed
            ),
        )
        if seconds is not None:  # a cache hit keeps the time of this instance's last build
            self.last_build_s = seconds
        mean, std = channel_stats(tensors["train_x"])
        return SourceData(
            train_x=tensors["train_x"],
            train_y=tensors["train_y"],
            test_x=tensors["test_x"],
            test_y=tensors["test_y"],
            num_classes=10,
            class_names=[str(c) for c in range(10)],
            mean=mean,
            std=std,
        )


class _TorchvisionSource(DataSource):
    """Common loading of torchvision's in-memory datasets (``.data`` / ``.targets``)."""

    _dataset: ClassVar[str] = ""  # class name in torchvision.datasets
    _folder: ClassVar[str] = ""  # sub-folder torchvision expects under root
    _mean: ClassVar[tuple[float, ...]] = ()
    _std: ClassVar[tuple[float, ...]] = ()

    def __init__(self, root: str = "data", download: bool = False) -> None:
        self.root = root
        self.download = download

    def _missing(self, root: str, err: Exception) -> DatasetNotFoundError:
        how = (
            f"The download failed (no internet access?): download on a connected machine and copy {self._folder}/ "
            f"under {root}."
            if self.download
            else f"To get it: set download: true with internet access, or place {self._folder}/ under {root}."
        )
        return DatasetNotFoundError(
            f"{self.name} dataset not found under {root} (looked for {os.path.join(root, self._folder)}). "
            f"Expected layout: {root}/{self._folder}/ as written by torchvision.datasets.{self._dataset}. "
            f"{how} (torchvision said: {err})"
        )

    def load(self) -> SourceData:
        """Loads train and test splits as uint8 NCHW tensors.

        Raises:
            DatasetNotFoundError: the files are missing (or could not be downloaded).
        """
        import torchvision.datasets as tvd  # heavy import, only when a torchvision source is used

        root = os.path.abspath(os.path.expanduser(self.root))
        cls = getattr(tvd, self._dataset)
        try:
            train = cls(root, train=True, download=self.download)
            test = cls(root, train=False, download=self.download)
        except (RuntimeError, OSError) as err:  # "Dataset not found ..." or an offline download failure
            raise self._missing(root, err) from err
        return SourceData(
            train_x=_to_nchw(train.data),
            train_y=torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
            test_x=_to_nchw(test.data),
            test_y=torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
            num_classes=len(train.classes),
            class_names=[str(c) for c in train.classes],
            mean=self._mean,
            std=self._std,
        )


def _to_nchw(data: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if x.ndim == 3:  # MNIST-like (N, H, W) -> one channel
        return x.unsqueeze(1).contiguous()
    return x.permute(0, 3, 1, 2).contiguous()  # CIFAR (N, H, W, C) -> NCHW


@SOURCES.register("cifar10")
class CIFAR10(_TorchvisionSource):
    """CIFAR-10 via torchvision (50,000 train / 10,000 test, 32x32 RGB).

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: download the archive when missing (needs internet access).
    """

    name = "cifar10"
    augment = TensorAugment(crop_padding=4, hflip=True)
    _dataset = "CIFAR10"
    _folder = "cifar-10-batches-py"
    _mean = (0.4914, 0.4822, 0.4465)
    _std = (0.2470, 0.2435, 0.2616)


@SOURCES.register("cifar100")
class CIFAR100(_TorchvisionSource):
    """CIFAR-100 via torchvision (50,000 train / 10,000 test, 32x32 RGB, 100 classes).

    Args:
        root: folder holding ``cifar-100-python/``.
        download: download the archive when missing (needs internet access).
    """

    name = "cifar100"
    augment = TensorAugment(crop_padding=4, hflip=True)
    _dataset = "CIFAR100"
    _folder = "cifar-100-python"
    _mean = (0.5071, 0.4865, 0.4409)
    _std = (0.2673, 0.2564, 0.2762)

    def load(self) -> SourceData:
        """Loads train and test splits, with the 20 superclasses of the fine classes (``SourceData.superclasses``).

        Raises:
            DatasetNotFoundError: the files are missing (or could not be downloaded).
        """
        data = super().load()
        folder = Path(os.path.abspath(os.path.expanduser(self.root))) / self._folder
        superclasses, names = cifar100_superclasses(folder)
        if len(superclasses) != data.num_classes:
            raise ValueError(f"{folder}: the coarse labels cover {len(superclasses)} fine classes, the dataset has "
                             f"{data.num_classes}")
        return dataclasses.replace(data, superclasses=superclasses, superclass_names=names)


def _field(entry: dict[Any, Any], key: str) -> Any:
    """``entry[key]`` for a pickle loaded with str keys (``encoding="latin1"``) or bytes keys (``"bytes"``)."""
    if key in entry:
        return entry[key]
    if key.encode() in entry:
        return entry[key.encode()]
    raise KeyError(f"no {key!r} in the pickle (keys: {', '.join(map(repr, entry))})")


def cifar100_superclasses(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """The coarse (superclass) id of each fine CIFAR-100 class, from the original python pickles.

    torchvision's ``CIFAR100`` drops the coarse labels; the release's ``train`` pickle pairs every image's
    ``fine_labels`` with its ``coarse_labels`` and ``meta`` holds ``coarse_label_names``.

    Args:
        folder: the ``cifar-100-python`` folder (holding ``train`` and ``meta``).

    Returns:
        (superclasses, names): int64 array (C,) with the coarse id of fine class c, and the coarse class names.

    Raises:
        DatasetNotFoundError: ``train`` or ``meta`` is missing.
        ValueError: a fine class has several coarse labels or none.
    """
    folder = Path(folder)
    entries = []
    for name in ("train", "meta"):
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(f"CIFAR-100 superclasses: {path} does not exist (expected the python "
                                       f"release's {folder}/train and {folder}/meta, as written by "
                                       "torchvision.datasets.CIFAR100).")
        with open(path, "rb") as f:
            entries.append(pickle.load(f, encoding="latin1"))
    train, meta = entries
    fine = np.asarray(_field(train, "fine_labels"), dtype=np.int64)
    coarse = np.asarray(_field(train, "coarse_labels"), dtype=np.int64)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, "coarse_label_names")]
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)  # the distinct (fine, coarse) pairs
    num_fine = int(fine.max()) + 1 if fine.size else 0
    counts = np.bincount(pairs[:, 0], minlength=num_fine)
    if (counts != 1).any():
        bad = np.flatnonzero(counts != 1)[:5].tolist()
        raise ValueError(f"{folder / 'train'}: fine class(es) {bad} have {counts[bad].tolist()} coarse labels, "
                         "expected exactly one each")
    superclasses = np.empty(num_fine, dtype=np.int64)
    superclasses[pairs[:, 0]] = pairs[:, 1]
    if superclasses.size and (superclasses.min() < 0 or superclasses.max() >= len(names)):
        raise ValueError(f"{folder}: coarse labels outside 0..{len(names) - 1} (meta names {len(names)} classes)")
    return superclasses, names


@SOURCES.register("mnist")
class MNIST(_TorchvisionSource):
    """MNIST via torchvision (60,000 train / 10,000 test, 28x28 grey).

    Args:
        root: folder holding ``MNIST/raw/``.
        download: download the files when missing (needs internet access).
    """

    name = "mnist"
    augment = TensorAugment(crop_padding=2, hflip=False)
    _dataset = "MNIST"
    _folder = "MNIST/raw"
    _mean = (0.1307,)
    _std = (0.3081,)


@SOURCES.register("fashionmnist")
class FashionMNIST(_TorchvisionSource):
    """Fashion-MNIST via torchvision (60,000 train / 10,000 test, 28x28 grey).

    Args:
        root: folder holding ``FashionMNIST/raw/``.
        download: download the files when missing (needs internet access).
    """

    name = "fashionmnist"
    augment = TensorAugment(crop_padding=2, hflip=False)
    _dataset = "FashionMNIST"
    _folder = "FashionMNIST/raw"
    _mean = (0.2860,)
    _std = (0.3530,)
