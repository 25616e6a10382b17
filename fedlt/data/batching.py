"""How ``FederatedDataset.get_batch`` turns stored images into model inputs (docs/architecture.md 3,
docs/reference.md 1.9).

Small datasets live on the device as uint8 tensors and are batched by index with tensor augmentation, so there is
no DataLoader per client. Large or file-backed (memory-mapped) images stay on the host and only each batch travels
to the device. ``BatchPipeline`` holds the choices behind a batch: where the images live (``storage``), the
training augmentation (the source's or CLIP's), the per-batch resize (e.g. 32 px CIFAR to CLIP's 224 px) and the
normalisation (the source's or a named mean/std), and applies them: gather -> float -> augment -> resize ->
normalise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlt.data.transforms import NORMALIZATIONS, clip_augment, resize_images

__all__ = ["AUGMENTATIONS", "HOST_STORAGE_BYTES", "STORAGE_MODES", "BatchPipeline", "TensorSplit", "check_choice"]

AUGMENTATIONS: tuple[str, ...] = ("source", "clip")
"""Training augmentations: the source's own, or CLIP's random-resized crop (scale 0.08-1, bicubic) + flip."""

STORAGE_MODES: tuple[str, ...] = ("auto", "device", "host")
"""Where the image tensors live: ``auto`` picks ``host`` for file-backed or > ``HOST_STORAGE_BYTES`` images."""

HOST_STORAGE_BYTES = 4 * 2**30
"""``storage: auto`` keeps the images on the host above this size (train + test, as loaded)."""


@dataclass
class TensorSplit:
    """Images, labels and optional domain ids of one split, all on the same device."""

    x: Tensor
    y: Tensor
    domain: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str, images: bool = True) -> TensorSplit:
        """Returns a copy on ``device`` (tensors already there are not copied).

        Args:
            device: target device.
            images: also move ``x``; False keeps the images where they are (host storage).
        """
        domain = None if self.domain is None else self.domain.to(device)
        return TensorSplit(self.x.to(device) if images else self.x, self.y.to(device), domain)


def check_choice(option: str, value: str | None, valid: tuple[str | None, ...]) -> None:
    """Raises ``ValueError`` listing the valid values (None as ``null``) when ``value`` is not one of them."""
    if value not in valid:
        names = ", ".join("null" if v is None else v for v in valid)
        raise ValueError(f"unknown {option} {value!r}; valid: {names}")


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]``; host images indexed by device indices are gathered on the host, then sent to the device."""
    if x.device.type != "cpu" or idx.device.type == "cpu":
        return x[idx]
    batch = x[idx.cpu()]
    if idx.device.type == "cuda":
        batch = batch.pin_memory()  # pinned, so the copy is asynchronous
    return batch.to(idx.device, non_blocking=True)


class BatchPipeline:
    """Stored images -> model inputs: gather (from host or device storage), float, augment, resize, normalise.

    Unconfigured (as built) it only gathers and resizes; ``configure`` picks the normalisation statistics, the
    training augmentation and the storage from the loaded data, ``output_shape`` resolves the batch shape and
    ``to`` places the normalisation on the device.

    Args:
        resize: side of the returned batches; None keeps the stored side.
    """

    def __init__(self, resize: int | None = None) -> None:
        self.resize = resize
        self.augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
        self.host_images = False  # images kept on the host (resolved storage)
        self.stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.repeat_channels = False  # 1-channel images under a 3-channel normalisation
        self._scale: Tensor | None = None  # 1 / (255 std), shape (1, C, 1, 1)
        self._shift: Tensor | None = None  # mean / std, shape (1, C, 1, 1)

    def configure(
        self,
        data: Any,
        images: tuple[Tensor, ...],
        normalization: str | None,
        augmentation: str | None,
        source: Any,
        storage: str,
    ) -> None:
        """Normalisation statistics, training augmentation and storage for loaded data.

        Args:
            data: the loaded source data (``mean``, ``std`` and optionally ``file_backed``).
            images: the image tensors as loaded (their size decides ``storage: auto``).
            normalization: None (the source's ``data.mean`` / ``data.std``) or a key of ``NORMALIZATIONS``.
            augmentation: ``clip``, ``source`` (``source.augment``) or None (no training augmentation).
            source: the data source, whose ``augment`` is the ``source`` augmentation.
            storage: one of ``STORAGE_MODES``.
        """
        self.stats = NORMALIZATIONS[normalization] if normalization else (tuple(data.mean), tuple(data.std))
        if augmentation is None:
            self.augment = None
        elif augmentation == "clip":
            self.augment = clip_augment(self.resize)
        else:
            self.augment = source.augment
        if storage == "auto":
            size = sum(x.numel() * x.element_size() for x in images)
            self.host_images = bool(getattr(data, "file_backed", False)) or size > HOST_STORAGE_BYTES
        else:
            self.host_images = storage == "host"

    def output_shape(self, stored_channels: int, stored_size: int, normalization: str | None) -> tuple[int, int]:
        """``(in_channels, image_size)`` of the batches (what the model sees) for images of the stored shape.

        Raises:
            ValueError: the normalisation's channels do not fit the images (only 1 -> 3 is repeated).
        """
        norm_channels = stored_channels if self.stats is None else len(self.stats[0])
        self.repeat_channels = stored_channels == 1 and norm_channels > 1
        if norm_channels != stored_channels and not self.repeat_channels:
            raise ValueError(f"normalization {normalization or 'of the source'} has {norm_channels} channels but "
                             f"the images have {stored_channels}")
        return norm_channels, self.resize if self.resize is not None else stored_size

    def to(self, device: torch.device) -> None:
        """Places the normalisation constants on ``device``."""
        if self.stats is not None:
            mean = torch.tensor(self.stats[0], dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.stats[1], dtype=torch.float32, device=device).view(1, -1, 1, 1)
            # (x / 255 - mean) / std folded into one multiply-subtract on the hot path.
            self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, x: Tensor, idx: Tensor, generator: torch.Generator | None, train: bool) -> Tensor:
        """The batch ``x[idx]`` as float model inputs (augmented when ``train`` and a generator is given)."""
        x = _gather(x, idx)
        if x.dtype == torch.uint8:
            # Augmenting the 0..255 floats equals augmenting x / 255: crop pads zeros and flips do not scale.
            x = x.float()
        if train and generator is not None and self.augment is not None:
            x = self.augment(x, generator)
        if self.resize is not None:
            x = resize_images(x, self.resize)  # no-op when the augmentation already produced this size
        if self._scale is not None and self._shift is not None:  # set together by the normalisation
            if self.repeat_channels:
                x = (x * self._scale).sub_(self._shift)  # (B, 1, H, W) broadcasts to the normalisation's channels
            else:
                # In place is safe: tensor indexing above always produced a fresh tensor.
                x = x.mul_(self._scale).sub_(self._shift)
        return x
