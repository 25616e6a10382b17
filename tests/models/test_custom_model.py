"""Bring your own model: ``model.class_path`` builds any importable ``nn.Module``, split at ``model.head``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fedlt.cli import main
from fedlt.models.custom import ModelSpecError, UserModel, build_user_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from helpers import USER_NET_SOURCE, user_package  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

NETS = USER_NET_SOURCE + '''

class SoftmaxAfterHead(TinyNet):
    def forward(self, x):
        return self.fc(self.conv(x)).softmax(-1)


class UnflattenedHead(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        return self.fc(self.conv(x)).mean((2, 3))


class ThreeChannels(TinyNet):
    def __init__(self, num_classes, in_channels):
        super().__init__(num_classes, in_channels=3)


class NeedsDepth(nn.Module):
    def __init__(self, depth):
        super().__init__()
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    user_package(tmp_path, monkeypatch, "mynets", NETS)
    return "mynets"


def _fit(run: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run), "--trainer.rounds", "1", "--model.kwargs", "{}",
                 *extra])


def test_the_split_puts_the_named_head_under_head_and_keeps_forward(nets):
    torch.manual_seed(0)
    model = build_user_model("mynets.TinyNet", {"width": 6}, "fc", num_classes=5, in_channels=1, image_size=8)
    assert isinstance(model, UserModel) and model.num_features == 24 and model.num_classes == 5
    assert model.head_state_keys() == ["head.weight", "head.bias"]
    assert {k for k in model.state_dict() if not k.startswith("head.")} == {"body.conv.0.weight", "body.conv.0.bias"}
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(0)
    import mynets

    reference = mynets.TinyNet(num_classes=5, in_channels=1, width=6)
    assert torch.equal(model(x), reference(x))  # same init order and seed: the wrapper changes nothing
    assert model.forward_features(x).shape == (3, 24)


@pytest.mark.parametrize("method", ["FedAvg", "FedPer"])
def test_a_user_module_trains_with_gm_and_pm_metrics(nets, tmp_path, method):
    run = tmp_path / "run"
    assert _fit(run, "--method", method, "--model.class_path", "mynets.TinyNet", "--model.head", "fc",
                "--model.init_args", "{width: 8}") == 0
    final = json.loads((run / "final.json").read_text())["final"]
    assert 0.0 < final["test/personal/acc_mean"] <= 1.0
    assert ("test/global/acc" in final) == (method == "FedAvg")  # FedPer has no global model
    ckpt = torch.load(sorted((run / "checkpoints").glob("round_*.ckpt"))[-1], weights_only=False)
    shared = ckpt["simulator"]["reducer"]["global"]
    assert "body.conv.0.weight" in shared and ("head.weight" in shared) == (method == "FedAvg")


def test_a_built_in_model_through_class_path_trains_exactly_as_its_short_form(tmp_path):
    """The same module, by registry name or by class_path: the same metrics to the last bit (the wrapper changes
    only the state-dict names)."""
    short, custom = tmp_path / "short", tmp_path / "custom"
    args = ["--method", "FedPer", "--trainer.rounds", "2"]
    assert main(["fit", "--config", TINY, "--run_dir", str(short), *args]) == 0
    assert _fit(custom, *args, "--model.class_path", "fedlt.models.cnn.CNN",
                "--model.init_args", "{channels: [8, 16], hidden: 32}") == 0
    a, b = (json.loads((r / "final.json").read_text())["final"] for r in (short, custom))
    assert a == b and a["test/personal/acc_mean"] > 0


@pytest.mark.parametrize("args, needle", [
    (["--model.init_args", "{widht: 8}"], "TinyNet has no argument 'widht' (model.init_args); valid: num_classes, "
                                          "in_channels, width"),
    (["--model.head", "classifier"], "has no submodule 'classifier' (its submodules: conv, fc)"),
    (["--model.class_path", "mynets.SoftmaxAfterHead"], "changes the output after model.head 'fc'"),
    (["--model.class_path", "mynets.UnflattenedHead"], "receives a tensor of shape (2, 4, 16, 16)"),
    (["--model.class_path", "mynets.NeedsDepth"], "needs 'depth'; set model.init_args.depth"),
    (["--model.class_path", "mynets.ThreeChannels"], "ThreeChannels.forward fails on an example batch of this "
                                                     "data's images, shape (2, 1, 16, 16) (RuntimeError"),
    (["--model.class_path", "mynets.Missing"], "module 'mynets' has no 'Missing'"),
    (["--model.class_path", "nosuchpkg.Net"], "cannot import 'nosuchpkg'"),
    (["--model.class_path", "json.JSONDecoder"], "is not a torch.nn.Module subclass"),
])
def test_a_bad_user_model_exits_2_with_what_is_wrong(nets, tmp_path, capsys, args, needle):
    base = ["--model.class_path", "mynets.TinyNet", "--model.head", "fc"]
    assert _fit(tmp_path / "run", *base, *args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_init_args_without_a_class_path_is_refused(tmp_path, capsys):
    assert _fit(tmp_path / "run", "--model.init_args", "{width: 8}") == 2
    assert "model.init_args is for model.class_path" in capsys.readouterr().err
    with pytest.raises(ModelSpecError, match="expected a dotted import path"):
        build_user_model("TinyNet", {}, "fc", num_classes=2, in_channels=1, image_size=8)
