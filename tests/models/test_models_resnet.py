"""Tests of the CIFAR ResNets: parameter counts, shapes, shortcuts and initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlt.models import BasicBlock, CifarResNet, build_model, cifar_resnet


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# He et al. 2016 report 0.27M / 0.46M / 0.85M for ResNet-20/32/56 with option-A (parameter-free) shortcuts,
# i.e. 269,722 / 464,154 / 853,018; option B adds two projections: 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
# ResNet-18/34 CIFAR variants match the widely used kuangliu/pytorch-cifar counts.
EXPECTED = {
    "resnet8": 78_042,
    "resnet20": 269_722 + 2_752,
    "resnet32": 464_154 + 2_752,
    "resnet56": 853_018 + 2_752,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
}


@pytest.mark.parametrize(("name", "count"), sorted(EXPECTED.items()))
def test_parameter_counts(name: str, count: int) -> None:
    assert _num_params(build_model(name, num_classes=10)) == count


@pytest.mark.parametrize(("name", "features"), [("resnet8", 64), ("resnet56", 64), ("resnet18", 512)])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32), (3, 8)])
def test_shapes(name: str, features: int, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=size).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, features)
        assert model(x).shape == (2, 7)
    assert model.num_features == features


def test_block_structure_resnet20() -> None:
    model = build_model("resnet20", num_classes=10)
    assert isinstance(model, CifarResNet)
    stages = list(model.layers)
    assert [len(stage) for stage in stages] == [3, 3, 3]
    assert [stage[0].conv1.out_channels for stage in stages] == [16, 32, 64]
    assert [stage[0].conv1.stride for stage in stages] == [(1, 1), (2, 2), (2, 2)]
    # Projection shortcuts (option B) only where the shape changes.
    projections = [not isinstance(block.shortcut, nn.Identity) for stage in stages for block in stage]
    assert projections == [False] * 3 + [True, False, False] * 2
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet18_structure() -> None:
    model = build_model("resnet18", num_classes=10)
    assert [len(stage) for stage in model.layers] == [2, 2, 2, 2]
    assert model.conv1.out_channels == 64 and model.conv1.kernel_size == (3, 3)


def test_kaiming_init_and_identity_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10)
    conv = model.layers[2][3].conv2  # 64 -> 64, 3x3: fan_out = 64 * 9
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    bn = model.layers[1][0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_basic_block_residual() -> None:
    block = BasicBlock(4, 4).eval()
    for p in block.parameters():
        nn.init.zeros_(p)
    x = torch.randn(2, 4, 5, 5)
    # With all weights zero the residual branch is 0 and the block is relu(x).
    torch.testing.assert_close(block(x), torch.relu(x))
    down = BasicBlock(4, 8, stride=2)
    assert down(torch.randn(2, 4, 6, 6)).shape == (2, 8, 3, 3)


@pytest.mark.parametrize("depth", [7, 9, 21, 2])
def test_invalid_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth, num_classes=10)


def test_small_images_rejected() -> None:
    with pytest.raises(ValueError, match="image_size >= 8"):
        build_model("resnet20", num_classes=10, image_size=4)


def test_resnet8_fedsm_layout() -> None:
    """FedSM's CIFAR backbone (docs/reference.md Appendix R S17): 64/128/256 widths, one block per stage, a linear
    256 -> 512 projection without activation, then the classifier."""
    torch.manual_seed(0)
    m = build_model("resnet8_fedsm", num_classes=10)
    assert m.num_features == 512 and m.head.in_features == 512
    assert [len(stage) for stage in m.layers] == [1, 1, 1]
    assert m.conv1.out_channels == 64 and m.proj.in_features == 256
    x = torch.randn(2, 3, 32, 32)
    pooled = torch.nn.functional.relu(m.bn1(m.conv1(x)))
    pooled = m.pool(m.layers(pooled)).flatten(1)
    torch.testing.assert_close(m.forward_features(x), m.proj(pooled))  # linear: no activation after the projection
    torch.testing.assert_close(m(x), m.head(m.proj(pooled)))
