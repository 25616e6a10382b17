"""An embedded, offline four-domain digits dataset for domain generalization (``digit_domains``).

Like :mod:`fedlt.data.digits`, the images are synthesised deterministically from the 1,797 real 8x8 digits bundled
with scikit-learn (no download), but rendered in four visually distinct styles that mimic the Digits-DG domains:

* ``plain``: grey digit on black, replicated to three channels (MNIST-like);
* ``textured``: coloured digit on a procedural colour texture (smooth colour noise mixed with stripes), the
  digit's colour contrasting with the background (MNIST-M-like);
* ``inverted``: dark digit on a light, slightly tinted and unevenly lit background, blurred and very noisy
  (SVHN-like);
* ``thick``: thick (dilated by a low threshold of the soft glyph), crisp, more strongly rotated (up to +-40 deg)
  strokes in one flat colour on a flat contrasting colour (SYN-like).

Each domain draws its glyphs from its own disjoint pool of real digits (:func:`digit_domains_pools`), so a held-out
target domain has unseen writers. Classes can be naturally imbalanced per domain (:func:`digit_domains_class_counts`).
All randomness comes from explicitly seeded generators (one per domain) and the work runs in fixed-size chunks,
so a build is bit-identical for the same arguments.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlt.data.digits import DRAW_CHUNK, NUM_CLASSES, base_images, uniform_signed, vary_images
from fedlt.data.domains import SPLIT_TRAIN, SPLIT_VAL, DomainData, DomainSource
from fedlt.data.sources import SOURCES, channel_stats, default_cache_dir, load_or_build
from fedlt.data.transforms import TensorAugment

__all__ = [
    "DIGIT_DOMAIN_NAMES",
    "DIGIT_DOMAINS_VERSION",
    "IMBALANCE_ORDERS",
    "EmbeddedDigitDomains",
    "build_digit_domains",
    "digit_domains_class_counts",
    "digit_domains_pools",
]

DIGIT_DOMAINS_VERSION = 1
"""Bumped whenever the synthesis changes, so stale cache files are never reused."""

DIGIT_DOMAIN_NAMES = ("plain", "textured", "inverted", "thick")
"""Domain names, in the order of the domain ids."""

IMBALANCE_ORDERS = ("shared", "per_domain")
"""Class orders of the natural imbalance: class 0 is the head everywhere, or a seeded head per domain."""


def _check_args(image_size: int, per_class: int, val_per_class: int, imbalance_factor: float, order: str) -> None:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    if per_class <= val_per_class:
        raise ValueError(
            f"per_class ({per_class}) must exceed val_per_class ({val_per_class}) so every class keeps training images"
        )
    if not (math.isfinite(imbalance_factor) and imbalance_factor >= 1.0):
        raise ValueError(f"imbalance_factor must be a finite number >= 1 (1 = balanced), got {imbalance_factor}")
    if order not in IMBALANCE_ORDERS:
        raise ValueError(f"unknown imbalance_order {order!r}; valid orders: {', '.join(IMBALANCE_ORDERS)}")


def digit_domains_pools(targets: np.ndarray, seed: int, num_domains: int = len(DIGIT_DOMAIN_NAMES)) -> list[np.ndarray]:
    """Splits the real digit images per class into disjoint, seeded glyph pools, one per domain.

    Args:
        targets: labels of the sklearn digits, shape (1797,).
        seed: seed of the per-class shuffle.
        num_domains: number of pools.

    Returns:
        One sorted int64 index array per domain; pairwise disjoint, together covering every image, and each
        holding (almost) the same number of images of every class.

    Raises:
        ValueError: a class has fewer images than pools.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng([seed, 17])
    pools: list[list[np.ndarray]] = [[] for _ in range(num_domains)]
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(targets == c))
        if idx.size < num_domains:
            raise ValueError(f"digit class {c} has {idx.size} source images, fewer than the {num_domains} domains")
        for d, part in enumerate(np.array_split(idx, num_domains)):
            pools[d].append(part)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pools]


