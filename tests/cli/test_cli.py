"""The command line end to end: fit/validate/partition/methods, bad input -> exit 2, DDP invariance, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlt.cli import main
from fedlt.engine.sharding import assign_to_ranks, sample_cohort

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _fit(run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run_dir), *extra])


def _global(run_dir: Path, round: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / f"round_{round:05d}.ckpt", weights_only=False)
    return ckpt["simulator"]["reducer"]["global"]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedlt", *args], env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_fit_writes_metrics_report_and_checkpoints(tmp_path, capsys):
    assert _fit(tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "GM acc" in out and "PM mean" in out
    run = tmp_path / "run"
    for name in ("config.yaml", "partition.json", "metrics.csv", "final.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= float(r["test/global/acc"]) <= 1.0 and float(r["train/loss"]) > 0
    report = json.loads((run / "final.json").read_text())
    assert report["rounds"] == [1, 2]
    assert report["final"]["test/global/acc"] == pytest.approx(float(rows[-1]["test/global/acc"]))
    summary = json.loads((run / "partition.json").read_text())
    assert sum(summary["client_sizes"]) == sum(summary["class_counts"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round_00001.ckpt", "round_00002.ckpt"]
    # Never lose work: a second fresh fit into the same run directory is refused.
    assert _fit(run) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_validate_reproduces_the_last_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(run) == 0
    final = json.loads((run / "final.json").read_text())["final"]
    capsys.readouterr()
    assert main(["validate", "--config", TINY, "--ckpt_path", str(run / "checkpoints" / "round_00002.ckpt")]) == 0
    out = capsys.readouterr().out
    assert f"{100 * final['test/global/acc']:.2f}" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trainer.bogus", "1"], "bogus"),
        (["--trainer.rounds", "abc"], "trainer.rounds"),
        (["--method", "NoSuchMethod"], "FedAvg (fedavg), FedAvgM"),
        (["--model.name", "nosuch"], "valid models"),
        (["--data.num_clients", "5000"], "clients"),
        (["--data.init_args.partition.init_args.alpha", "-1"], "alpha"),
        (["--data.group_convention", "nope"], "convention"),
        (["--method.init_args.mu", "3"], "Option 'mu' is not accepted (in FedAvg"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, needle):
    assert _fit(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlt: error:") and needle in err and "Traceback" not in err


def test_unknown_command_and_missing_config_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["fit", "--config", "/nonexistent/x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "valid commands: fit" in err and "does not exist" in err


def test_methods_and_partition_plot(tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "1602.05629" in out
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    assert main(["partition", "--config", TINY, "--plot", str(png), "--out", str(js)]) == 0
    assert png.stat().st_size > 1000 and json.loads(js.read_text())["num_clients"] == 8


def test_method_alias_and_print_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--method", "fedprox", "--print_config"])
    assert exc.value.code == 0
    assert "FedProx" in capsys.readouterr().out


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.ddp
# An idle rank, and 3 ranks, for every method: tests/methods/test_contract.py::test_world_size_invariance_is_bitwise
@pytest.mark.parametrize("cohort, split", [(3, [1, 2])], ids=["uneven-cohort"])
def test_two_processes_give_the_same_global_weights_and_metrics_as_one(tmp_path, cohort, split):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("fit", "--config", TINY, "--trainer.clients_per_round", str(cohort))
    p1 = _cli(*args, "--run_dir", str(one))
    out1 = p1.communicate(timeout=300)[0]
    p2 = _cli(*args, "--run_dir", str(two), "--trainer.devices", "2")
    out2 = p2.communicate(timeout=300)[0]
    assert p1.returncode == 0, out1
    assert p2.returncode == 0, out2
    # The premise: the cohort splits unevenly over the 2 ranks (LPT by client size), every round.
    sizes = json.loads((two / "partition.json").read_text())["client_sizes"]
    for rnd in (1, 2):
        ranks = assign_to_ranks(sample_cohort(0, rnd, len(sizes), cohort), sizes, 2)
        assert sorted(len(r) for r in ranks) == split, ranks
    a, b = _global(one, 2), _global(two, 2)
    assert a.keys() == b.keys()
    for k in a:  # bitwise: exact aggregation does not depend on how the cohort is split over ranks
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not torch.equal(a["head.weight"], _global(one, 1)["head.weight"])
    # Evaluation is sharded over the ranks and synced: the same metrics, row for row, digit for digit.
    rows1, rows2 = (list(csv.DictReader((run / "metrics.csv").open())) for run in (one, two))
    assert [r["round"] for r in rows1] == [r["round"] for r in rows2] == ["1", "2"]  # no duplicate rows
    for r1, r2 in zip(rows1, rows2):
        assert r1.keys() == r2.keys()
        assert {k: v for k, v in r1.items() if not k.startswith("time/")} == \
            {k: v for k, v in r2.items() if not k.startswith("time/")}
    f1, f2 = (json.loads((run / "final.json").read_text()) for run in (one, two))
    assert _untimed(f2) == _untimed(f1)
    # Only rank 0 writes and prints: the same run files as one process, one header and one final table.
    assert _files(two) == _files(one)
    assert out2.count("| world size 2 | run dir") == 1 and out2.count("GM acc") == 1, out2
    assert out2.count("fedlt: accelerator cpu | 2 devices per node x 1 node = world size 2") == 1, out2


def _untimed(value):
    """``value`` (JSON) without the timing entries, which alone may differ between identical runs."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "time" not in k}
    return value


def _kill_after_checkpoint(run: Path, sig: int, rounds: int, round: int = 2) -> tuple[int, str]:
    proc = _cli("fit", "--config", TINY, "--run_dir", str(run), "--trainer.rounds", str(rounds))
    target = run / "checkpoints" / f"round_{round:05d}.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


# kill -9 at many more instants, stores, methods and rank counts: tests/cli/test_crash_consistency.py
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["sigterm"])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, sig):
    rounds = 6
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = _cli("fit", "--config", TINY, "--run_dir", str(full), "--trainer.rounds", str(rounds))
    assert p.wait(timeout=300) == 0
    code, out = _kill_after_checkpoint(cut, sig, rounds)
    if sig == signal.SIGTERM:
        assert code == 3 and "preempted" in out, out
    stopped_at = max(int(f.stem.split("_")[1]) for f in (cut / "checkpoints").iterdir() if f.suffix == ".ckpt")
    assert stopped_at < rounds, "the run finished before it could be interrupted"
    p = _cli("fit", "--config", TINY, "--run_dir", str(cut), "--trainer.rounds", str(rounds), "--resume", "auto")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert "resumed from" in out
    a = json.loads((full / "final.json").read_text())
    b = json.loads((cut / "final.json").read_text())
    assert a["rounds"] == b["rounds"] == list(range(1, rounds + 1))
    assert _untimed(b) == _untimed(a)  # bit for bit
    rows = list(csv.DictReader((cut / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = _fit(run, "--trainer.rounds", "4", "--method.init_args.lr", "1e12")
    err = capsys.readouterr().err
    assert code == 2 and "non-finite training loss in round" in err and "client" in err
    ckpts = sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else []
    for ck in ckpts:  # whatever was checkpointed is finite
        state = torch.load(ck, weights_only=False)["simulator"]["reducer"]["global"]
        assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_validate_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    assert main(["validate", "--config", TINY, "--ckpt_path", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_wandb_logs_offline_without_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    assert _fit(run, "--logging.wandb", "true", "--trainer.rounds", "1") == 0
    assert "wandb sync" in capsys.readouterr().out
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
