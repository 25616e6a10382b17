"""Tests of the FedAvg CNN and the MLP: exact parameter counts and seed-identical initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlt.models import CNN, MLP, build_model


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_same_parameters(model: nn.Module, reference: nn.Sequential) -> None:
    ours = list(model.parameters())
    theirs = list(reference.parameters())
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_cnn_parameter_count_mcmahan() -> None:
    model = build_model("cnn", 10, 3, 32)
    assert isinstance(model, CNN)
    assert _num_params(model) == 2_156_490
    assert model.num_features == 512


def test_cnn_initialises_like_plain_sequential() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3, 32)
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    _assert_same_parameters(model, reference)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def test_cnn_shrinks_and_handles_mnist() -> None:
    model = build_model("cnn", 10, in_channels=1, image_size=28, channels=(4, 8), hidden=16)
    # conv1 1*4*25+4, conv2 4*8*25+8, fc 8*7*7*16+16, head 16*10+10
    assert _num_params(model) == 104 + 808 + 6288 + 170
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 16)


def test_cnn_batch_norm_variant_has_three_bn_layers() -> None:
    model = build_model("cnn", 10, in_channels=1, image_size=28, channels=(4, 8), hidden=16, norm="batch")
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert [m.num_features for m in bns] == [4, 8, 16]
    # the same weights plus 2 * (4 + 8 + 16) affine BN parameters
    assert _num_params(model) == 104 + 808 + 6288 + 170 + 2 * (4 + 8 + 16)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="norm"):
        build_model("cnn", 10, norm="group")


def test_cnn_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn", 10, image_size=3)


def test_mlp_parameter_count_and_init() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, in_features=64)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    assert isinstance(model, MLP)
    assert _num_params(model) == 9_610
    _assert_same_parameters(model, reference)
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), reference(x))


def test_mlp_flattens_images_and_derives_in_features() -> None:
    model = build_model("mlp", 4, in_channels=1, image_size=8, hidden=16)
    assert model.fc.in_features == 64 and model.num_features == 16
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), model.head(torch.relu(model.fc(x.reshape(2, 64)))))
