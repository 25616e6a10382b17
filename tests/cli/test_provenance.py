"""Provenance: every run directory records the environment that trained it; resumes append theirs; ``fedlt report``
names the builds behind a table and warns when they differ; output into a closed pipe ends quietly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlt.cli import main
from fedlt.provenance import build_id, environment_record, git_state, read_environments

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")


def _fit(run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run_dir), *extra])


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_is_the_checkouts_commit():
    state = git_state()
    assert state is not None and state["commit"] == _git("rev-parse", "HEAD")
    assert state["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert git_state(Path("/")) is None  # outside a checkout: no commit rather than a wrong one


def test_environment_record_fields(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    env = environment_record(torch.device("cpu"), world_size=3, precision="bf16-mixed")
    assert env["torch"]["version"] == torch.__version__
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch"]["num_threads"] == torch.get_num_threads()
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["world_size"] == 3 and env["precision"] == "bf16-mixed" and env["devices"]["type"] == "cpu"
    assert env["slurm"] == {"job_id": "4242", "array_task_id": "7"}
    import lightning
    import numpy

    assert env["packages"]["lightning"] == lightning.__version__ and env["packages"]["numpy"] == numpy.__version__
    assert build_id(env)["torch"] == torch.__version__


def test_fit_records_the_environment_and_a_resume_appends_its_own(tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(run, "--trainer.rounds", "1") == 0
    first_text = (run / "environment.json").read_text()
    first = json.loads(first_text)
    assert first["torch"]["version"] == torch.__version__
    assert first["fedlt"]["git"]["commit"] == _git("rev-parse", "HEAD")
    assert first["world_size"] == 1 and first["precision"] == "32-true"
    assert not (run / "resume_log.jsonl").exists()
    assert _fit(run, "--trainer.rounds", "2", "--resume", "auto") == 0
    assert (run / "environment.json").read_text() == first_text  # the first record is kept as it was
    lines = (run / "resume_log.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["round"] == 1 and entry["checkpoint"].endswith("round_00001.ckpt")
    assert entry["environment"]["torch"]["version"] == torch.__version__
    assert [e["time"] for e in read_environments(run)] == [first["time"], entry["environment"]["time"]]


def test_report_names_the_builds_and_warns_on_different_torch_versions(tmp_path, capsys):
    root = tmp_path / "sweep"
    for seed in (0, 1):
        assert _fit(root / f"s{seed}", "--seed", str(seed), "--name", f"s{seed}") == 0
    capsys.readouterr()
    assert main(["report", str(root)]) == 0
    cap = capsys.readouterr()
    commit = _git("rev-parse", "HEAD")[:12]
    assert f"Software: fedlt {commit}" in cap.out and f"torch {torch.__version__}" in cap.out
    assert "warning" not in cap.err
    # The second run was (say) resumed under another torch: the table mixes builds, and says which runs.
    env = json.loads((root / "s1" / "environment.json").read_text())
    env["torch"]["version"] = "9.9.9"
    (root / "s1" / "environment.json").write_text(json.dumps(env))
    assert main(["report", str(root)]) == 0
    cap = capsys.readouterr()
    assert "fedlt: warning: the cells of this table come from different torch builds" in cap.err
    assert f"torch 9.9.9: {root / 's1'}" in cap.err and f"torch {torch.__version__}: {root / 's0'}" in cap.err
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert set(summary["software"]["versions"]["torch"]) == {"9.9.9", torch.__version__}
    assert "Software: fedlt" in (root / "report" / "table.md").read_text()
    assert "% Software: fedlt" in (root / "report" / "table.tex").read_text()


def test_head_of_fedlt_methods_prints_one_line_and_exits_0():
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m fedlt methods | head -1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "" and len(out.stdout.splitlines()) == 1, out


@pytest.mark.parametrize("args", [["methods"], ["methods", "--markdown"], ["--help"]])
def test_output_into_a_closed_pipe_exits_quietly(args):
    """The reader is gone before fedlt writes a byte (deterministic, unlike a race with ``head``): every write
    fails with EPIPE, and fedlt still exits 0 with nothing on stderr."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "fedlt", *args], stdout=write, stderr=subprocess.PIPE,
                             timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 0 and out.stderr == b"", out
