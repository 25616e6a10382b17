"""``fedlt sweep`` with a fake ``sbatch``/``scontrol`` on PATH: expansion (count, names, stability under re-ordering
of the grid file), bad grid keys, --dry-run, --submit, array-index execution, skip-finished, and requeue on SIGUSR1
followed by a resume with the same final metrics as an uninterrupted run, and the slurm/ templates (fake srun)."""

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

from fedlt.cli import main
from fedlt.cli.slurm import array_indices, requeue_if_allowed
from fedlt.cli.sweep import run_names

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
FEDAVG, FEDPROX = (str(ROOT / "configs" / "method" / f"{m}.yaml") for m in ("fedavg", "fedprox"))
GRID = f"""\
config: [{FEDAVG}, {FEDPROX}]
data.partition.init_args.alpha: [0.1, 0.5]
seed: [0, 1]
"""
GRID_REORDERED = f"""\
seed: [0, 1]
data.partition.init_args.alpha: [0.1, 0.5]
config: [{FEDAVG}, {FEDPROX}]
"""
NAMES = [f"{m}-alpha{a}-seed{s}" for m in ("fedavg", "fedprox") for a in (0.1, 0.5) for s in (0, 1)]


@pytest.fixture
def slurm_log(tmp_path, monkeypatch) -> Path:
    """The fake sbatch/scontrol first on PATH; returns the log of their calls (JSON lines)."""
    log = tmp_path / "slurm.log"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "FEDLT_REQUEUE", "FAKE_SLURM_REQUEUE"):
        monkeypatch.delenv(var, raising=False)
    return log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _grid(tmp_path: Path, text: str, name: str = "grid.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _sweep(tmp_path: Path, sweep_dir: Path, grid: str = GRID, *extra: str) -> int:
    return main(["sweep", "--config", TINY, "--grid", _grid(tmp_path, grid), "--sweep_dir", str(sweep_dir), *extra])


def _spec(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_expansion_count_names_and_stability_under_reordering(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _sweep(tmp_path, a) == 0
    assert main(["sweep", "--config", TINY, "--grid", _grid(tmp_path, GRID_REORDERED, "g2.yaml"),
                 "--sweep_dir", str(b)]) == 0
    runs_a, runs_b = _spec(a)["runs"], _spec(b)["runs"]
    assert [r["index"] for r in runs_a] == list(range(8))
    assert [r["name"] for r in runs_a] == [r["name"] for r in runs_b] == NAMES
    assert [r["params"] for r in runs_a] == [r["params"] for r in runs_b]
    assert runs_a[5]["params"] == {"config": FEDPROX, "data.partition.init_args.alpha": 0.1, "seed": 1}
    # Every run is fully specified: a frozen, resolved config with its grid values, run dir, group and resume.
    frozen = (a / runs_a[5]["config"]).read_text()
    for needle in ("FedProx", "alpha: 0.1", "seed: 1", "group: a", "resume: auto", "name: fedprox-alpha0.1-seed1",
                   f"run_dir: {a}/runs/fedprox-alpha0.1-seed1"):
        assert needle in frozen, needle
    assert runs_a[5]["argv"][:5] == ["fit", "--config", TINY, "--config", FEDPROX]
    # Writing the same sweep again is a no-op; a different grid in the same directory is refused.
    assert _sweep(tmp_path, a) == 0
    assert _sweep(tmp_path, a, "seed: [0, 1, 2]\n") == 2
    assert "already holds a different sweep" in capsys.readouterr().err


def test_run_names_are_unique_and_readable():
    keys = ["config", "data.partition.init_args.alpha", "method.init_args.alpha", "model.name"]
    runs = [{"config": f"configs/{d}/fedavg.yaml", "data.partition.init_args.alpha": 0.5,
             "method.init_args.alpha": 1, "model.name": "timm:resnet18"} for d in ("x", "y")]
    a, b = run_names(keys, runs)
    assert a != b and a.startswith("fedavg-partition.alpha0.5-method.alpha1-name_timm_resnet18-")
    assert run_names(keys, runs) == [a, b]  # stable
    assert run_names(["seed"], [{"seed": 0}, {"seed": 1}]) == ["seed0", "seed1"]


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        ("trainer.bogus: [1, 2]\nseed: [0]\n", "grid key 'trainer.bogus' (value 1, run bogus1-seed0): unrecognized"),
        ("trainer.rounds: [2, abc]\n", "grid key 'trainer.rounds' (value 'abc', run rounds_abc)"),
        ("method.init_args.mu: [0.1]\n", "grid key 'method.init_args.mu' (value 0.1, run mu0.1): Option 'mu' is not"),
        ("config: [nope.yaml]\n", "grid key 'config': no such config file 'nope.yaml'"),
        ("name: [a, b]\n", "grid key 'name': not allowed"),
        ("seed: []\n", "grid key 'seed' has no values"),
        ("data: {num_clients: [4, 8]}\n", "use dotted keys"),
        ("- 1\n- 2\n", "expected a mapping of dotted config keys"),
    ],
)
def test_a_bad_grid_exits_2_with_a_message_naming_the_key(tmp_path, capsys, grid, needle):
    assert _sweep(tmp_path, tmp_path / "s", grid) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlt: error:") and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_bad_usage_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert main(["sweep"]) == 2
    assert main(["sweep", "--sweep_dir", str(tmp_path / "none")]) == 2
    assert main(["sweep", "--sweep_dir", str(tmp_path), "--run-index"]) == 2  # no SLURM_ARRAY_TASK_ID
    assert main(["sweep", "--submit", "--dry-run", "--sweep_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give --grid" in err and "no sweep.json" in err and "SLURM_ARRAY_TASK_ID" in err
    assert "not allowed with argument" in err and "Traceback" not in err


def test_dry_run_prints_the_runs_and_the_sbatch_command_and_writes_nothing(tmp_path, capsys, slurm_log):
    assert _sweep(tmp_path, tmp_path / "s", GRID, "--dry-run", "--partition", "gpu", "--max-parallel", "4") == 0
    out = capsys.readouterr().out
    assert "sweep s: 8 runs" in out and "(8 pending)" in out
    for index, name in enumerate(NAMES):
        assert f"{index:>5}  pending      {name}\n" in out
    assert "would submit, once the sweep exists:\n  sbatch --array=0-7%4 --job-name=s " in out
    assert "--partition=gpu" in out and f"slurm/array.sbatch {tmp_path / 's'}\n" in out
    # Nothing was written, so no command that would fail is offered: it says to create the sweep first.
    assert "--dry-run wrote nothing: create the sweep first" in out and "or run locally" not in out
    assert not (tmp_path / "s").exists() and _calls(slurm_log) == []
    # Once created, --dry-run on the sweep directory offers the commands that now work.
    assert _sweep(tmp_path, tmp_path / "s", GRID) == 0
    capsys.readouterr()
    assert main(["sweep", "--sweep_dir", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit:\n  sbatch --array=0-7" in out
    assert f"fedlt sweep --sweep_dir {tmp_path / 's'} --run-index" in out


def test_submit_calls_sbatch_with_the_array_and_the_options(tmp_path, capsys, slurm_log, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_JOB_ID", "4242")
    s = tmp_path / "s"
    assert _sweep(tmp_path, s, GRID, "--submit", "--account", "acc", "--partition", "gpu", "--gpus", "1",
                  "--time", "01:00:00", "--max-parallel", "2", "--sbatch-args=--qos=high --mem=8G") == 0
    assert "submitted array job 4242 (8 runs" in capsys.readouterr().out
    (call,) = _calls(slurm_log)
    assert call["cmd"] == "sbatch"
    assert call["argv"] == [
        "--array=0-7%2", "--job-name=s", f"--output={s}/logs/%A_%a.out", "--open-mode=append",
        f"--chdir={os.getcwd()}", f"--export=ALL,FEDLT_PYTHON={sys.executable}", "--account=acc",
        "--partition=gpu", "--time=01:00:00", "--gres=gpu:1", "--qos=high", "--mem=8G",
        str(ROOT / "slurm" / "array.sbatch"), str(s),
    ]
    assert (s / "logs").is_dir()
    assert _spec(s)["submissions"] == [{"job_id": "4242", "array": "0-7%2"}]
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    assert main(["sweep", "--sweep_dir", str(s), "--submit"]) == 2
    assert "sbatch failed (exit 1): sbatch: error: Batch job submission failed" in capsys.readouterr().err


def test_array_index_runs_skips_finished_and_resubmits_only_unfinished(tmp_path, capsys, slurm_log, monkeypatch):
    s = tmp_path / "s"
    assert _sweep(tmp_path, s, "seed: [0, 1, 2]\n") == 0
    assert main(["sweep", "--sweep_dir", str(s), "--run-index", "1"]) == 0
    run = s / "runs" / "seed1"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert json.loads((run / "final.json").read_text())["rounds"] == [1, 2]
    assert "seed: 1" in (run / "config.yaml").read_text()
    stamp = (run / "final.json").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the index defaults to the array task id
    assert main(["sweep", "--sweep_dir", str(s), "--run-index"]) == 0
    assert "run 1 (seed1) already finished; skipping" in capsys.readouterr().out
    assert (run / "final.json").stat().st_mtime_ns == stamp
    assert main(["sweep", "--sweep_dir", str(s), "--submit", "--partition", "p"]) == 0
    out = capsys.readouterr().out
    assert "(1 finished, 2 pending)" in out and "    1  finished     seed1" in out
    assert _calls(slurm_log)[-1]["argv"][0] == "--array=0,2"
    assert main(["sweep", "--sweep_dir", str(s), "--run-index", "3"]) == 2
    assert "--run-index 3: the sweep has 3 runs (0-2)" in capsys.readouterr().err


def test_requeue_policy(slurm_log, monkeypatch):
    assert requeue_if_allowed({}) is False  # not under SLURM: nothing to call
    assert requeue_if_allowed({"SLURM_JOB_ID": "7", "FEDLT_REQUEUE": "0"}) is False
    assert _calls(slurm_log) == []
    monkeypatch.setenv("FAKE_SLURM_REQUEUE", "0")  # submitted with --no-requeue
    assert requeue_if_allowed({"SLURM_JOB_ID": "7"}) is False
    monkeypatch.setenv("FAKE_SLURM_REQUEUE", "1")
    assert requeue_if_allowed({"SLURM_JOB_ID": "7"}) is True
    assert requeue_if_allowed({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3"}) is True
    assert [c["argv"] for c in _calls(slurm_log)] == [
        ["show", "job", "7"], ["show", "job", "7"], ["requeue", "7"], ["show", "job", "8_3"], ["requeue", "8_3"]]
    assert array_indices([5, 0, 1, 2, 7, 8, 3]) == "0-3,5,7-8" and array_indices([4], 2) == "4%2"


def _final(run: Path) -> tuple[dict, list[dict]]:
    report = json.loads((run / "final.json").read_text())
    rows = csv.DictReader((run / "metrics.csv").open())
    return report, [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sigusr1_requeues_the_array_task_and_the_rerun_resumes_to_identical_metrics(tmp_path, capsys, slurm_log):
    # 30 rounds of ~30 ms: after checkpoint 2 the signal has ~1 s of training left to land in (6 rounds were racy).
    rounds, grid = 30, "seed: [3]\n"
    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut):
        assert _sweep(tmp_path, d, grid, "--trainer.rounds", str(rounds)) == 0
    assert main(["sweep", "--sweep_dir", str(full), "--run-index", "0"]) == 0
    env = {**os.environ, "SLURM_JOB_ID": "991", "SLURM_ARRAY_JOB_ID": "990", "SLURM_ARRAY_TASK_ID": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "fedlt", "sweep", "--sweep_dir", str(cut), "--run-index"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target, deadline = cut / "runs" / "seed3" / "checkpoints" / "round_00002.ckpt", time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3 and "preempted" in out and "requeued SLURM job 990_0" in out, out
    assert [c["argv"] for c in _calls(slurm_log)] == [["show", "job", "990_0"], ["requeue", "990_0"]]
    capsys.readouterr()
    assert main(["sweep", "--sweep_dir", str(cut), "--submit"]) == 0  # an interrupted run is resubmitted
    assert "    0  interrupted  seed3" in capsys.readouterr().out and _calls(slurm_log)[-1]["argv"][0] == "--array=0"
    assert main(["sweep", "--sweep_dir", str(cut), "--run-index", "0"]) == 0  # the requeued task
    assert "resumed from" in capsys.readouterr().out
    (a, rows_a), (b, rows_b) = _final(full / "runs" / "seed3"), _final(cut / "runs" / "seed3")
    assert a["rounds"] == b["rounds"] == list(range(1, rounds + 1))
    for part in ("final", "mean_last", "best"):
        assert b[part] == pytest.approx(a[part], abs=1e-6, nan_ok=True), part
    assert rows_b == rows_a


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "slurm" / name), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_sbatch_templates_run_the_task_and_requeue_on_status_3(slurm_log):
    for name in ("array.sbatch", "fit.sbatch"):
        header = [line for line in (ROOT / "slurm" / name).read_text().splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --requeue" in header and not any("account" in h or "partition" in h for h in header)
    # array.sbatch: the batch shell becomes the array task (exec, no srun) so that it receives B:USR1 itself.
    done = _script("array.sbatch", "/sweeps/s", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="4", FEDLT_PYTHON="echo")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "-m fedlt sweep --sweep_dir /sweeps/s --run-index 4"
    # fit.sbatch: one srun task per GPU on every node; status 3 (preempted) -> python -m fedlt.cli.slurm requeue.
    env = {"SLURM_JOB_ID": "55", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "FEDLT_PYTHON": sys.executable}
    done = _script("fit.sbatch", "configs/quickstart.yaml", "--name", "big", FAKE_SRUN_STATUS="3", **env)
    assert done.returncode == 3 and "requeued SLURM job 55" in done.stderr, done.stderr
    assert [(c["cmd"], c["argv"]) for c in _calls(slurm_log)] == [
        ("srun", [sys.executable, "-m", "fedlt", "fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator",
                  "gpu", "--trainer.devices", "4", "--trainer.num_nodes", "2", "--resume", "auto", "--name", "big"]),
        ("scontrol", ["show", "job", "55"]), ("scontrol", ["requeue", "55"])]
    slurm_log.unlink()
    assert _script("fit.sbatch", "configs/quickstart.yaml", FAKE_SRUN_STATUS="0", **env).returncode == 0
    assert [c["cmd"] for c in _calls(slurm_log)] == ["srun"]


def test_a_run_held_by_another_task_is_skipped_and_repeated_grid_values_are_refused(tmp_path, capsys):
    """A resubmitted array task must not train into a run directory another task holds (its lease), and a grid that
    repeats a value would give two runs one directory."""
    from fedlt.cli.slurm import run_lease

    s = tmp_path / "s"
    assert _sweep(tmp_path, s, "seed: [0]\n") == 0
    name = json.loads((s / "sweep.json").read_text())["runs"][0]["name"]
    with run_lease(s / "runs" / f".{name}.lock") as ours:
        assert ours
        capsys.readouterr()
        assert main(["sweep", "--sweep_dir", str(s), "--run-index", "0"]) == 0
        assert "is being trained by another task; skipping" in capsys.readouterr().out
        assert not (s / "runs" / name / "final.json").exists()
    assert _sweep(tmp_path, tmp_path / "dup", "seed: [0, 0]\n") == 2
    assert "repeats a value" in capsys.readouterr().err
