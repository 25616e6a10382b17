"""kill -9 at seeded instants, then ``--resume auto``: the resumed run equals the uninterrupted one bit for bit.

The instants are fail points (``fedlt.engine.faults``: after a client's local fit, between a disk-store file's
write and its rename, half-way through a checkpoint write, between a checkpoint's client-state file and the
checkpoint that names it, after a server step) hit a seeded number of times, or
a seeded wall-clock delay. Each case crosses a method (FedAvg, FedPer, Ditto, SCAFFOLD: none, personal layers, a
personal model, control variates), a client store (memory, cpu, disk) and a rank count (1, 2). The whole
campaign is ``slow``; the default run takes a sample of it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlt.engine.checkpoint import load_checkpoint

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
ROUNDS = 4
METHODS = ("FedAvg", "FedPer", "Ditto", "SCAFFOLD")
STORES = ("memory", "cpu", "disk")
POINTS = ("client.end", "store.write", "checkpoint.write", "checkpoint.clients", "round.end", "timer")
_STATEFUL = {"FedPer", "Ditto", "SCAFFOLD"}  # methods that write per-client state


def _argv(run: Path, method: str, store: str, ranks: int) -> list[str]:
    return [sys.executable, "-m", "fedlt", "fit", "--config", TINY, "--run_dir", str(run), "--method", method,
            "--trainer.rounds", str(ROUNDS), "--trainer.checkpoint_every", "2", "--trainer.client_state", store,
            "--trainer.devices", str(ranks), "--trainer.eval_every", "1", "--logging.wandb", "false",
            "--logging.progress_bar", "false"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLT_FAILPOINT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(argv: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    return p.returncode, p.stdout + p.stderr


def _killed_run(argv: list[str], point: str, count: int, delay: float) -> int:
    """Runs ``argv`` in a session of its own and kills it (the whole process group) at the fail point, or
    ``delay`` seconds after the start for ``timer``. Returns the exit status (negative: killed)."""
    env = _env() if point == "timer" else _env(FEDLT_FAILPOINT=f"{point}:{count}", FEDLT_FAILPOINT_GROUP="1")
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        if point == "timer":
            try:
                return p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        return p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        time.sleep(0.2)  # a killed group's other members are reaped by init


def _outcome(run: Path) -> dict:
    """What a finished run leaves: the untimed metrics rows, final.json, the last checkpoint's global state and
    every client's persistent state (from the checkpoint, or the disk store's current files)."""
    with (run / "metrics.csv").open() as f:
        rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]
    final = json.loads((run / "final.json").read_text())
    ckpt = load_checkpoint(run / "checkpoints" / f"round_{ROUNDS:05d}.ckpt")  # the client states reassembled
    sim = ckpt["simulator"] if "simulator" in ckpt else ckpt
    store = sim["store"]
    states = store.get("states", {})
    if store.get("mode") == "disk":
        states = {}
        for folder in sorted((run / "client_state").glob("client_*")):
            versions = sorted(p for p in folder.glob("r*.pt") if int(p.stem[1:]) <= ROUNDS)
            states[folder.name] = torch.load(versions[-1], weights_only=True)
    return {"rows": rows, "final": _untimed(final), "global": sim["reducer"]["global"], "states": states}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "time" not in k}
    return value


def _assert_same(got: dict, want: dict) -> None:
    assert got["rows"] == want["rows"]
    assert got["final"] == want["final"]
    assert want["global"].keys() == got["global"].keys()
    for k, v in want["global"].items():
        assert torch.equal(got["global"][k], v), k
    assert sorted(got["states"]) == sorted(want["states"])
    for cid, state in want["states"].items():
        assert state.keys() == got["states"][cid].keys(), cid
        for k, v in state.items():
            assert torch.equal(got["states"][cid][k], v), (cid, k)


_REFERENCES: dict[tuple[str, str, int], dict] = {}


class _Reference:
    """The uninterrupted run of a setting, started in the background so that it overlaps the killed run (both are
    mostly process start-up and single-threaded); ``result()`` waits for it, once per setting and session."""

    def __init__(self, tmp_path_factory, method: str, store: str, ranks: int):
        self.key = (method, store, ranks)
        self.proc = None
        if self.key not in _REFERENCES:
            base = tmp_path_factory.mktemp("reference")
            self.run, self.log = base / "run", base / "output.log"
            with self.log.open("w") as log:  # a file, not a pipe: nobody reads it while the killed run goes on
                # A session of its own: a failed test kills the whole group (a DDP launcher's rank processes too).
                self.proc = subprocess.Popen(_argv(self.run, method, store, ranks), stdout=log,
                                             stderr=subprocess.STDOUT, env=_env(), start_new_session=True)

    def result(self) -> dict:
        if self.proc is not None:
            self.proc.wait(timeout=300)
            assert self.proc.returncode == 0, self.log.read_text()[-3000:]
            _REFERENCES[self.key] = _outcome(self.run)
            self.proc = None
        return _REFERENCES[self.key]


def _hits(point: str, method: str, store: str, ranks: int) -> int:
    """How many times the fail point is surely reached (on every rank) in a run: the seeded count is drawn below.
    The tiny config trains 4 clients a round: all on one rank, or at least one on each of two."""
    per_rank = ROUNDS * (4 if ranks == 1 else 1)
    return {"client.end": per_rank, "store.write": per_rank if store == "disk" and method in _STATEFUL else 0,
            "checkpoint.write": 2, "round.end": ROUNDS, "timer": 1,
            # a memory / cpu store's client file, written before each checkpoint (rounds 2 and 4)
            "checkpoint.clients": ROUNDS // 2 if store != "disk" and method in _STATEFUL else 0}[point]


def _campaign(kills_per_setting: int = 2) -> list[tuple[str, str, int, str, int, float]]:
    """Every (method, store, rank count), each killed ``kills_per_setting`` times: the fail points in turn (the
    applicable ones), each hit a seeded number of times, or after a seeded delay for the timer."""
    cases = []
    settings = [(m, s, r) for m in METHODS for s in STORES for r in (1, 2)]
    for i, (method, store, ranks) in enumerate(settings):
        points = [p for p in POINTS if _hits(p, method, store, ranks)]
        for k in range(kills_per_setting):
            rng = random.Random(1000 * i + k)
            # a disk store that holds client state is killed in a client-file write first
            point = "store.write" if k == 0 and "store.write" in points else points[(i + k) % len(points)]
            cases.append((method, store, ranks, point, rng.randint(1, _hits(point, method, store, ranks)),
                          rng.uniform(3.0, 12.0)))
    return cases


def _kill_and_resume(tmp_path, tmp_path_factory, method, store, ranks, point, count, delay) -> None:
    reference = _Reference(tmp_path_factory, method, store, ranks)
    try:
        run = tmp_path / "run"
        status = _killed_run(_argv(run, method, store, ranks), point, count, delay)
        if point != "timer":
            assert status == -signal.SIGKILL, f"the fail point {point}:{count} was not reached (status {status})"
        status, out = _run([*_argv(run, method, store, ranks), "--resume", "auto"])
        assert status == 0, out[-3000:]
        want = reference.result()
    finally:
        if reference.proc is not None and reference.proc.poll() is None:
            os.killpg(reference.proc.pid, signal.SIGKILL)
            reference.proc.wait()
    _assert_same(_outcome(run), want)


# The default run: one case per store, each with another method, fail point and rank count. FedPer's 10th disk
# write is in round 3, after the round-2 checkpoint: the resume must discard the round-3 files of the killed run.
# SCAFFOLD's 4th atomic write is the last round's checkpoint (a checkpoint writes its client-state file first):
# the resume retrains rounds 3-4 from round 2. FedPer's 2nd client-state file is round 4's, written before round
# 4's checkpoint: the resume from round 2 writes that file again.
SAMPLE = [("FedPer", "disk", 1, "store.write", 10, 0.0), ("Ditto", "cpu", 2, "client.end", 3, 0.0),
          ("SCAFFOLD", "memory", 1, "checkpoint.write", 4, 0.0), ("FedPer", "cpu", 2, "checkpoint.clients", 2, 0.0)]


@pytest.mark.parametrize("method, store, ranks, point, count, delay", SAMPLE,
                         ids=["-".join(map(str, c[:5])) for c in SAMPLE])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tmp_path_factory, method, store, ranks, point,
                                                          count, delay):
    _kill_and_resume(tmp_path, tmp_path_factory, method, store, ranks, point, count, delay)


CAMPAIGN = _campaign()


@pytest.mark.slow
@pytest.mark.parametrize("method, store, ranks, point, count, delay", CAMPAIGN,
                         ids=[f"{i}-" + "-".join(map(str, c[:5])) for i, c in enumerate(CAMPAIGN)])
def test_kill_campaign(tmp_path, tmp_path_factory, method, store, ranks, point, count, delay):
    _kill_and_resume(tmp_path, tmp_path_factory, method, store, ranks, point, count, delay)
