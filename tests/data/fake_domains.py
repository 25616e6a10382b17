"""Tiny fake trees of the folder-backed domain datasets (real PNG / JPEG files), for tests.

Imported by path-less name (``from fake_domains import write_fake_pacs``): tests/data is on sys.path for the tests
in this folder; tests elsewhere can add it (``sys.path.insert(0, str(Path(__file__).parents[1] / "data"))``).

Every image is one flat colour that encodes its class and domain (see :func:`fake_color`), so a test can check
that the label and domain id of a decoded image match its pixels. mini-DomainNet and Office-Home fakes have fewer
classes than the real datasets: monkeypatch ``MiniDomainNet.num_expected_classes`` / ``OfficeHome.
num_expected_classes`` to the fake's count (or ``None``) before loading them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DIGITS_DOMAINS = ("mnist", "mnist_m", "svhn", "syn")
MINI_DOMAINS = ("clipart", "painting", "real", "sketch")
OFFICE_DOMAINS = ("Art", "Clipart", "Product", "Real World")  # the release's folder names ("Real World", a space)


def fake_color(label: int, domain: int) -> tuple[int, int, int]:
    """The flat RGB colour of every fake image of class ``label`` in domain ``domain`` (channels far apart)."""
    return (16 + 32 * (label % 8), 24 + 56 * domain, 200 - 20 * (label // 8))


def _image(path: Path, size: int, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color)
    if path.suffix == ".jpg":
        img.save(path, quality=95)
    else:
        img.save(path)
    return path.as_posix()


def _lines(entries: list[tuple[str, int]]) -> str:
    return "".join(f"{rel} {label}\n" for rel, label in entries)


def write_fake_pacs(root: str | Path, per_class: int = 2, with_splits: bool = False, size: int = 16,
                    kfold: bool = False) -> Path:
    """Writes a fake PACS: 4 domains x 7 classes x ``per_class`` images (sketch PNG, the others JPEG).

    Args:
        root: dataset folder to create.
        per_class: images per class and domain.
        with_splits: also write the official split files ``root/splits/<domain>_{train,crossval,test}_kfold.txt``:
            the first image of each class is listed for training, the second (if any) for cross-validation, the
            rest only in the test list (which, as in the release, lists every image).
        size: image side.
        kfold: put the images under ``root/kfold/`` as in the original release (default: DomainBed layout).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    base = root / "kfold" if kfold else root
    for d, domain in enumerate(PACS_DOMAINS):
        ext = ".png" if domain == "sketch" else ".jpg"
        lists: dict[str, list[tuple[str, int]]] = {"train": [], "crossval": [], "test": []}
        for c, name in enumerate(PACS_CLASSES):
            for i in range(per_class):
                rel = f"{domain}/{name}/pic_{i + 1:03d}{ext}"
                _image(base / rel, size, fake_color(c, d))
                lists["train" if i == 0 else "crossval" if i == 1 else "test"].append((rel, c + 1))
        if with_splits:
            lists["test"] = lists["train"] + lists["crossval"] + lists["test"]
            (root / "splits").mkdir(parents=True, exist_ok=True)
            for kind, entries in lists.items():
                (root / "splits" / f"{domain}_{kind}_kfold.txt").write_text(_lines(entries))
    return root


def write_fake_digitsdg(root: str | Path, per_class: int = 1, size: int = 8) -> Path:
    """Writes a fake Digits-DG: 4 domains x {train, val} x 10 digit folders x ``per_class`` PNG images.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    for d, domain in enumerate(DIGITS_DOMAINS):
        for sub in ("train", "val"):
            for c in range(10):
                for i in range(per_class):
                    _image(root / domain / sub / str(c) / f"{sub}_{i:05d}.png", size, fake_color(c, d))
    return root


def mini_class_names(classes: int) -> list[str]:
    """Class folder names of the fake mini-DomainNet in label order (reverse alphabetical: not the sorted order)."""
    return [f"class_{chr(ord('z') - k)}" for k in range(classes)]


def write_fake_minidomainnet(root: str | Path, classes: int = 3, per_class: int = 2, size: int = 16,
                             unlisted: bool = True) -> Path:
    """Writes a fake mini-DomainNet: JPEG images and ``root/splits_mini/<domain>_{train,test}.txt`` (0-based labels).

    Of the ``per_class`` images of a class and domain the first is listed for training and the others for testing.

    Args:
        root: dataset folder to create.
        classes: number of classes (the real dataset has 126; see the module docstring).
        per_class: listed images per class and domain.
        size: image side.
        unlisted: also write one image per class and domain that no split file lists (must be ignored).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    (root / "splits_mini").mkdir(parents=True, exist_ok=True)
    for d, domain in enumerate(MINI_DOMAINS):
        lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for c, name in enumerate(mini_class_names(classes)):
            for i in range(per_class + int(unlisted)):
                rel = f"{domain}/{name}/{domain}_{c:03d}_{i:06d}.jpg"
                _image(root / rel, size, fake_color(c, d))
                if i < per_class:
                    lists["train" if i == 0 else "test"].append((rel, c))
        for kind, entries in lists.items():
            (root / "splits_mini" / f"{domain}_{kind}.txt").write_text(_lines(entries))
    return root


def write_fake_officehome(root: str | Path, classes: int = 3, per_class: int = 1, size: int = 16,
                          domain_folders: tuple[str, ...] = OFFICE_DOMAINS) -> Path:
    """Writes a fake Office-Home: ``domain_folders`` (in the order Art, Clipart, Product, Real World) x classes.

    Args:
        root: dataset folder to create.
        classes: number of classes (the real dataset has 65; see the module docstring).
        per_class: images per class and domain.
        size: image side.
        domain_folders: the folder name of each domain (to exercise the name aliases).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    for d, folder in enumerate(domain_folders):
        for c in range(classes):
            for i in range(per_class):
                _image(root / folder / f"Class_{c:02d}" / f"{i + 1:05d}.jpg", size, fake_color(c, d))
    return root