def digit_domains_class_counts(
    per_class: int,
    val_per_class: int = 20,
    imbalance_factor: float = 1.0,
    imbalance_order: str = "shared",
    seed: int = 0,
    num_domains: int = len(DIGIT_DOMAIN_NAMES),
) -> np.ndarray:
    """Images per (domain, class): ``floor(per_class * IF^(-r(c) / (C - 1)))``, at least ``val_per_class + 1``.

    r(c) is the rank of class c: c itself for ``"shared"`` (class 0 is the head of every domain), or its position
    in a seeded permutation drawn per domain for ``"per_domain"`` (head classes differ by domain, as in PACS).

    Args:
        per_class: images of the head class (of every class when ``imbalance_factor`` is 1).
        val_per_class: validation images per class; every class keeps at least one training image.
        imbalance_factor: head / tail count ratio IF >= 1.
        imbalance_order: one of ``IMBALANCE_ORDERS``.
        seed: seed of the per-domain permutations.
        num_domains: number of domains.

    Returns:
        int64 array (num_domains, C).
    """
    _check_args(8, per_class, val_per_class, imbalance_factor, imbalance_order)
    ranks = np.empty((num_domains, NUM_CLASSES), dtype=np.int64)
    for d in range(num_domains):
        if imbalance_order == "shared":
            ranks[d] = np.arange(NUM_CLASSES)
        else:
            order = np.random.default_rng([seed, 19, d]).permutation(NUM_CLASSES)  # order[0] is the head
            ranks[d, order] = np.arange(NUM_CLASSES)
    counts = np.floor(per_class * imbalance_factor ** (-ranks / (NUM_CLASSES - 1)) + 1e-9).astype(np.int64)
    return np.maximum(counts, val_per_class + 1)


