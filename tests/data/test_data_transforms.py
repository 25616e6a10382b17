"""Tests of fedlt.data.transforms: TensorAugment against a per-sample reference, and ImageAugment."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fedlt.data.transforms import ImageAugment, TensorAugment


def _batch(b: int = 16, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w) + 1.0  # no zeros: padding is visible


def test_identity_returns_input_and_draws_nothing() -> None:
    x = _batch()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert TensorAugment()(x, g) is x
    assert torch.equal(g.get_state(), state)


def test_crop_is_a_window_of_the_padded_input() -> None:
    x = _batch()
    p = 2
    out = TensorAugment(crop_padding=p)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = F.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(x.shape[0]):
        windows = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + x.shape[2], dx : dx + x.shape[3]])
        ]
        assert len(windows) == 1, f"sample {i} is not a window of the padded input"
        offsets.add(windows[0])
    assert len(offsets) > 3  # per-sample offsets, not one shared shift


def test_flip_only() -> None:
    x = _batch(b=64)
    out = TensorAugment(hflip=True)(x, torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48  # probability 0.5


def test_crop_and_flip_match_reference() -> None:
    # Reference: draw the same numbers in the same order, then crop and flip sample by sample.
    x = _batch(b=12)
    p = 3
    out = TensorAugment(crop_padding=p, hflip=True)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 2 * p + 1, (2, 12), generator=g)
    flip = torch.rand(12, generator=g) < 0.5
    padded = F.pad(x, (p, p, p, p))
    for i in range(12):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        ref = padded[i, :, dy : dy + 8, dx : dx + 10]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)


def test_deterministic_given_generator_seed() -> None:
    x = torch.rand(32, 1, 12, 12)
    aug = TensorAugment(crop_padding=2, hflip=True)
    a = aug(x, torch.Generator().manual_seed(9))
    b = aug(x, torch.Generator().manual_seed(9))
    c = aug(x, torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_negative_padding_rejected() -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        TensorAugment(crop_padding=-1)


def test_vectorised_speed_reported() -> None:
    x = torch.rand(512, 3, 32, 32)
    aug = TensorAugment(crop_padding=4, hflip=True)
    g = torch.Generator().manual_seed(0)
    aug(x, g)
    start = time.perf_counter()
    for _ in range(10):
        out = aug(x, g)
    ms = (time.perf_counter() - start) * 100
    print(f"TensorAugment(4, hflip) on 512x3x32x32: {ms:.2f} ms/batch")
    assert out.shape == x.shape


# ------------------------------------------------------------------------------------------------ ImageAugment
def _images(b: int = 8, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def _ramps(b: int, size: int) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index, channel 2 = 0 (values are pixel coordinates)."""
    cols = torch.arange(size, dtype=torch.float32).expand(size, size)
    return torch.stack([cols, cols.t(), torch.zeros(size, size)]).expand(b, 3, size, size).clone()


@pytest.mark.parametrize(
    "aug",
    [
        ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4),
        ImageAugment(scale=(0.5, 1.0)),
        ImageAugment(hflip=True),
        ImageAugment(color_jitter=0.3),
    ],
)
def test_image_augment_shape_dtype_and_range(aug: ImageAugment) -> None:
    x = _images(b=16, h=12, w=20)
    x[0] = 255.0
    x[1] = 0.0
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not aug.is_identity and not torch.equal(out, x)


def test_image_augment_identity_returns_input_and_draws_nothing() -> None:
    x = _images()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for aug in (ImageAugment(), ImageAugment(scale=(1.0, 1.0), hflip=False, color_jitter=0.0)):
        assert aug.is_identity
        assert aug(x, g) is x
    assert torch.equal(g.get_state(), state)


