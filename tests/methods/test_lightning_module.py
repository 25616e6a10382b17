"""Federating a LightningModule: its training_step and configure_optimizers as the client half of FedAvg, FedProx,
FedPer, ..., with fedlt's GM/PM evaluation."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from fedlt.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import USER_NET_SOURCE, user_package  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

LIT = USER_NET_SOURCE + '''
import torch.nn.functional as F
import lightning.pytorch as L


class LitNet(L.LightningModule):
    """A researcher's LightningModule around TinyNet's layers: cross-entropy, SGD, logs its accuracy."""

    def __init__(self, num_classes, in_channels, width=8, lr=0.05):
        super().__init__()
        self.save_hyperparameters()
        net = TinyNet(num_classes, in_channels, width)  # the same layers, built in the same order
        self.conv, self.fc = net.conv, net.fc
        self.lr = lr

    def forward(self, x):
        return self.fc(self.conv(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("lit_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        self.log_dict({"lit_batch_idx": float(batch_idx)})
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=1.0)}


class ManualLitNet(LitNet):
    """The same step with Lightning's manual optimization."""

    def __init__(self, num_classes, in_channels, width=8, lr=0.05):
        super().__init__(num_classes, in_channels, width, lr)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        assert self.lr_schedulers() is not None
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss
'''


@pytest.fixture
def lit(tmp_path, monkeypatch):
    user_package(tmp_path, monkeypatch, "mylit", LIT)


def _fit(run: Path, method: str, class_path: str, *extra: str) -> dict:
    assert main(["fit", "--config", TINY, "--run_dir", str(run), "--method", method, "--model.kwargs", "{}",
                 "--model.class_path", class_path, "--model.head", "fc", "--method.init_args.lr", "0.05", *extra]) == 0
    return json.loads((run / "final.json").read_text())["final"]


@pytest.mark.parametrize("method", ["FedAvg", "FedPer", "FedProx"])
def test_a_lightning_module_trains_exactly_as_the_same_network_under_fedlts_own_step(lit, tmp_path, method):
    """LitNet's training_step (cross-entropy) and configure_optimizers (SGD, lr 0.05) are FedAvg's client step:
    the federated LightningModule gives the same GM and PM accuracy to the last bit as the plain network."""
    # FedProx: the proximal term comes on top of the module's loss, as on top of its own cross-entropy.
    extra = ["--method.init_args.mu", "0.01"] if method == "FedProx" else []
    plain = _fit(tmp_path / "plain", method, "mylit.TinyNet", *extra)
    lightning = _fit(tmp_path / "lit", method, "mylit.LitNet", *extra)
    assert {k: v for k, v in lightning.items() if not k.startswith("train/lit_")} == plain
    assert 0.0 < lightning["test/personal/acc_mean"] <= 1.0
    assert ("test/global/acc" in lightning) == (method != "FedPer")


def test_lightning_logging_reaches_metrics_csv_and_manual_optimization_matches(lit, tmp_path):
    auto = _fit(tmp_path / "auto", "FedAvg", "mylit.LitNet")
    manual = _fit(tmp_path / "manual", "FedAvg", "mylit.ManualLitNet")
    assert manual["test/global/acc"] == auto["test/global/acc"]
    with open(tmp_path / "auto" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    accs = [float(r["train/lit_acc"]) for r in rows]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert all(float(r["train/lit_batch_idx"]) > 0 for r in rows)  # batch_idx counts each client's steps


@pytest.mark.parametrize("args, needle", [
    (["--method", "FedRoD"], "FedRoD has its own client step"),
    (["--method", "FedAvg", "--method.init_args.loss", "Focal"], "the LightningModule's training_step computes"),
    (["--method", "FedAvg", "--method.init_args.lr_schedule", "Exponential"], "return an lr_scheduler from its"),
    (["--method", "FedAvg", "--trainer.vectorize_cohort", "true"], "cannot be vectorized"),
])
def test_unsupported_combinations_exit_2(lit, tmp_path, capsys, args, needle):
    code = main(["fit", "--config", TINY, "--run_dir", str(tmp_path / "run"), "--model.kwargs", "{}",
                 "--model.class_path", "mylit.LitNet", "--model.head", "fc", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_lightning_module_keeps_its_head_and_parameters_while_fedlt_splits_it(lit):
    from fedlt.models.custom import build_user_model

    torch.manual_seed(0)
    model = build_user_model("mylit.LitNet", {}, "fc", num_classes=3, in_channels=1, image_size=8)
    assert model.lightning_module is model.body
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.body(x), model(x))  # the module's own forward still gives logits
    assert len(list(model.body.parameters())) == 2  # the head lives in model.head ...
    with model.whole() as module:
        assert len(list(module.parameters())) == 4 and module.fc is model.head  # ... and is back in place here
    assert sorted(model.state_dict()) == ["body.conv.0.bias", "body.conv.0.weight", "head.bias", "head.weight"]
