"""The environment record of a run: which software, on which machine, produced it.

Written to ``<run_dir>/environment.json`` before the first round of a fresh run, appended to
``<run_dir>/resume_log.jsonl`` by every resume (the first record is never overwritten), and logged to W&B's config
under ``environment.*``. ``fedlt report`` reads it to name the versions behind each table and to warn when the cells
of one table come from different builds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"
RESUME_LOG = "resume_log.jsonl"
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "open_clip_torch", "timm", "numpy", "wandb",
            "jsonargparse")
SLURM_VARS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
              "restart_count": "SLURM_RESTART_COUNT", "nodelist": "SLURM_JOB_NODELIST", "ntasks": "SLURM_NTASKS",
              "partition": "SLURM_JOB_PARTITION"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state(path: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout holding ``path`` (default: the fedlt package), or ``None`` when
    fedlt is not run from a git checkout (an installed wheel) or git is missing. ``dirty`` ignores untracked
    files: it says whether tracked sources differ from the commit."""
    where = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _torch_record() -> dict[str, Any]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
            "num_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def _device_record(device: Any) -> dict[str, Any]:
    import torch

    kind = getattr(device, "type", str(device))
    names: list[str] = []
    if kind == "cuda" and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif kind == "cpu":
        names = [platform.processor() or platform.machine()]
    return {"type": kind, "names": names, "count": len(names) if kind == "cuda" else 1}


def environment_record(device: Any = "cpu", world_size: int = 1, precision: str | None = None,
                       num_nodes: int = 1) -> dict[str, Any]:
    """The environment of this process: fedlt (version, git commit and dirty flag from a checkout), Python, torch
    (CUDA / cuDNN build, CPU capability, threads), the other key packages, host, devices, world size, precision
    and SLURM ids. Pure reads: costs a ``git`` call and no import beyond torch."""
    slurm = {key: os.environ[var] for key, var in SLURM_VARS.items() if var in os.environ}
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fedlt": {"version": _version("fedlt"), "git": git_state()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "torch": _torch_record(),
        "packages": {name: _version(name) for name in PACKAGES},
        "host": {"name": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
                 "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "devices": _device_record(device),
        "world_size": int(world_size),
        "num_nodes": int(num_nodes),
        "precision": precision,
        "slurm": slurm or None,
    }


def write_environment(run_dir: Path, record: dict[str, Any]) -> Path:
    """Writes ``environment.json`` of a fresh run (atomically: a temporary file, then a rename)."""
    path = run_dir / ENVIRONMENT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def append_resume(run_dir: Path, entry: dict[str, Any]) -> Path:
    """Appends one JSON line (a resume: when, from which round and checkpoint, the new environment) to the
    run's resume log."""
    path = run_dir / RESUME_LOG
    with path.open("a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_environments(run_dir: Path) -> list[dict[str, Any]]:
    """Every environment a run was trained in: the first record, then one per resume (empty for a run made
    before fedlt recorded them). Unreadable lines are skipped."""
    records: list[dict[str, Any]] = []
    first = run_dir / ENVIRONMENT_FILE
    if first.is_file():
        try:
            records.append(json.loads(first.read_text()))
        except ValueError:
            pass
    log = run_dir / RESUME_LOG
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                env = json.loads(line).get("environment")
            except (ValueError, AttributeError):
                continue
            if isinstance(env, dict):
                records.append(env)
    return records


def build_id(record: dict[str, Any]) -> dict[str, str]:
    """The fields that make two results comparable: fedlt's commit (with ``+dirty``, or the version outside a
    checkout) and torch's version."""
    fedlt = record.get("fedlt") or {}
    git = fedlt.get("git") or {}
    if git.get("commit"):
        code = git["commit"][:12] + ("+dirty" if git.get("dirty") else "")
    else:
        code = str(fedlt.get("version"))
    return {"fedlt": code, "torch": str((record.get("torch") or {}).get("version"))}
