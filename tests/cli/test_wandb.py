"""The W&B run layout of ``fedlt fit`` (group, job type, tags, flattened config, ``round`` as the x axis, final
summary, resume) against a recording fake of ``wandb.init``: no W&B server, no W&B files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb

from fedlt.callbacks.loggers import flatten_config, run_tags
from fedlt.cli import EXIT_PREEMPTED, main
from fedlt.engine.simulator import Simulator

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


class FakeRun:
    """Records what the logger does with a ``wandb`` run."""

    def __init__(self, run_dir: Path, start_step: int = 0, **kwargs: Any) -> None:
        self.init = kwargs
        self.id = kwargs["id"] or "fake0001"
        self.step = start_step  # W&B's own step counter (a resumed run continues it)
        self.dropped: list[dict[str, Any]] = []
        self.dir = str(run_dir / "fake-wandb" / "files")
        self.config = dict(kwargs["config"])
        self.summary: dict[str, Any] = {}
        self.logged: list[tuple[int | None, dict[str, Any]]] = []
        self.defined: list[tuple[str, str | None]] = []
        self.exit_code: int | None = None

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        """As W&B: a row with an explicit step below its counter is dropped (with a warning); otherwise the row
        is kept and the counter moves past it."""
        if step is not None and step < self.step:
            self.dropped.append(dict(data))
            return
        self.logged.append((step, dict(data)))
        self.step = (self.step if step is None else step) + 1

    def define_metric(self, name: str, step_metric: str | None = None, **_: Any) -> None:
        self.defined.append((name, step_metric))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code

    def rows(self) -> list[tuple[int | None, dict[str, Any]]]:
        """The per-round metric rows (not the partition table)."""
        return [(s, d) for s, d in self.logged if "round" in d]


@pytest.fixture
def runs(monkeypatch, tmp_path) -> list[FakeRun]:
    started: list[FakeRun] = []

    def fake_init(**kwargs: Any) -> FakeRun:
        earlier = [r for r in started if kwargs.get("id") and r.id == kwargs["id"]]
        started.append(FakeRun(tmp_path, start_step=earlier[-1].step if earlier else 0, **kwargs))
        return started[-1]

    monkeypatch.setattr(wandb, "init", fake_init)
    return started


def _fit(run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run_dir), "--logging.wandb", "true", *extra])


def _assert_summary_matches(summary: dict[str, Any], report: dict[str, Any]) -> None:
    assert summary["best_round"] == report["best_round"] and summary["last_n"] == report["last_n"]
    for part in ("mean_last", "best", "final"):
        assert report[part], part
        for key, value in report[part].items():
            got = summary[f"{part}/{key}"]
            assert got == pytest.approx(value) or (math.isnan(got) and math.isnan(value)), f"{part}/{key}"


def test_fit_logs_group_job_type_tags_flat_config_round_steps_and_final_summary(tmp_path, runs, capsys):
    run = tmp_path / "run"
    assert _fit(run, "--logging.group", "sweep-a", "--logging.tags", "[extra, fedavg]") == 0
    assert "wandb sync" in capsys.readouterr().out  # offline (tests): the hint names the W&B folder
    (fake,) = runs
    init = fake.init
    assert init["group"] == "sweep-a" and init["job_type"] == "fedavg" and init["name"] == "tiny"
    assert init["mode"] == "offline" and init["id"] is None and init["resume"] is None
    assert init["tags"] == ["digits", "IF20", "alpha0.5", "seed0", "fedavg", "extra"]
    cfg = init["config"]
    assert not any(isinstance(v, dict) for v in cfg.values())
    expected = {
        "data.partition.init_args.alpha": 0.5, "data.imbalance_factor": 20.0, "data.num_clients": 8,
        "method.class_path": "fedlt.methods.FedAvg", "method.init_args.lr": 0.05, "trainer.clients_per_round": 4,
        "seed": 0, "logging.group": "sweep-a", "method": "fedavg", "dataset": "digits", "partition.name": "dirichlet",
        "partition.alpha": 0.5, "model.kwargs.channels": [8, 16],
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert fake.defined == [("round", None), ("*", "round")]
    # The partition table first, then one row per round with its round (W&B's own step counter, no explicit step).
    step0, table = fake.logged[0]
    assert step0 is None and isinstance(table["partition/client_class_counts"], wandb.Table)
    assert len(table["partition/client_class_counts"].data) == 8
    partition = {"name": "dirichlet", "alpha": 0.5, "min_size": 5, "max_tries": 100}
    assert fake.summary["partition"]["partition"] == partition
    assert "client_class_counts" not in fake.summary["partition"]  # in the table only
    csv_rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(s, d["round"]) for s, d in fake.rows()] == [(None, 1), (None, 2)]
    for (_, logged), row in zip(fake.rows(), csv_rows):
        assert logged["test/global/acc"] == pytest.approx(float(row["test/global/acc"]))
        assert logged["train/loss"] == pytest.approx(float(row["train/loss"]))
    _assert_summary_matches(fake.summary, json.loads((run / "final.json").read_text()))
    assert fake.exit_code == 0


def test_preempted_and_resumed_run_continues_the_same_wandb_run(tmp_path, runs, monkeypatch):
    run = tmp_path / "run"
    common = ("--seed", "1", "--logging.job_type", "baseline", "--trainer.rounds", "3")
    preempted = Simulator.preempted
    monkeypatch.setattr(Simulator, "preempted", lambda self, flag: True)  # as if SIGUSR1 arrived in round 1
    assert _fit(run, *common) == EXIT_PREEMPTED
    monkeypatch.setattr(Simulator, "preempted", preempted)
    assert _fit(run, *common, "--resume", "auto") == 0
    first, second = runs
    assert first.exit_code == 0 and "best_round" not in first.summary  # closed cleanly, no final summary yet
    ckpt = torch.load(run / "checkpoints" / "round_00003.ckpt", weights_only=False)
    assert ckpt["wandb_id"] == first.id == "fake0001"
    assert second.init["id"] == first.id and second.init["resume"] == "allow"
    assert first.init["job_type"] == second.init["job_type"] == "baseline"
    assert "seed1" in second.init["tags"] and second.init["config"]["seed"] == 1
    # The environment record rides in the W&B config (dotted keys), from each segment's own process.
    assert first.init["config"]["environment.torch.version"] == torch.__version__
    assert second.init["config"]["environment.world_size"] == 1
    assert [d["round"] for _, d in first.rows()] == [1] and [d["round"] for _, d in second.rows()] == [2, 3]
    assert not any("partition/client_class_counts" in d for _, d in second.logged)  # logged once, by the first run
    assert second.defined == [("round", None), ("*", "round")]
    report = json.loads((run / "final.json").read_text())
    assert report["rounds"] == [1, 2, 3]
    _assert_summary_matches(second.summary, report)  # the summary covers the rounds before the resume too
    assert second.exit_code == 0


def test_a_failed_run_finishes_its_wandb_run_with_an_error(tmp_path, runs, capsys):
    assert _fit(tmp_path / "run", "--trainer.rounds", "3", "--method.init_args.lr", "1e12") == 2
    assert "non-finite training loss" in capsys.readouterr().err
    (fake,) = runs
    assert fake.exit_code == 1 and "best_round" not in fake.summary


def test_flatten_config_and_run_tags():
    nested = {"a": {"b": {"c": 1}, "d": [1, 2], "e": {}}, "f": None}
    assert flatten_config(nested) == {"a.b.c": 1, "a.d": [1, 2], "f": None}  # an empty mapping adds no key
    summary = {"source": "cifar100", "imbalance_factor": 100, "partition": {"name": "hierarchical_pooled", "beta": 0.1}}
    assert run_tags(summary, "fedpurel", 2, ["cifar100", "mine"]) == ["cifar100", "IF100", "beta0.1", "seed2",
                                                                        "fedpurel", "mine"]
    given = {"source": "imagenet_lt", "imbalance_factor": None, "partition": {"name": "given"}}
    assert run_tags(given, "fedavg", 0) == ["imagenet_lt", "seed0", "fedavg"]


def test_rounds_trained_again_after_an_unclean_stop_are_logged_not_dropped(tmp_path, runs, monkeypatch):
    """A crash after round 2 was logged but before its checkpoint: the resume trains round 2 again and its row
    must reach W&B (an explicit step=2 would be below W&B's counter and be dropped)."""
    import fedlt.experiment as experiment

    class Crash(Exception):
        pass

    hits = {"n": 0}

    def crash_at_round_2(name: str) -> None:
        if name == "round.end":
            hits["n"] += 1
            if hits["n"] == 2:
                raise Crash("the node died")

    run = tmp_path / "run"
    monkeypatch.setattr(experiment, "failpoint", crash_at_round_2)
    with pytest.raises(Crash):
        _fit(run, "--trainer.rounds", "3")
    monkeypatch.setattr(experiment, "failpoint", lambda name: None)
    assert _fit(run, "--trainer.rounds", "3", "--resume", "auto") == 0
    first, second = runs
    assert [d["round"] for _, d in first.rows()] == [1, 2]  # round 2 reached W&B, then the process died
    assert second.init["id"] == first.id and not second.dropped
    assert [d["round"] for _, d in second.rows()] == [2, 3]  # round 2 again (from the round-1 checkpoint), then 3
    assert all(step is None for step, _ in first.rows() + second.rows())  # W&B's own counter; x axis: round