def _domain_plan(pool: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    # Class-major list of source indices, cycling through each class's pool.
    return np.concatenate(
        [pool[targets[pool] == c][np.arange(n) % int((targets[pool] == c).sum())] for c, n in enumerate(counts)]
    )


def _mask(base: Tensor, strength: float, g: torch.Generator) -> Tensor:
    # A varied glyph as a float stroke mask in [0, 1] (N, 1, S, S).
    return vary_images(base, strength, 0.0, g).float() / 255.0


def _rotate(x: Tensor, max_degrees: float, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    angle = uniform_signed(n, g) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros(n)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: Tensor, sigma: float) -> Tensor:
    # Separable Gaussian blur per channel with reflected borders.
    radius = max(1, math.ceil(2.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _coords(n: int, size: int) -> tuple[Tensor, Tensor]:
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    v, u = torch.meshgrid(t, t, indexing="ij")
    return u.expand(n, 1, size, size), v.expand(n, 1, size, size)


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def _render_plain(base: Tensor, g: torch.Generator) -> Tensor:
    # MNIST-like: exactly the grey glyphs of the digits dataset, replicated to three channels.
    return vary_images(base, 1.0, 0.05, g).expand(-1, 3, -1, -1).contiguous()


def _render_textured(base: Tensor, g: torch.Generator) -> Tensor:
    n, _, size, _ = base.shape
    m = _mask(base, 1.0, g)
    # Smooth colour noise: random colours on a coarse 4x4 grid, upsampled bicubically (colour blobs).
    blobs = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    # Stripes between two random colours: random orientation, 1.5-5 periods per image, random phase.
    u, v = _coords(n, size)
    angle = (torch.rand(n, generator=g) * math.pi).view(n, 1, 1, 1)
    periods = (1.5 + torch.rand(n, generator=g) * 3.5).view(n, 1, 1, 1)
    phase = (torch.rand(n, generator=g) * 2.0 * math.pi).view(n, 1, 1, 1)
    s = 0.5 + 0.5 * torch.sin(math.pi * periods * (torch.cos(angle) * u + torch.sin(angle) * v) + phase)
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    stripes = a + (b - a) * s
    w = torch.rand(n, 1, 1, 1, generator=g)
    bg = (w * blobs + (1.0 - w) * stripes).clamp(0.0, 1.0)
    bg = bg + torch.randn(n, 3, size, size, generator=g) * 0.04  # fine grain
    # The digit takes, per channel, a colour on the far side of the background's mean colour.
    mu = bg.mean(dim=(2, 3), keepdim=True)
    bg = mu + 0.55 * (bg - mu)
    r = torch.rand(n, 3, 1, 1, generator=g) * 0.25
    digit = torch.where(mu > 0.5, r, 1.0 - r)
    return _to_uint8(bg * (1.0 - m) + digit * m)


def _render_inverted(base: Tensor, g: torch.Generator) -> Tensor:
    n, _, size, _ = base.shape
    m = _mask(base, 1.0, g)
    level = 0.7 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)  # drawn before the tint: the images' draw order
    light = level * (1.0 + 0.08 * uniform_signed(3 * n, g).view(n, 3, 1, 1))
    dark = 0.05 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)
    # Uneven lighting: a linear brightness ramp across the image in a random direction.
    u, v = _coords(n, size)
    direction = (torch.rand(n, generator=g) * 2.0 * math.pi).view(n, 1, 1, 1)
    ramp = 1.0 + 0.15 * (torch.cos(direction) * u + torch.sin(direction) * v)
    x = (light * (1.0 - m) + dark * m) * ramp
    x = _blur(x, 1.0)
    x = x + torch.randn(n, 3, size, size, generator=g) * 0.03 + torch.randn(n, 1, size, size, generator=g) * 0.07
    return _to_uint8(x)


def _render_thick(base: Tensor, g: torch.Generator) -> Tensor:
    n = base.shape[0]
    m = _mask(_rotate(base, 30.0, g), 0.7, g)  # +-30 deg on top of the +-10.5 deg of the mild variation
    # Thick strokes with crisp, font-like edges: a steep ramp around a low threshold of the soft glyph.
    m = ((m - 0.25) / 0.2).clamp(0.0, 1.0)
    bg = torch.rand(n, 3, 1, 1, generator=g)
    # Per channel, the digit sits 0.35-0.65 away (modulo 1) from the background: flat but contrasting colours.
    digit = torch.remainder(bg + 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=g), 1.0)
    return _to_uint8(bg * (1.0 - m) + digit * m)


_RENDERERS = (_render_plain, _render_textured, _render_inverted, _render_thick)


