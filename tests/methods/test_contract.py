"""The method contract suite (docs/architecture.md section 9), parametrized over the registry: a new method file with
its ``configs/method/<name>.yaml`` is covered automatically."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlt.cli import build, make_experiment
from fedlt.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
NAMES = METHODS.names()


def _config(name: str) -> str:
    return str(ROOT / "configs" / "method" / f"{name}.yaml")


def method_args(name: str) -> list[str]:
    """The method's own config, plus tests/configs/fast/<name>.yaml when a method's paper defaults make a
    seconds-long contract run impossible (server-side training stages)."""
    args = ["--config", _config(name)]
    fast = ROOT / "tests" / "configs" / "fast" / f"{name}.yaml"
    return args + (["--config", str(fast)] if fast.is_file() else [])


def _experiment_for(name: str, tmp_path: Path, *extra: str):
    parser, cfg, init = build("fit", ["--config", TINY, *method_args(name), "--run_dir", str(tmp_path),
                                       "--method.init_args.batch_size", "16", *extra])
    return make_experiment(parser, cfg, init)


def _sim(name: str, tmp_path: Path, *extra: str):
    return _experiment_for(name, tmp_path, *extra).build_simulator()


def _run(sim, rounds: int = 2) -> list[dict[str, float]]:
    return [sim.run_round(r).metrics for r in range(sim.round + 1, rounds + 1)]


def _state(sim) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sim.global_state.items()}


def test_every_method_has_a_config_and_a_paper():
    for name in NAMES:
        assert Path(_config(name)).is_file(), name
        cls = METHODS.get(name)
        assert cls.paper is not None and cls.paper.title and cls.paper.venue, name
        assert cls.__module__.endswith(f".{name}"), "registry key must equal the module name"
        assert (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip(), "module docstring"


@pytest.mark.parametrize("name", NAMES)
def test_two_rounds_finite_and_change_the_global_state(name, tmp_path):
    sim = _sim(name, tmp_path)
    before = _state(sim)
    trains = METHODS.get(name).trains  # False: nothing to train (zero-shot CLIP), only the evaluation is checked
    for metrics in _run(sim):
        assert not trains or (metrics["train/loss"] > 0 and math.isfinite(metrics["train/loss"]))
    assert not trains or any(not torch.equal(before[k], v) for k, v in sim.global_state.items())
    metrics = sim.evaluate()
    assert 0.0 <= metrics["test/personal/acc_mean"] <= 1.0
    if sim.method.has_global_model:
        assert 0.0 <= metrics["test/global/acc"] <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    sim = _sim(name, tmp_path / "a")
    _run(sim, 1)
    state = sim.state_dict()
    expected = sim.evaluate()
    other = _sim(name, tmp_path / "b")
    other.load_state_dict(state)
    assert other.round == 1
    for k, v in sim.global_state.items():
        assert torch.equal(other.global_state[k], v), k
    assert other.evaluate() == pytest.approx(expected, nan_ok=True)
    # Continuing both gives the same round 2.
    _run(sim), _run(other)
    for k, v in sim.global_state.items():
        assert torch.equal(other.global_state[k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_seed_determinism(name, tmp_path):
    a, b = _sim(name, tmp_path / "a"), _sim(name, tmp_path / "b")
    _run(a), _run(b)
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k
    c = _sim(name, tmp_path / "c", "--seed", "1")
    _run(c)
    assert any(not torch.equal(c.global_state[k], v) for k, v in a.global_state.items() if k in c.global_state)


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_model(name, tmp_path):
    if METHODS.get(name).needs_clip:
        pytest.skip("CLIP-only method: its backbone is a frozen CLIP model")
    sim = _sim(name, tmp_path, "--model.name", "resnet8", "--model.kwargs", "{}")
    bn_key = next(k for k in sim.model.state_dict() if k.endswith("running_mean"))
    before = sim.model.state_dict()[bn_key].clone()
    (metrics,) = _run(sim, 1)
    assert math.isfinite(metrics["train/loss"])
    if not sim.method.is_personal(bn_key):
        assert not torch.equal(sim.global_state[bn_key], before)  # running statistics are aggregated
    assert math.isfinite(sim.evaluate()["test/personal/acc_mean"])


# (world size, cohort size): 3 clients over 2 ranks split 2/1; 2 clients over 3 ranks leave one rank idle.
_LAUNCHES = ((1, 3), (2, 3), (1, 2), (3, 2))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One launch per (world size, cohort) of _LAUNCHES, each running every registered method (ddp_worker.py)."""
    base = tmp_path_factory.mktemp("ddp")
    # A module fixture runs before the autouse cache fixture: hand the workers the session's data cache
    # explicitly, so that both sides read the same images (a cache left by another build or kernel may differ).
    env = {**os.environ, "FEDLT_CACHE": str(tmp_path_factory.getbasetemp() / "fedlt-cache"),
           "WANDB_DIR": str(tmp_path_factory.getbasetemp() / "wandb"), "OMP_NUM_THREADS": "1"}
    # The launches are independent and mostly wait on each other's ranks (gloo): run them side by side, each in
    # its own process group (a distinct MASTER_PORT), which halves the fixture's wall time on 2 cores.
    procs = []
    for world, cohort in _LAUNCHES:
        out = base / f"c{cohort}"
        out.mkdir(exist_ok=True)
        log = open(base / f"w{world}-c{cohort}.log", "w+")
        procs.append((log, subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("ddp_worker.py")), str(out), str(world), str(cohort),
             *NAMES], stdout=log, stderr=subprocess.STDOUT, text=True,
            env={**env, "MASTER_PORT": str(_free_port())})))
    try:
        for log, proc in procs:
            with log:
                try:
                    rc = proc.wait(timeout=1200)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                log.seek(0)
                assert rc == 0, log.read()[-8000:]
    finally:  # a failed launch must not leave the others running
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{what}: {k}"


