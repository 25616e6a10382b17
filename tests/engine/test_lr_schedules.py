"""Learning-rate schedules: per round (local and server rates) and within a client's local training."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlt.methods.fedavg import FedAvg
from fedlt.methods.fedavgm import FedAvgM
from fedlt.schedules import Constant, Cosine, Exponential, MultiStep, Step, Warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from helpers import global_copy, tiny_sim  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _torch_factors(make, total: int) -> list[float]:
    """The multipliers a torch scheduler gives at steps 1..total (stepped once per index)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("ours, theirs", [
    (Exponential(0.9), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    (Step(3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    # ours: multiplied from index m on; torch: after m - 1 scheduler steps, i.e. also from index m
    (MultiStep([3, 6], 0.5), lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.5)),
    (Cosine(min_factor=0.1), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.1)),
    (Warmup(4, start_factor=0.25), lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4)),
])
def test_factors_equal_torchs_schedulers(ours, theirs):
    expected = _torch_factors(theirs, 10)
    assert [ours.factor(t, 10) for t in range(1, 11)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_factors_by_hand():
    assert Constant().factor(7, 10) == 1.0
    assert [Exponential(0.5).factor(t, 4) for t in (1, 2, 3)] == [1.0, 0.5, 0.25]
    assert [Step(2, 0.1).factor(t, 9) for t in (1, 2, 3, 5)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cos = Cosine()
    assert cos.factor(1, 4) == 1.0 and cos.factor(3, 4) == pytest.approx(0.5) and cos.factor(9, 4) == 0.0
    assert Cosine(length=2).factor(2, 100) == pytest.approx(0.5)  # its own length, not the run's
    warm = Warmup(2, start_factor=0.5, then=Exponential(0.5))
    assert [warm.factor(t, 5) for t in (1, 2, 3, 4)] == [0.5, 0.75, 1.0, 0.5]
    assert Exponential(0.5)(0.2, 3, 10) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="gamma"):
        Exponential(1.5)


def test_per_round_decay_equals_the_engine_run_at_each_rounds_rate():
    """Round r of a scheduled run is exactly the unscheduled engine's round r with lr = lr0 * gamma^(r-1)."""
    scheduled = tiny_sim(FedAvg(lr=0.05, lr_schedule=Exponential(0.5)), rounds=3)
    plain = tiny_sim(FedAvg(lr=0.05), rounds=3)
    for r in (1, 2, 3):
        plain.method.lr = 0.05 * 0.5 ** (r - 1)
        metrics = scheduled.run_round(r).metrics
        plain.run_round(r)
        assert metrics["train/lr"] == 0.05 * 0.5 ** (r - 1)
        a, b = global_copy(scheduled), global_copy(plain)
        assert all(torch.equal(a[k], b[k]) for k in a), r


class _Spy(FedAvg):
    """FedAvg recording the rate of each local step: the optimizer's and :attr:`current_lr`."""

    def training_step(self, batch, ctx):
        self.seen.append((ctx.client_id, self.optimizers().param_groups[0]["lr"], self.current_lr))
        return super().training_step(batch, ctx)


def test_a_local_schedule_runs_over_each_clients_steps_times_the_rounds_rate():
    method = _Spy(lr=0.1, batch_size=16, lr_schedule=Step(1, 0.5), local_lr_schedule=Cosine(min_factor=0.2))
    method.seen = []
    sim = tiny_sim(method, rounds=2)
    for r in (1, 2):
        method.seen.clear()
        sim.run_round(r)
        by_client: dict[int, list[tuple[float, float]]] = {}
        for cid, opt_lr, cur in method.seen:
            by_client.setdefault(cid, []).append((opt_lr, cur))
        assert len(by_client) == 3
        for steps in by_client.values():
            n = len(steps)
            assert n > 1
            expected = [0.1 * 0.5 ** (r - 1) * (0.2 + 0.8 * (1 + math.cos(math.pi * i / n)) / 2) for i in range(n)]
            assert [s[0] for s in steps] == pytest.approx(expected, rel=1e-12)
            assert [s[1] for s in steps] == pytest.approx(expected, rel=1e-12)
        assert method.current_lr == 0.1 * 0.5 ** (r - 1)  # back to the round's rate after local training


def test_a_server_schedule_equals_the_server_step_at_each_rounds_rate():
    scheduled = tiny_sim(FedAvgM(server_lr=1.0, server_momentum=0.5, server_lr_schedule=Exponential(0.8)), rounds=3)
    plain = tiny_sim(FedAvgM(server_lr=1.0, server_momentum=0.5), rounds=3)
    for r in (1, 2, 3):
        plain.reducer.lr = 0.8 ** (r - 1)
        metrics = scheduled.run_round(r).metrics
        plain.run_round(r)
        assert metrics["train/server_lr"] == pytest.approx(0.8 ** (r - 1), rel=1e-15)
        assert "train/lr" not in metrics  # the local rate is not scheduled
        a, b = global_copy(scheduled), global_copy(plain)
        assert all(torch.equal(a[k], b[k]) for k in a), r


SCHEDULED = ["--method.init_args.lr_schedule", "Exponential", "--method.init_args.lr_schedule.gamma", "0.7",
             "--method.init_args.local_lr_schedule", "Warmup", "--method.init_args.local_lr_schedule.length", "2"]


def _final(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(sorted((run / "checkpoints").glob("round_*.ckpt"))[-1], weights_only=False)
    return ckpt["simulator"]["reducer"]["global"]


def _lrs(run: Path) -> list[str]:
    with open(run / "metrics.csv") as f:
        return [row["train/lr"] for row in csv.DictReader(f)]


def _fit(run: Path, *extra: str, failpoint: str | None = None) -> None:
    """A subprocess run, single-threaded (DDP ranks are separate processes; all runs compute alike);
    ``failpoint``: killed with SIGKILL there (``fedlt.engine.faults``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if failpoint:
        env["FEDLT_FAILPOINT"] = failpoint
    p = subprocess.run([sys.executable, "-m", "fedlt", "fit", "--config", TINY, "--trainer.eval_every", "0",
                        "--run_dir", str(run), *SCHEDULED, *extra], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == (-9 if failpoint else 0), p.stdout + p.stderr


@pytest.mark.ddp
def test_a_scheduled_run_is_the_same_after_kill_and_resume_and_with_two_ranks(tmp_path):
    straight, resumed, two = tmp_path / "straight", tmp_path / "resumed", tmp_path / "two"
    _fit(straight, "--trainer.rounds", "4")
    _fit(resumed, "--trainer.rounds", "4", failpoint="client.end:11")  # kill -9 inside round 3 (4 clients a round)
    assert sorted(p.name for p in (resumed / "checkpoints").glob("round_*.ckpt")) == ["round_00001.ckpt",
                                                                                     "round_00002.ckpt"]
    _fit(resumed, "--trainer.rounds", "4", "--resume", "auto")
    _fit(two, "--trainer.rounds", "4", "--trainer.devices", "2")
    a = _final(straight)
    for other in (resumed, two):
        b = _final(other)
        assert all(torch.equal(a[k], b[k]) for k in a), other
    assert [float(v) for v in _lrs(straight)] == pytest.approx([0.05 * 0.7 ** r for r in range(4)], rel=1e-12)
    assert _lrs(straight) == _lrs(resumed) == _lrs(two)
