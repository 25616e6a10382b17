"""Differentiable Siamese augmentation (CReFF / CLIP2FL ``real_augment: dsa``): every transform against a
hand-written reference on a tiny tensor with fixed parameters, and the sampler's one-family, batch-shared draws."""

from __future__ import annotations

import math

import pytest
import torch

from fedlt.methods import _dsa as dsa


def _img(b: int = 2, c: int = 3, h: int = 5, w: int = 6) -> torch.Tensor:
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w) / 10.0 - 3.0


def test_color_transforms_by_hand():
    x = _img(1, 2, 2, 2)
    torch.testing.assert_close(dsa.brightness(x, 0.8), x + 0.3)
    ref = x.clone()
    for i in range(2):
        for j in range(2):
            m = (x[0, 0, i, j] + x[0, 1, i, j]) / 2
            ref[0, :, i, j] = (x[0, :, i, j] - m) * (0.25 * 2.0) + m
    torch.testing.assert_close(dsa.saturation(x, 0.25), ref)
    m = x.sum() / x.numel()
    torch.testing.assert_close(dsa.contrast(x, 0.1), (x - m) * 0.6 + m)


@pytest.mark.parametrize("sh,sw", [(0, 0), (1, -2), (-1, 1), (2, 2)])
def test_crop_is_an_integer_shift_with_zero_fill(sh, sw):
    x = _img()
    out = dsa.crop(x, sh, sw)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            src_i, src_j = i + sh, j + sw
            expected = x[..., src_i, src_j] if 0 <= src_i < h and 0 <= src_j < w else torch.zeros(2, 3)
            torch.testing.assert_close(out[..., i, j], expected)


@pytest.mark.parametrize("oh,ow", [(0, 0), (2, 3), (5, 6), (4, 1)])
def test_cutout_zeroes_the_box_around_the_offset(oh, ow):
    x = _img() + 10.0  # no zeros of its own
    h, w = x.shape[-2:]
    assert dsa.cutout_size(h, w) == (3, 3)  # int(2.5 + 0.5), int(3 + 0.5)
    out = dsa.cutout(x, oh, ow)
    for i in range(h):
        for j in range(w):
            inside = oh - 1 <= i <= oh + 1 and ow - 1 <= j <= ow + 1  # size 3: offset - 1 ... offset + 1
            expected = torch.zeros(2, 3) if inside else x[..., i, j]
            torch.testing.assert_close(out[..., i, j], expected)


def test_flip_flips_the_width():
    x = _img()
    assert torch.equal(dsa.flip(x, False), x)
    out = dsa.flip(x, True)
    for j in range(x.shape[-1]):
        assert torch.equal(out[..., j], x[..., x.shape[-1] - 1 - j])


def _bilinear_reference(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Pixel-by-pixel affine resampling: output pixel centres in [-1, 1] coordinates (align_corners=False), mapped
    through theta, read bilinearly from the input with zeros outside."""
    _, _, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            sx = theta[0][0] * xn + theta[0][1] * yn + theta[0][2]
            sy = theta[1][0] * xn + theta[1][1] * yn + theta[1][2]
            u, v = ((sx + 1) * w - 1) / 2, ((sy + 1) * h - 1) / 2  # input pixel coordinates
            u0, v0 = math.floor(u), math.floor(v)
            for vi in (v0, v0 + 1):
                for uj in (u0, u0 + 1):
                    if 0 <= vi < h and 0 <= uj < w:
                        out[:, :, i, j] += (1 - abs(u - uj)) * (1 - abs(v - vi)) * x[:, :, vi, uj]
    return out


@pytest.mark.parametrize("sx,sy", [(1.0, 1.0), (0.9, 1.15), (1.2, 1 / 1.2)])
def test_scale_matches_a_hand_built_bilinear_resampling(sx, sy):
    x = _img()
    ref = _bilinear_reference(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])
    torch.testing.assert_close(dsa.scale(x, sx, sy), ref, rtol=1e-5, atol=1e-5)
    if sx == sy == 1.0:
        torch.testing.assert_close(dsa.scale(x, sx, sy), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degrees", [0.0, 10.0, -15.0])
def test_rotate_matches_a_hand_built_bilinear_resampling(degrees):
    x = _img(1, 2, 6, 6)
    a = math.radians(degrees)
    ref = _bilinear_reference(x, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    torch.testing.assert_close(dsa.rotate(x, a), ref, rtol=1e-5, atol=1e-5)


def test_rotate_by_a_right_angle_on_a_square_permutes_pixels():
    x = _img(1, 1, 4, 4)
    out = dsa.rotate(x, math.pi / 2)
    for i in range(4):
        for j in range(4):
            assert out[0, 0, i, j].item() == pytest.approx(x[0, 0, j, 3 - i].item(), abs=1e-5)


def test_strategy_parsing():
    assert dsa.parse_dsa_strategy(dsa.DSA_STRATEGY) == dsa.DSA_FAMILIES
    assert dsa.parse_dsa_strategy("flip") == ("flip",)
    for bad in ("", "flip_", "jitter", "color_noise", None):
        with pytest.raises(ValueError, match="dsa_strategy"):
            dsa.parse_dsa_strategy(bad)


def test_one_family_per_draw_shared_by_the_batch_and_reproducible():
    x = _img(1, 3, 8, 8).repeat(4, 1, 1, 1)  # four equal images
    for seed in range(30):
        out = dsa.dsa_augment(x, dsa.DSA_FAMILIES, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        for k in range(1, 4):
            assert torch.equal(out[k], out[0])  # Siamese: the same parameters for every image
        again = dsa.dsa_augment(x, dsa.DSA_FAMILIES, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
    # A flip-only strategy gives the image or its mirror, both over a few draws.
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = dsa.dsa_augment(x, ("flip",), gen)
        assert torch.equal(out, x) or torch.equal(out, x.flip(-1))
        seen.add(torch.equal(out, x))
    assert seen == {True, False}


def test_the_sampler_draws_in_the_code_ranges():
    x = _img(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(1)
    # crop: shifts of at most int(8 * 0.125 + 0.5) = 1 pixel
    for _ in range(20):
        out = dsa.dsa_augment(x, ("crop",), gen)
        assert any(torch.equal(out, dsa.crop(x, a, b)) for a in (-1, 0, 1) for b in (-1, 0, 1))
    # cutout: a 4 x 4 box (even size: offsets 0 ... 8)
    for _ in range(20):
        out = dsa.dsa_augment(x + 10, ("cutout",), gen)
        zeros = (out[0, 0] == 0).sum().item()
        assert 4 <= zeros <= 16