@pytest.mark.ddp
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world, cohort", [(2, 3), (3, 2)], ids=["2-ranks-uneven", "3-ranks-idle"])
def test_world_size_invariance_is_bitwise(name, world, cohort, ddp_results):
    """2 ranks splitting a cohort of 3 unevenly and 3 ranks with one idle give the single process's results bit
    for bit: the global state, every client's persistent state, the train metrics of each round, and the GM/PM
    evaluation, and both again after the post-training stages (exact, order-independent aggregation; evaluation batches
    do not depend on the world size)."""
    one = torch.load(ddp_results / f"c{cohort}" / f"{name}-w1.pt", weights_only=False)
    many = torch.load(ddp_results / f"c{cohort}" / f"{name}-w{world}.pt", weights_only=False)
    _assert_bitwise(many["global"], one["global"], "global state")
    mine, theirs = one["store"].get("states", {}), many["store"].get("states", {})
    assert sorted(theirs) == sorted(mine)
    for cid, state in mine.items():
        _assert_bitwise(theirs[cid], state, f"client {cid}")
    assert many["train"] == one["train"]
    nan = [k for k, v in one["metrics"].items() if v != v]
    assert {k: v for k, v in many["metrics"].items() if k not in nan} == \
        {k: v for k, v in one["metrics"].items() if k not in nan}
    assert all(many["metrics"][k] != many["metrics"][k] for k in nan)
    # Post-training stages (realignment, calibration, post-hoc personalization) are world-size invariant too.
    _assert_bitwise(many["post_global"], one["post_global"], "global state after on_fit_end")
    assert (many["post"] is None) == (one["post"] is None)
    if one["post"] is not None:
        nan = [k for k, v in one["post"].items() if v != v]
        assert {k: v for k, v in many["post"].items() if k not in nan} == \
            {k: v for k, v in one["post"].items() if k not in nan}
