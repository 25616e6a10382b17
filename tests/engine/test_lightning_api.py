"""Methods speak Lightning: self.log / log_dict, self.optimizers(), self.lr_schedulers(), manual_backward, and every
return form of configure_optimizers."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedlt.cli import main
from fedlt.engine.local_loop import SchedulerConfig, normalize_optimizers
from fedlt.methods.fedavg import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from helpers import global_copy, tiny_sim  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_every_configure_optimizers_form_is_understood():
    a, b = _opt(), _opt()
    sa = torch.optim.lr_scheduler.StepLR(a, 1)
    assert normalize_optimizers(a) == ([a], [])
    assert normalize_optimizers([a, b]) == ([a, b], [])
    assert normalize_optimizers((a, b)) == ([a, b], [])
    assert normalize_optimizers({"optimizer": a, "lr_scheduler": sa}) == ([a], [SchedulerConfig(sa)])
    opts, scheds = normalize_optimizers({"optimizer": a, "lr_scheduler": {"scheduler": sa, "interval": "step",
                                                                           "frequency": 2}})
    assert opts == [a] and scheds == [SchedulerConfig(sa, "step", 2)]
    assert normalize_optimizers([{"optimizer": a}, {"optimizer": b, "lr_scheduler": sa}]) == \
        ([a, b], [SchedulerConfig(sa)])
    assert normalize_optimizers(([a, b], [sa])) == ([a, b], [SchedulerConfig(sa)])
    with pytest.raises(ValueError, match="expected an optimizer"):
        normalize_optimizers(None)
    with pytest.raises(ValueError, match="'monitor' schedulers"):
        normalize_optimizers({"optimizer": a, "lr_scheduler": {"scheduler": sa, "monitor": "val_loss"}})
    with pytest.raises(ValueError, match="interval must be 'step' or 'epoch'"):
        normalize_optimizers({"optimizer": a, "lr_scheduler": {"scheduler": sa, "interval": "round"}})


class _Logging(FedAvg):
    """Logs the batch accuracy every step, and a counter on odd steps only; records what it logged."""

    def training_step(self, batch, ctx):
        out = super().training_step(batch, ctx)
        with torch.no_grad():
            acc = (self.model(batch[0]).argmax(1) == batch[1]).float().mean()
        self.step_no = getattr(self, "step_no", 0) + 1
        self.log("acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        self.seen["acc"].append(float(acc))
        if self.step_no % 2:
            self.log_dict({"odd/counter": float(self.step_no)})
            self.seen["odd"].append(float(self.step_no))
        return out


def test_logged_values_are_the_mean_over_the_steps_that_logged_them():
    method = _Logging(lr=0.05, batch_size=16)
    method.seen = {"acc": [], "odd": []}
    sim = tiny_sim(method, rounds=1)
    metrics = sim.run_round(1).metrics
    assert metrics["train/acc"] == pytest.approx(sum(method.seen["acc"]) / len(method.seen["acc"]), rel=1e-6)
    assert metrics["odd/counter"] == pytest.approx(sum(method.seen["odd"]) / len(method.seen["odd"]), rel=1e-12)
    assert len(method.seen["odd"]) < len(method.seen["acc"])
    assert "train/loss" in metrics  # the loss parts are still there


def test_log_outside_training_reduce_fx_and_a_clash_are_refused():
    method = FedAvg()
    sim = tiny_sim(method, rounds=1)
    with pytest.raises(RuntimeError, match="during a client's local training only"):
        sim.method.log("x", 1.0)
    with pytest.raises(ValueError, match="reduce_fx='max'"):
        sim.method.log("x", 1.0, reduce_fx="max")
    with pytest.raises(RuntimeError, match="optimizers\\(\\): available during a client's local training only"):
        sim.method.optimizers()

    class Clash(FedAvg):
        def training_step(self, batch, ctx):
            out = super().training_step(batch, ctx)
            self.log("loss", out.loss)
            return out

    with pytest.raises(ValueError, match="names the train metric train/loss"):
        tiny_sim(Clash(), rounds=1).run_round(1)


class _ManualSGD(FedAvg):
    """FedAvg's step written with Lightning's manual optimization; must equal automatic optimization."""

    automatic_optimization = False

    def training_step(self, batch, ctx):
        opt = self.optimizers()
        out = super().training_step(batch, ctx)
        opt.zero_grad()
        self.manual_backward(out.loss)
        opt.step()
        return type(out)(loss=None, parts=out.parts)


def test_manual_optimization_through_optimizers_and_manual_backward_equals_automatic():
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16, grad_clip=0.5), rounds=2)
    b = tiny_sim(_ManualSGD(lr=0.05, batch_size=16, grad_clip=0.5), rounds=2)
    for r in (1, 2):
        ma, mb = a.run_round(r).metrics, b.run_round(r).metrics
        assert ma["train/loss"] == mb["train/loss"]
    ga, gb = global_copy(a), global_copy(b)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


class _WithScheduler(FedAvg):
    """configure_optimizers in Lightning's dict form with a StepLR; records the rate of every step."""

    def __init__(self, interval: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.interval, self.seen = interval, []

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.model.parameters(), lr=self.current_lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}

    def training_step(self, batch, ctx):
        assert self.lr_schedulers() is not None
        self.seen.append((ctx.client_id, self.optimizers().param_groups[0]["lr"]))
        return super().training_step(batch, ctx)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_a_scheduler_from_configure_optimizers_steps_per_step_or_per_local_epoch(interval):
    method = _WithScheduler(interval, lr=0.1, batch_size=16, local_epochs=2)
    sim = tiny_sim(method, rounds=1)
    sim.run_round(1)
    for cid in {c for c, _ in method.seen}:
        lrs = [lr for c, lr in method.seen if c == cid]
        per_epoch = sim.trainer.batches_per_epoch(sim.data.client_indices[cid], 16)
        assert len(lrs) == 2 * per_epoch
        expected = [0.1 * 0.5 ** (i if interval == "step" else i // per_epoch) for i in range(len(lrs))]
        assert lrs == pytest.approx(expected, rel=1e-12)


PKG = '''
import torch
from fedlt.methods import FedAvg


class LoggingFedAvg(FedAvg):
    """FedAvg that logs its batch accuracy with self.log."""

    def training_step(self, batch, ctx):
        out = super().training_step(batch, ctx)
        with torch.no_grad():
            self.log("batch_acc", (self.model(batch[0]).argmax(1) == batch[1]).float().mean())
        return out
'''


def test_logged_values_reach_metrics_csv(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mymethods.py").write_text(textwrap.dedent(PKG))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    run = tmp_path / "run"
    assert main(["fit", "--config", TINY, "--run_dir", str(run), "--method", "mymethods.LoggingFedAvg"]) == 0
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["train/batch_acc"]) for r in rows]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values) and values[1] > 0
