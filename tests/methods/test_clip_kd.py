"""The CLIP teacher sees the images the student sees, re-normalised to CLIP's statistics (FedSM / CLIP2FL KD)."""

from __future__ import annotations

import pytest
import torch

from fedlt.data import IID, EmbeddedDigits, FederatedDataset
from fedlt.methods._clip_kd import data_normalization, to_clip_input
from fedlt.models.clip import CLIP_MEAN, CLIP_STD


@pytest.mark.parametrize("normalization", [None, "imagenet", "clip"])
def test_teacher_input_is_the_raw_image_in_clip_statistics(normalization) -> None:
    source = EmbeddedDigits(image_size=16, train_per_class=20, test_per_class=5, holdout_per_class=5)
    data = FederatedDataset(source, num_clients=2, imbalance_factor=1, partition=IID(), augment=False,
                            normalization=normalization)
    data.setup("cpu")
    stats = data_normalization(data)
    if normalization == "clip":
        assert stats is None  # the batches already are CLIP inputs
    elif normalization is None:
        assert stats is not None and stats[0] == pytest.approx(tuple(source.load().mean))
    idx = torch.arange(8)
    x, _ = data.get_batch(data.train, idx)
    raw = data.train.x[idx].float().div(255.0).expand(-1, 3, -1, -1)
    want = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(to_clip_input(x, stats), want, rtol=1e-4, atol=1e-4)
