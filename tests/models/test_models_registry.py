"""Contract tests for every registered model name and for build_model's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlt.models import MODELS, FedModel, build_model
from fedlt.registry import UnknownNameError

BUILTIN = ["cnn", "mlp", "resnet8", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet8_fedsm"]


def test_registry_holds_exactly_the_builtin_names() -> None:
    assert sorted(MODELS.names()) == sorted(BUILTIN)


# Every name once, alternating 1- and 3-channel inputs (both for the cheap ones) to keep the file fast on 2 cores.
CONTRACT_CASES = [
    ("cnn", 1),
    ("cnn", 3),
    ("mlp", 1),
    ("mlp", 3),
    ("resnet8", 1),
    ("resnet8", 3),
    ("resnet20", 1),
    ("resnet32", 3),
    ("resnet56", 1),
    ("resnet18", 3),
    ("resnet34", 1),
    ("resnet8_fedsm", 3),
    # "timm:<name>" goes through the same contract in test_models_timm.py (kept there: importing timm is slow).
]


def test_contract_cases_cover_every_name() -> None:
    assert {name for name, _ in CONTRACT_CASES} == set(BUILTIN)


@pytest.mark.parametrize(("name", "in_channels"), CONTRACT_CASES)
def test_model_contract(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=in_channels, image_size=16)
    assert isinstance(model, FedModel)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.num_features and model.head.out_features == 5
    assert model.num_classes == 5
    model.eval()
    x = torch.randn(2, in_channels, 16, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, model.head(features))
    keys = list(model.state_dict())
    assert model.head_state_keys() == ["head.weight", "head.bias"]
    assert sum(k.startswith("head.") for k in keys) == 2
    assert len(keys) > 2


def test_model_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=3, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unknown_name_lists_valid_names_and_timm_prefix() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet99", num_classes=10)
    message = str(info.value)
    assert "resnet99" in message and "resnet20" in message and "cnn" in message
    assert "timm:" in message


def test_name_lookup_is_case_insensitive() -> None:
    assert build_model("MLP", num_classes=2, in_channels=1, image_size=2).num_features == 128


@pytest.mark.parametrize("name", BUILTIN)
def test_pretrained_is_refused_for_builtin_models(name: str) -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model(name, num_classes=10, pretrained=True)
