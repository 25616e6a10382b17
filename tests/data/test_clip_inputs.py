"""FederatedDataset inputs for CLIP models: per-batch resize, named normalisations, CLIP augmentation, host storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fedlt.data.batching as batching
from fedlt.data.federated import FederatedDataset
from fedlt.data.partition import IID
from fedlt.data.sources import DataSource, SourceData
from fedlt.data.transforms import NORMALIZATIONS, ImageAugment, TensorAugment, resize_images
from fedlt.models import build_model

CLIP_MEAN, CLIP_STD = NORMALIZATIONS["clip"]


def _smooth_images(n: int, channels: int, side: int, offset: int) -> np.ndarray:
    # Smooth patterns (bicubic resizes of them stay within ~1 grey level of PIL's), different per image and channel.
    i = np.arange(n)[:, None, None, None] + offset
    ch = np.arange(channels)[None, :, None, None]
    yy, xx = np.mgrid[0:side, 0:side]
    x = 127 + 100 * np.sin((xx + i) / 3.0) * np.cos((yy + 2 * ch) / 4.0)
    return np.ascontiguousarray(x.astype(np.uint8))


class _Smooth(DataSource):
    """4 classes of smooth 16 px images; optionally memory-mapped from .npy files, like the file-backed sources."""

    name = "smooth"
    augment = TensorAugment(crop_padding=2, hflip=True)

    def __init__(self, channels: int = 3, folder: Path | None = None, per_class: int = 12) -> None:
        self.channels, self.folder, self.per_class = channels, folder, per_class

    def _images(self, split: str, n: int, offset: int) -> torch.Tensor:
        x = _smooth_images(n, self.channels, 16, offset)
        if self.folder is None:
            return torch.from_numpy(x)
        path = self.folder / f"{split}.npy"
        np.save(path, x)
        return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write map, as lt_sources does

    def load(self) -> SourceData:
        n = 4 * self.per_class
        data = SourceData(
            train_x=self._images("train", n, 0),
            train_y=torch.arange(n) % 4,
            test_x=self._images("test", 20, 1000),
            test_y=torch.arange(20) % 4,
            num_classes=4,
            class_names=["a", "b", "c", "d"],
            mean=(0.5,) * self.channels,
            std=(0.25,) * self.channels,
        )
        data.file_backed = self.folder is not None  # works with and without the SourceData field
        self.last = data
        return data


def _fed(source: DataSource | None = None, **kw) -> FederatedDataset:
    kw = {"num_clients": 2, "imbalance_factor": 1.0, "partition": IID(), "seed": 0, **kw}
    ds = FederatedDataset(source or _Smooth(), **kw)
    ds.setup("cpu")
    return ds


def test_eval_resize_and_clip_normalisation_match_pil() -> None:
    ds = _fed(image_size=40, normalization="clip")
    assert (ds.in_channels, ds.image_size, ds.stored_image_size) == (3, 40, 16)
    x, y = ds.get_batch(ds.test, torch.arange(len(ds.test)))
    assert x.shape == (20, 3, 40, 40) and torch.equal(y, ds.test.y)
    raw = ds.test.x.numpy()
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    for i in (0, 7, 19):
        pil = np.stack([np.asarray(Image.fromarray(raw[i, c]).resize((40, 40), Image.BICUBIC)) for c in range(3)])
        expected = (pil / 255.0 - mean) / std
        # PIL rounds to uint8 (and between its two passes): within ~1 grey level of the float resize.
        assert np.abs(x[i].numpy() - expected).max() < 1.5 / 255 / min(CLIP_STD)
    reference = F.interpolate(ds.test.x.float(), size=(40, 40), mode="bicubic", antialias=True).clamp(0, 255)
    reference = (reference / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


def test_constant_image_keeps_its_value() -> None:
    x = torch.full((2, 3, 8, 8), 200.0)
    torch.testing.assert_close(resize_images(x, 224), torch.full((2, 3, 224, 224), 200.0))
    assert resize_images(x, 8) is x


def test_one_channel_repeats_to_three() -> None:
    ds = _fed(_Smooth(channels=1), normalization="imagenet")
    assert (ds.in_channels, ds.image_size) == (3, 16)
    x, _ = ds.get_batch(ds.train, torch.arange(8))
    mean, std = NORMALIZATIONS["imagenet"]
    raw = ds.train.x[:8, 0].float() / 255
    for c in range(3):
        torch.testing.assert_close(x[:, c] * std[c] + mean[c], raw, rtol=1e-5, atol=1e-5)
    plain = _fed(_Smooth(channels=1))
    assert plain.in_channels == 1 and plain.get_batch(plain.train, torch.arange(8))[0].shape == (8, 1, 16, 16)


def test_clip_augmentation_shape_and_determinism() -> None:
    ds = _fed(image_size=224, normalization="clip", augmentation="clip")
    aug = ds._batches.augment
    assert isinstance(aug, ImageAugment)
    assert (aug.scale, aug.hflip, aug.size, aug.interpolation) == ((0.08, 1.0), True, 224, "bicubic")
    idx = torch.arange(4)
    a, _ = ds.get_batch(ds.train, idx, torch.Generator().manual_seed(1), train=True)
    b, _ = ds.get_batch(ds.train, idx, torch.Generator().manual_seed(1), train=True)
    c, _ = ds.get_batch(ds.train, idx, torch.Generator().manual_seed(2), train=True)
    plain, _ = ds.get_batch(ds.train, idx)
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, plain)
    lo = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    hi = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (a >= lo.view(1, 3, 1, 1) - 1e-5).all() and (a <= hi.view(1, 3, 1, 1) + 1e-5).all()
    off = _fed(image_size=224, normalization="clip", augmentation="clip", augment=False)
    assert off._batches.augment is None
    torch.testing.assert_close(off.get_batch(off.train, idx, torch.Generator().manual_seed(1), train=True)[0], plain)
    source = _fed(image_size=40, augmentation="source")
    assert source.get_batch(source.train, idx, torch.Generator().manual_seed(1), train=True)[0].shape == (4, 3, 40, 40)


def test_image_augment_output_size_resamples_bicubic() -> None:
    # With scale (1, 1) and no flip the crop is the whole image: a plain bicubic upsampling.
    x = torch.from_numpy(_smooth_images(3, 3, 16, 0)).float()
    out = ImageAugment(size=32, interpolation="bicubic")(x, torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 255)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="interpolation"):
        ImageAugment(interpolation="nearest")


def test_model_builds_from_the_batch_shape() -> None:
    ds = _fed(_Smooth(channels=1), image_size=24, normalization="clip")
    model = build_model("cnn", num_classes=ds.num_classes, in_channels=ds.in_channels, image_size=ds.image_size)
    assert model(ds.get_batch(ds.test, torch.arange(5))[0]).shape == (5, 4)


def test_host_storage_keeps_file_backed_images_in_place(tmp_path: Path) -> None:
    source = _Smooth(folder=tmp_path)
    host = _fed(source, imbalance_factor=None, image_size=32, augmentation="clip")
    assert host.host_images and host.summary()["storage"] == "host"
    # The whole (natural) train set is used as loaded: the memory-mapped images are neither copied nor moved.
    assert host.train.x is source.last.train_x and host.test.x is source.last.test_x and len(host.train) == 48
    device = _fed(source, imbalance_factor=None, image_size=32, augmentation="clip", storage="device")
    assert not device.host_images and device.summary()["storage"] == "device"
    idx = torch.tensor([3, 0, 47, 12])
    for train in (False, True):
        a = host.get_batch(host.train, idx, torch.Generator().manual_seed(5), train=train)
        b = device.get_batch(device.train, idx, torch.Generator().manual_seed(5), train=train)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    idx = torch.tensor([3, 0, 19, 12])
    assert torch.equal(host.get_batch(host.test, idx)[0], device.get_batch(device.test, idx)[0])


def test_storage_auto_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _fed().host_images
    monkeypatch.setattr(batching, "HOST_STORAGE_BYTES", 1000)
    assert _fed().host_images
    assert not _fed(storage="device").host_images
    with pytest.raises(ValueError, match="valid: auto, device, host"):
        FederatedDataset(_Smooth(), storage="disk")
    with pytest.raises(ValueError, match="valid: null, clip, imagenet"):
        FederatedDataset(_Smooth(), normalization="openai")
    with pytest.raises(ValueError, match="valid: source, clip"):
        FederatedDataset(_Smooth(), augmentation="randaugment")


def test_summary_describes_inputs() -> None:
    s = _fed(image_size=224, normalization="clip", augmentation="clip", storage="host").summary()
    assert {k: s[k] for k in ("image_size", "stored_image_size", "in_channels", "normalization", "augmentation",
                              "storage", "local_test")} == {
        "image_size": 224, "stored_image_size": 16, "in_channels": 3, "normalization": "clip",
        "augmentation": "clip", "storage": "host", "local_test": "proportional"}
    s = _fed(augment=False).summary()
    assert (s["image_size"], s["normalization"], s["augmentation"], s["storage"]) == (16, "source", "off", "device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_storage_on_cuda(tmp_path: Path) -> None:
    kw = {"num_clients": 2, "imbalance_factor": None, "partition": IID(), "seed": 0, "image_size": 224,
          "normalization": "clip", "augmentation": "clip"}
    host = FederatedDataset(_Smooth(folder=tmp_path), **kw)
    device = FederatedDataset(_Smooth(folder=tmp_path), storage="device", **kw)
    host.setup("cuda")
    device.setup("cuda")
    assert host.train.x.device.type == "cpu" and host.train.y.device.type == "cuda"
    assert device.train.x.device.type == "cuda"
    idx = host.client_indices[0][:8]
    assert idx.device.type == "cuda"
    for train in (False, True):
        a = host.get_batch(host.train, idx, torch.Generator().manual_seed(5), train=train)
        b = device.get_batch(device.train, idx, torch.Generator().manual_seed(5), train=train)
        assert a[0].device.type == "cuda" and a[0].shape == (8, 3, 224, 224)
        torch.testing.assert_close(a[0], b[0])
        assert torch.equal(a[1], b[1])