def build_digit_domains(
    image_size: int = 32,
    per_class: int = 200,
    val_per_class: int = 20,
    imbalance_factor: float = 1.0,
    imbalance_order: str = "shared",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Builds the four-domain digits dataset (no caching; see ``EmbeddedDigitDomains``).

    Args:
        image_size: side of the square output images.
        per_class: images per class and domain (of the head class when imbalanced).
        val_per_class: the last ``val_per_class`` images of every (domain, class) are marked ``SPLIT_VAL``.
        imbalance_factor: natural head / tail ratio within each domain (1 = balanced).
        imbalance_order: ``"shared"`` (class 0 is the head of every domain) or ``"per_domain"``.
        seed: seed of the glyph pools, the class orders and the synthesis.

    Returns:
        ``x`` (uint8, N x 3 x S x S), ``y``, ``domain`` and ``split`` (int64), domain-major then class-major.

    Raises:
        ValueError: invalid arguments.
    """
    _check_args(image_size, per_class, val_per_class, imbalance_factor, imbalance_order)
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported lazily (slow import)

    digits = load_digits()
    images, targets = np.asarray(digits.images), np.asarray(digits.target, dtype=np.int64)
    base = base_images(images, image_size)
    pools = digit_domains_pools(targets, seed)
    counts = digit_domains_class_counts(per_class, val_per_class, imbalance_factor, imbalance_order, seed)
    seeds = np.random.SeedSequence([seed, DIGIT_DOMAINS_VERSION]).generate_state(len(DIGIT_DOMAIN_NAMES),
                                                                                 dtype=np.uint64)
    xs, ys, domains, splits = [], [], [], []
    for d, render in enumerate(_RENDERERS):
        plan = _domain_plan(pools[d], targets, counts[d])
        g = torch.Generator().manual_seed(int(seeds[d] >> np.uint64(1)))
        xs += [render(base[torch.from_numpy(plan[i : i + DRAW_CHUNK])], g) for i in range(0, plan.size, DRAW_CHUNK)]
        ys.append(targets[plan])
        domains.append(np.full(plan.size, d, dtype=np.int64))
        # Within each class block, the last val_per_class images are validation.
        split = [np.where(np.arange(n) >= n - val_per_class, SPLIT_VAL, SPLIT_TRAIN) for n in counts[d]]
        splits.append(np.concatenate(split).astype(np.int64))
    return {
        "x": torch.cat(xs),
        "y": torch.from_numpy(np.concatenate(ys)),
        "domain": torch.from_numpy(np.concatenate(domains)),
        "split": torch.from_numpy(np.concatenate(splits)),
    }


@SOURCES.register("digit_domains")
class EmbeddedDigitDomains(DomainSource):
    """Four-domain digits (plain, textured, inverted, thick) synthesised offline from scikit-learn's 8x8 digits.

    A Digits-DG stand-in that needs no download: deterministic, cached, 3-channel. The domains differ strongly in
    appearance (MNIST-, MNIST-M-, SVHN- and SYN-like) and draw their glyphs from disjoint pools of real digits.

    Args:
        root: cache folder; default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``.
        image_size: side of the square images.
        per_class: images per class and domain (of the head class when imbalanced).
        val_per_class: images per class and domain marked as the official validation split.
        imbalance_factor: natural head / tail class ratio within each domain, >= 1 (1 = balanced).
        imbalance_order: ``shared`` (class 0 is the head of every domain) or ``per_domain`` (a seeded class
            order per domain, so head classes differ by domain as in PACS).
        seed: seed of the glyph pools, the class orders and the synthesis.
    """

    name = "digit_domains"
    domains = DIGIT_DOMAIN_NAMES
    augment = TensorAugment(crop_padding=2, hflip=False)

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        per_class: int = 200,
        val_per_class: int = 20,
        imbalance_factor: float = 1.0,
        imbalance_order: str = "shared",
        seed: int = 0,
    ) -> None:
        _check_args(image_size, per_class, val_per_class, imbalance_factor, imbalance_order)
        self.root = root
        self.image_size = image_size
        self.per_class = per_class
        self.val_per_class = val_per_class
        self.imbalance_factor = float(imbalance_factor)
        self.imbalance_order = imbalance_order
        self.seed = seed
        self.last_build_s: float | None = None  # seconds of the last uncached build, for reporting

    @property
    def cache_path(self) -> Path:
        """Cache file; its name holds every parameter and the synthesis version."""
        root = Path(self.root) if self.root is not None else default_cache_dir()
        params = (
            f"{self.image_size}-{self.per_class}-{self.val_per_class}-if{self.imbalance_factor!r}-"
            f"{self.imbalance_order}"
        )
        return root / f"digit_domains-{params}-s{self.seed}-v{DIGIT_DOMAINS_VERSION}.pt"

    def load(self) -> DomainData:
        """Reads the cache, or builds every domain (a few seconds) and caches it."""
        tensors, seconds = load_or_build(
            self.cache_path,
            lambda: build_digit_domains(
                self.image_size,
                self.per_class,
                self.val_per_class,
                self.imbalance_factor,
                self.imbalance_order,
                self.seed,
            ),
        )
        if seconds is not None:  # a cache hit keeps the time of this instance's last build
            self.last_build_s = seconds
        mean, std = channel_stats(tensors["x"])
        return DomainData(
            domains=list(self.domains),
            x=tensors["x"],
            y=tensors["y"],
            domain=tensors["domain"],
            split=tensors["split"],
            num_classes=NUM_CLASSES,
            class_names=[str(c) for c in range(NUM_CLASSES)],
            mean=mean,
            std=std,
            files=[],
        )
