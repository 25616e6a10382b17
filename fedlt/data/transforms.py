"""Batched tensor augmentation for on-device datasets (docs/architecture.md 3: no DataLoader, no PIL for small data)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORMALIZATIONS", "ImageAugment", "TensorAugment", "clip_augment", "resize_images"]

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Named per-channel (mean, std) of x / 255: OpenAI CLIP's preprocessing and the torchvision ImageNet statistics."""


class TensorAugment:
    """Per-sample random crop with zero padding and random horizontal flip on a float batch (B, C, H, W).

    Equivalent to torchvision's ``RandomCrop(H, padding=p)`` + ``RandomHorizontalFlip()`` applied to each sample,
    but vectorised: the flip is folded into the column gather of the crop so the batch is read once.

    Args:
        crop_padding: zero padding p on each side before cropping back to (H, W); 0 disables the crop.
        hflip: flip each sample horizontally with probability 0.5.
    """

    def __init__(self, crop_padding: int = 0, hflip: bool = False) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
        self.hflip = hflip

    @property
    def is_identity(self) -> bool:
        """True when the augmentation does nothing."""
        return self.crop_padding == 0 and not self.hflip

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augments a batch.

        Random numbers are drawn on CPU from ``generator`` (offsets first, then flips) and moved to ``x.device``,
        so results depend only on the generator state, not on the device.

        Args:
            x: float batch (B, C, H, W).
            generator: CPU generator.

        Returns:
            Augmented batch of the same shape; ``x`` itself when the augmentation is the identity.
        """
        if self.is_identity:
            return x
        b, c, h, w = x.shape
        p = self.crop_padding
        cols = torch.arange(w).expand(b, w)
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
            rows = (offsets[0, :, None] + torch.arange(h)).to(x.device)
            cols = offsets[1, :, None] + cols
        if self.hflip:
            flip = torch.rand(b, generator=generator) < 0.5
            # Reversing the column order of the crop window is the same as flipping the cropped image.
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        cols = cols.to(x.device)
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
        return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def __repr__(self) -> str:
        return f"TensorAugment(crop_padding={self.crop_padding}, hflip={self.hflip})"


class ImageAugment:
    """Random-resized crop, horizontal flip and colour jitter on a float batch (B, C, H, W) of 0..255 values.

    The usual ImageNet-style training augmentation of domain generalization (DomainBed, DGviaER), vectorised over
    the batch. Per sample:

    1. random-resized crop: an area fraction ``s ~ U(scale)`` and an aspect ratio ``r`` (log-uniform in ``ratio``,
       truncated so that the ``s * H * W`` box with width / height ``r`` fits in the image, which is what
       torchvision's rejection sampling approximates) give a box at a uniform position, resampled (bilinear or
       bicubic, without antialiasing) to (H, W), or to (size, size) when ``size`` is set, with
       ``F.affine_grid`` + ``F.grid_sample``;
    2. horizontal flip with probability 0.5 (folded into the crop's affine map);
    3. colour jitter: brightness, contrast and saturation factors each ~ U(1 - j, 1 + j), applied in that order,
       clamping to [0, 255] after each (as torchvision's ``ColorJitter`` does on [0, 1] images).

    Every step commutes with scaling the batch by 1/255, so augmenting 0..255 floats and normalising afterwards
    equals augmenting x / 255.

    Args:
        scale: range of the crop's area fraction; ``(1.0, 1.0)`` disables the crop.
        ratio: range of the crop's aspect ratio (width / height).
        hflip: flip each sample horizontally with probability 0.5.
        color_jitter: strength j of the brightness, contrast and saturation jitter in [0, 1); 0 disables it.
        size: output side; None keeps the input's (H, W). With a size the crop is always on (``scale`` (1, 1)
            then resizes the whole image).
        interpolation: resampling of the crop, ``bilinear`` or ``bicubic``.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (1.0, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: bool = False,
        color_jitter: float = 0.0,
        size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        scale = (float(scale[0]), float(scale[1]))
        ratio = (float(ratio[0]), float(ratio[1]))
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.color_jitter = float(color_jitter)
        self.size = size
        self.interpolation = interpolation

    @property
    def crops(self) -> bool:
        """Whether the random-resized crop is on (``scale`` below 1, or an output ``size``)."""
        return self.scale[0] < 1.0 or self.size is not None

    @property
    def is_identity(self) -> bool:
        """True when the augmentation does nothing."""
        return not self.crops and not self.hflip and self.color_jitter == 0.0

    def _boxes(self, b: int, h: int, w: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Crop boxes as fractions of the image: (width, height, left, top), each (B,) float64 on CPU."""
        u = torch.rand(4, b, generator=generator, dtype=torch.float64)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        # Width fraction sqrt(s r h / w) <= 1 and height fraction sqrt(s w / (r h)) <= 1 bound log r per sample.
        lo = torch.clamp(torch.log(s * w / h), min=math.log(self.ratio[0]))
        hi = torch.clamp(torch.log(w / (s * h)), max=math.log(self.ratio[1]))
        lo = torch.minimum(lo, hi)  # an empty interval (extreme image shapes) degrades to its upper end
        r = torch.exp(lo + (hi - lo) * u[1])
        cw = torch.sqrt(s * r * h / w).clamp(max=1.0)
        ch = torch.sqrt(s * w / (r * h)).clamp(max=1.0)
        return cw, ch, (1.0 - cw) * u[2], (1.0 - ch) * u[3]

    def _crop(self, x: Tensor, flip: Tensor | None, generator: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        cw, ch, left, top = self._boxes(b, h, w, generator)
        sx = cw if flip is None else torch.where(flip, -cw, cw)  # a negative x scale mirrors the crop
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = 2.0 * left + cw - 1.0  # box centre in [-1, 1] coordinates
        theta[:, 1, 1] = ch
        theta[:, 1, 2] = 2.0 * top + ch - 1.0
        dtype = x.dtype if x.is_floating_point() else torch.float32
        size = [b, x.shape[1], h, w] if self.size is None else [b, x.shape[1], self.size, self.size]
        grid = F.affine_grid(theta.to(x.device, dtype), size, align_corners=False)
        out = F.grid_sample(x.to(dtype), grid, mode=self.interpolation, padding_mode="border", align_corners=False)
        # Bilinear weights summing to 1 + eps can overshoot 255 by rounding; bicubic overshoots at edges (PIL clips).
        return out.clamp_(0.0, 255.0)

    def _jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c = x.shape[:2]
        j = self.color_jitter
        f = (1.0 - j + 2.0 * j * torch.rand(3, b, generator=generator)).to(x.device, x.dtype)[:, :, None, None, None]
        x = (x * f[0]).clamp(0.0, 255.0)  # brightness
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (mean + f[1] * (x - mean)).clamp(0.0, 255.0)  # contrast: blend with the mean grey level
        if c == 3:
            gray = _gray(x)
            x = (gray + f[2] * (x - gray)).clamp(0.0, 255.0)  # saturation: blend with the grey image
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augments a batch.

        Random numbers are drawn on CPU from ``generator`` (flips first, then crop boxes, then jitter factors;
        only for the enabled steps) and moved to ``x.device``, so results depend only on the generator state.

        Args:
            x: float batch (B, C, H, W) with values in [0, 255].
            generator: CPU generator.

        Returns:
            Augmented batch of the same shape, or (B, C, size, size); ``x`` itself when the augmentation is the
            identity.
        """
        if self.is_identity:
            return x
        flip = torch.rand(x.shape[0], generator=generator) < 0.5 if self.hflip else None
        if self.crops:
            x = self._crop(x, flip, generator)
        elif flip is not None:
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        if self.color_jitter > 0.0:
            x = self._jitter(x, generator)
        return x

    def __repr__(self) -> str:
        return (
            f"ImageAugment(scale={self.scale}, ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), hflip={self.hflip}, "
            f"color_jitter={self.color_jitter}, size={self.size}, interpolation={self.interpolation!r})"
        )


def clip_augment(size: int | None = None) -> ImageAugment:
    """CoOp/Dassl training augmentation of CLIP fine-tuning (FedPuReL, docs/reference.md 1.9).

    ``RandomResizedCrop(size, scale=(0.08, 1), interpolation=BICUBIC)`` + ``RandomHorizontalFlip()``.

    Args:
        size: output side; None keeps the stored image's side.

    Returns:
        The batched augmentation.
    """
    return ImageAugment(scale=(0.08, 1.0), hflip=True, size=size, interpolation="bicubic")


def resize_images(x: Tensor, size: int) -> Tensor:
    """Bicubic, antialiased resize of a float batch (B, C, H, W) of 0..255 values to (size, size).

    The evaluation resize of CLIP preprocessing on a square image (torchvision ``Resize(size, BICUBIC,
    antialias=True)``); values are clamped to [0, 255] as PIL's uint8 output is.

    Args:
        x: float batch (B, C, H, W).
        size: output side.

    Returns:
        (B, C, size, size); ``x`` itself when it already has that size.
    """
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0.0, 255.0)


def _gray(x: Tensor) -> Tensor:
    """Luma (ITU-R 601, as torchvision's ``rgb_to_grayscale``) of an RGB batch, (B, 1, H, W); x itself if C = 1."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
