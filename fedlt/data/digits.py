"""Deterministic synthesis of an MNIST-like digits dataset from scikit-learn's bundled 8x8 digits.

The 1,797 real 8x8 digits of ``sklearn.datasets.load_digits`` (no download) are split per class into train
sources and held-out test sources, upsampled into an MNIST-style frame (digit in the central 20/28 of the image)
and varied with a random affine map, a smooth elastic displacement, stroke-thickness jitter, contrast jitter and
Gaussian noise. All randomness comes from explicitly seeded generators, so a build is bit-identical for the same
parameters; the work runs in fixed-size chunks, vectorised over the chunk.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIGITS_VERSION", "build_digits"]

DIGITS_VERSION = 1
"""Bumped whenever the synthesis changes, so stale cache files are never reused."""

DRAW_CHUNK = 2048  # fixed so the random draws, and hence the images, do not depend on anything but the params
NUM_CLASSES = 10


def _digit_source_split(targets: np.ndarray, holdout_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits the real digit images per class into train sources and held-out test sources.

    Args:
        targets: labels of the sklearn digits, shape (1797,).
        holdout_per_class: source images per class reserved for the test set only.
        seed: seed of the per-class shuffle.

    Returns:
        (train source indices, test source indices), each sorted int64; disjoint by construction.

    Raises:
        ValueError: a class has no source image left for training.
    """
    rng = np.random.default_rng([seed, 7])
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(targets == c))
        if idx.size <= holdout_per_class or holdout_per_class < 1:
            raise ValueError(
                f"digit class {c} has {idx.size} source images; holdout_per_class must be in [1, {idx.size - 1}], "
                f"got {holdout_per_class}"
            )
        test.append(idx[:holdout_per_class])
        train.append(idx[holdout_per_class:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def _plan(sources: np.ndarray, targets: np.ndarray, per_class: int) -> np.ndarray:
    # Class-major list of source indices, cycling through each class's sources.
    plan = []
    for c in range(NUM_CLASSES):
        own = sources[targets[sources] == c]
        plan.append(own[np.arange(per_class) % own.size])
    return np.concatenate(plan)


def base_images(images: np.ndarray, image_size: int) -> Tensor:
    # MNIST keeps a 4-pixel border around a 20x20 digit; mimic it so translations rarely clip strokes.
    inner = max(4, round(image_size * 20 / 28))
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(inner, inner), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    pad = image_size - inner
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


def uniform_signed(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) * 2.0 - 1.0


def _affine_grid(n: int, size: int, strength: float, g: torch.Generator) -> Tensor:
    # theta maps output to input coordinates: rotation (+-15 deg), shear (+-0.15), 1/scale (0.85..1.15),
    # translation +-10 % of the image (0.2 in the [-1, 1] coordinates of affine_grid).
    angle = uniform_signed(n, g) * math.radians(15.0) * strength
    scale = 1.0 + uniform_signed(n, g) * 0.15 * strength
    shear = uniform_signed(n, g) * 0.15 * strength
    shift = torch.stack([uniform_signed(n, g), uniform_signed(n, g)], dim=1) * 0.2 * strength
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = torch.stack([cos, cos * shear - sin, sin, sin * shear + cos], dim=1).view(n, 2, 2) / scale.view(n, 1, 1)
    theta = torch.cat([a, shift.view(n, 2, 1)], dim=2)
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def _elastic(n: int, size: int, strength: float, g: torch.Generator) -> Tensor:
    # Smooth displacement field (Simard et al. 2003 style): coarse Gaussian noise upsampled bicubically; the
    # amplitude is ~1 pixel (2/size in grid units) at strength 1.
    coarse = torch.randn(n, 2, 5, 5, generator=g) * (2.0 / size) * strength
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def vary_images(base: Tensor, strength: float, noise: float, g: torch.Generator) -> Tensor:
    n, _, size, _ = base.shape
    grid = _affine_grid(n, size, strength, g) + _elastic(n, size, strength, g)
    x = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Stroke thickness: blend towards a 3x3 dilation (t > 0) or erosion (t < 0).
    t = (uniform_signed(n, g) * 0.6 * strength).view(n, 1, 1, 1)
    dilated = F.max_pool2d(x, 3, 1, 1)
    eroded = -F.max_pool2d(-x, 3, 1, 1)
    x = torch.where(t > 0, x + t * (dilated - x), x - t * (eroded - x))
    contrast = (1.0 + uniform_signed(n, g) * 0.15 * strength).view(n, 1, 1, 1)
    x = x * contrast + torch.randn(x.shape, generator=g) * noise
    return (x.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def _synthesise(base: Tensor, plan: np.ndarray, strength: float, noise: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    chunks = [vary_images(base[torch.from_numpy(plan[i : i + DRAW_CHUNK])], strength, noise, g)
              for i in range(0, plan.size, DRAW_CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, *base.shape[1:], dtype=torch.uint8)


def build_digits(
    image_size: int, train_per_class: int, test_per_class: int, holdout_per_class: int, seed: int
) -> dict[str, Tensor]:
    """Builds the synthetic digits dataset (no caching; see ``EmbeddedDigits``).

    Args:
        image_size: side of the square output images.
        train_per_class: training images per class, synthesised from the train sources.
        test_per_class: test images per class (balanced), synthesised from the held-out sources.
        holdout_per_class: real source images per class reserved for the test set.
        seed: seed of the split and of the variation.

    Returns:
        ``train_x``/``test_x`` (uint8, N x 1 x S x S) and ``train_y``/``test_y`` (int64), class-major order.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported lazily (slow import)

    digits = load_digits()
    images, targets = np.asarray(digits.images), np.asarray(digits.target, dtype=np.int64)
    train_src, test_src = _digit_source_split(targets, holdout_per_class, seed)
    base = base_images(images, image_size)
    seeds = np.random.SeedSequence([seed, DIGITS_VERSION]).generate_state(2, dtype=np.uint64)
    train_plan = _plan(train_src, targets, train_per_class)
    test_plan = _plan(test_src, targets, test_per_class)
    return {
        "train_x": _synthesise(base, train_plan, 1.0, 0.05, int(seeds[0] >> np.uint64(1))),
        "train_y": torch.from_numpy(targets[train_plan]),
        # Milder variation for the test set: held-out writers, but no extreme distortions.
        "test_x": _synthesise(base, test_plan, 0.6, 0.03, int(seeds[1] >> np.uint64(1))),
        "test_y": torch.from_numpy(targets[test_plan]),
    }
