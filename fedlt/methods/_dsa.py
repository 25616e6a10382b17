"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021) in the form CReFF's and CLIP2FL's released code apply it to the real samples of the
client-side gradients.

The code's mode ('S', single): each call picks ONE transform family of the strategy string uniformly at random and
applies it with parameters shared by the whole batch (Siamese: every image of the batch gets the same parameters).
Families and parameter ranges (the code's ``ParamDiffAug``):

- ``color``: brightness ``x + (r - 0.5) * 1.0``, then saturation ``(x - mean_channels) * 2.0 r + mean_channels``,
  then contrast ``(x - mean_image) * (r + 0.5) + mean_image`` (three uniform draws r in [0, 1)).
- ``crop``: an integer translation of up to ``int(0.125 * size + 0.5)`` pixels along each axis, zero fill.
- ``cutout``: a zeroed ``int(0.5 * H + 0.5)`` x ``int(0.5 * W + 0.5)`` box, clipped to the image, centred at a
  uniform offset.
- ``flip``: horizontal flip with probability 0.5.
- ``scale``: axis scales sx, sy uniform in [1/1.2, 1.2] through an affine sampling grid.
- ``rotate``: a rotation by an angle uniform in [-15, 15] degrees through an affine sampling grid.

Affine families sample bilinearly with zero padding and ``align_corners=False`` (the torch defaults the code runs
with). The images are augmented after normalisation, as in the code. Every draw comes from the ``generator``
passed in (the code re-seeds the global RNG from the wall clock, which no run can reproduce).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the released code's --dsa_strategy default

PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


def parse_dsa_strategy(strategy: str) -> tuple[str, ...]:
    """The transform families of an underscore-separated strategy string; ValueError on an unknown or empty one."""
    families = tuple(strategy.split("_")) if isinstance(strategy, str) else ()
    if not families or any(f not in DSA_FAMILIES for f in families):
        names = ", ".join(DSA_FAMILIES)
        raise ValueError(f"invalid dsa_strategy {strategy!r}: underscore-separated names from {names}")
    return families


def brightness(x: Tensor, r: float) -> Tensor:
    """Adds ``(r - 0.5) * BRIGHTNESS`` to every pixel."""
    return x + (r - 0.5) * BRIGHTNESS


def saturation(x: Tensor, r: float) -> Tensor:
    """Scales each pixel's deviation from its mean over the channels by ``r * SATURATION``."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (r * SATURATION) + mean


def contrast(x: Tensor, r: float) -> Tensor:
    """Scales each image's deviation from its mean over (C, H, W) by ``r + CONTRAST``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r + CONTRAST) + mean


def crop(x: Tensor, shift_h: int, shift_w: int) -> Tensor:
    """``out[..., i, j] = x[..., i + shift_h, j + shift_w]`` where that pixel exists, else 0."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) + shift_h
    cols = torch.arange(w, device=x.device) + shift_w
    keep = ((rows >= 0) & (rows < h)).unsqueeze(1) & ((cols >= 0) & (cols < w)).unsqueeze(0)
    out = x.index_select(-2, rows.clamp(0, h - 1)).index_select(-1, cols.clamp(0, w - 1))
    return out * keep.to(x.dtype)


def cutout_size(h: int, w: int) -> tuple[int, int]:
    """Side lengths of the cutout box."""
    return int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)


def cutout(x: Tensor, offset_h: int, offset_w: int) -> Tensor:
    """Zeroes the box of ``cutout_size`` whose top-left corner is ``offset - size // 2`` (clipped to the image)."""
    h, w = x.shape[-2:]
    sh, sw = cutout_size(h, w)
    top, left = offset_h - sh // 2, offset_w - sw // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    box = ((rows >= top) & (rows < top + sh)).unsqueeze(1) & ((cols >= left) & (cols < left + sw)).unsqueeze(0)
    return x * (~box).to(x.dtype)


def flip(x: Tensor, do_flip: bool) -> Tensor:
    """Horizontal (width) flip when ``do_flip``."""
    return x.flip(-1) if do_flip else x


def affine(x: Tensor, theta: Tensor) -> Tensor:
    """Samples ``x`` (B, C, H, W) through the (2, 3) affine map ``theta`` (shared by the batch): bilinear, zero
    padding, ``align_corners=False``."""
    theta = theta.to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale(x: Tensor, sx: float, sy: float) -> Tensor:
    """Affine scaling of the sampling grid: ``theta = [[sx, 0, 0], [0, sy, 0]]``."""
    return affine(x, torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]))


def rotate(x: Tensor, angle: float) -> Tensor:
    """Affine rotation of the sampling grid by ``angle`` radians: ``theta = [[cos, -sin, 0], [sin, cos, 0]]``."""
    c, s = math.cos(angle), math.sin(angle)
    return affine(x, torch.tensor([[c, -s, 0.0], [s, c, 0.0]]))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def dsa_augment(x: Tensor, families: tuple[str, ...], generator: torch.Generator) -> Tensor:
    """One DSA draw on the batch ``x`` (B, C, H, W): a family picked uniformly from ``families``, its parameters
    drawn once for the whole batch (Siamese), all from the CPU ``generator``."""
    family = families[_randint(0, len(families), generator)]
    h, w = x.shape[-2:]
    if family == "color":
        x = brightness(x, _uniform(generator))
        x = saturation(x, _uniform(generator))
        return contrast(x, _uniform(generator))
    if family == "crop":
        mh, mw = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
        return crop(x, _randint(-mh, mh + 1, generator), _randint(-mw, mw + 1, generator))
    if family == "cutout":
        sh, sw = cutout_size(h, w)
        return cutout(x, _randint(0, h + 1 - sh % 2, generator), _randint(0, w + 1 - sw % 2, generator))
    if family == "flip":
        return flip(x, _uniform(generator) < PROB_FLIP)
    if family == "scale":
        lo = 1.0 / RATIO_SCALE
        sx = _uniform(generator) * (RATIO_SCALE - lo) + lo
        sy = _uniform(generator) * (RATIO_SCALE - lo) + lo
        return scale(x, sx, sy)
    return rotate(x, (_uniform(generator) - 0.5) * 2 * math.radians(RATIO_ROTATE))