def test_image_augment_deterministic_given_generator_seed() -> None:
    x = _images(b=16)
    aug = ImageAugment(scale=(0.5, 1.0), hflip=True, color_jitter=0.4)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_image_augment_flip_only() -> None:
    x = _images(b=64, w=10)
    out = ImageAugment(hflip=True)(x, torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48  # probability 0.5


def test_image_augment_crop_zooms_like_a_hand_computed_crop() -> None:
    # scale 1/4 with ratio 1: a box of half the side at a uniform position, resampled to the full size (2x zoom).
    # On coordinate ramps the output is the box's pixel coordinates: left * W + cw (j + 0.5) - 0.5 (bilinear is
    # exact on a linear image; border padding clamps to [0, W - 1]).
    b, size = 32, 16
    out = ImageAugment(scale=(0.25, 0.25), ratio=(1.0, 1.0))(_ramps(b, size), torch.Generator().manual_seed(7))
    u = torch.rand(4, b, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # same draws
    left, top = 0.5 * u[2], 0.5 * u[3]
    j = torch.arange(size, dtype=torch.float64)
    cols = (left[:, None] * size + 0.5 * (j + 0.5) - 0.5).clamp(0, size - 1)
    rows = (top[:, None] * size + 0.5 * (j + 0.5) - 0.5).clamp(0, size - 1)
    torch.testing.assert_close(out[:, 0], cols[:, None, :].expand(b, size, size).float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[:, 1], rows[:, :, None].expand(b, size, size).float(), rtol=0, atol=1e-4)
    assert torch.allclose(out[:, 0, :, 9] - out[:, 0, :, 8], torch.tensor(0.5), atol=1e-4)  # 2x zoom
    assert left.std() > 0.05  # per-sample positions


def test_image_augment_crop_with_flip_mirrors_the_box() -> None:
    b, size = 64, 16
    aug = ImageAugment(scale=(0.25, 0.25), ratio=(1.0, 1.0), hflip=True)
    out = aug(_ramps(b, size), torch.Generator().manual_seed(1))
    step = out[:, 0, 0, 9] - out[:, 0, 0, 8]
    assert torch.all(((step - 0.5).abs() < 1e-4) | ((step + 0.5).abs() < 1e-4))
    assert 16 < int((step < 0).sum()) < 48  # half of the crops are mirrored


def test_image_augment_crop_area_and_aspect_ratio() -> None:
    # Each output column of a column ramp advances by the box width fraction cw, each row by ch.
    b, size = 256, 32
    aug = ImageAugment(scale=(0.3, 0.9), ratio=(3 / 4, 4 / 3))
    out = aug(_ramps(b, size), torch.Generator().manual_seed(5))
    cw = out[:, 0, 0, 17] - out[:, 0, 0, 16]
    ch = out[:, 1, 17, 0] - out[:, 1, 16, 0]
    area, ratio = cw * ch, cw / ch
    assert area.min() > 0.3 - 1e-3 and area.max() < 0.9 + 1e-3
    assert ratio.min() > 3 / 4 - 1e-3 and ratio.max() < 4 / 3 + 1e-3
    assert area.max() - area.min() > 0.3 and ratio.max() - ratio.min() > 0.3


def test_image_augment_color_jitter_on_grey_images_is_brightness() -> None:
    # On a flat grey image contrast and saturation change nothing: each sample is scaled by its brightness factor.
    x = torch.full((64, 3, 4, 4), 100.0)
    out = ImageAugment(color_jitter=0.4)(x, torch.Generator().manual_seed(0))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)
    v = per_sample[:, 0]
    assert v.min() >= 60.0 - 1e-3 and v.max() <= 140.0 + 1e-3 and v.std() > 10.0
    x = torch.full((8, 3, 4, 4), 250.0)
    assert ImageAugment(color_jitter=0.4)(x, torch.Generator().manual_seed(0)).max() <= 255.0


def test_image_augment_rejects_bad_arguments_and_reprs() -> None:
    for kwargs in ({"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)}, {"scale": (0.5, 1.2)}, {"ratio": (2.0, 1.0)},
                   {"color_jitter": 1.0}, {"color_jitter": -0.1}):
        with pytest.raises(ValueError):
            ImageAugment(**kwargs)
    r = repr(ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4))
    assert r.startswith("ImageAugment(") and "hflip=True" in r and "color_jitter=0.4" in r


def test_image_augment_speed_reported() -> None:
    x = _images(b=64, h=64, w=64)
    aug = ImageAugment(scale=(0.8, 1.0), hflip=True, color_jitter=0.4)
    g = torch.Generator().manual_seed(0)
    aug(x, g)
    start = time.perf_counter()
    for _ in range(5):
        out = aug(x, g)
    print(f"ImageAugment(0.8-1, hflip, jitter 0.4) on 64x3x64x64: {(time.perf_counter() - start) * 200:.2f} ms/batch")
    assert out.shape == x.shape
