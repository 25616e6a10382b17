"""SLURM glue: ``sbatch`` submission, array index lists, and requeueing a preempted job.

One requeue implementation serves both templates: ``fedlt sweep --run-index`` (``slurm/array.sbatch``) calls
:func:`requeue_if_allowed` itself when its run is preempted, and ``slurm/fit.sbatch`` runs
``python -m fedlt.cli.slurm requeue`` when ``srun fedlt fit`` exits with status 3.

Whether a job may be requeued:

* ``FEDLT_REQUEUE=0`` never requeues, ``FEDLT_REQUEUE=1`` always tries;
* otherwise (unset or ``auto``) ``scontrol show job <id>`` is asked and the job is requeued unless it reports
  ``Requeue=0`` (submitted with ``--no-requeue``, or ``JobRequeue=0`` in the cluster's configuration).

The job id of an array task is ``${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}`` (only that task goes back to the
queue), else ``$SLURM_JOB_ID``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from fedlt.errors import UserError

ARRAY_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "array.sbatch"  # the repository's slurm/ folder
_REQUEUE_FIELD = re.compile(r"\bRequeue=(\d)")
_JOB_ID = re.compile(r"(\d+)")


class SlurmError(UserError):
    """sbatch is missing or refused the job (the environment's fault): message and exit status 2."""


def _log(text: str) -> None:
    print(f"fedlt: {text}", file=sys.stderr, flush=True)


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol`` knows this job (or array task) by, or ``None`` outside SLURM."""
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def _scontrol(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        _log(f"scontrol {' '.join(args)} failed: {err}")
        return None


def requeue_allowed(job_id: str, env: Mapping[str, str] | None = None) -> bool:
    """``FEDLT_REQUEUE`` (0/1) or, by default, the ``Requeue=`` field of ``scontrol show job``."""
    env = os.environ if env is None else env
    policy = env.get("FEDLT_REQUEUE", "auto").strip().lower()
    if policy in ("0", "false", "no"):
        _log("FEDLT_REQUEUE=0: not requeueing")
        return False
    if policy in ("1", "true", "yes"):
        return True
    shown = _scontrol("show", "job", job_id)
    m = _REQUEUE_FIELD.search(shown.stdout) if shown is not None and shown.returncode == 0 else None
    if m is not None and m.group(1) == "0":
        _log(f"SLURM job {job_id} does not allow requeueing (Requeue=0; submit with --requeue)")
        return False
    return True


def requeue_if_allowed(env: Mapping[str, str] | None = None) -> bool:
    """Puts this SLURM job (array task) back in the queue after a preemption checkpoint, when allowed.

    Returns:
        ``True`` if ``scontrol requeue`` succeeded; ``False`` outside SLURM, when not allowed, or on failure
        (the checkpoint is on disk either way: resubmitting continues the run).
    """
    job_id = slurm_job_id(env)
    if job_id is None:
        _log("not running under SLURM: run the same command again to resume")
        return False
    if not requeue_allowed(job_id, env):
        return False
    done = _scontrol("requeue", job_id)
    if done is None or done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() if done is not None else ""
        _log(f"scontrol requeue {job_id} failed{': ' + detail if detail else ''}; resubmit to resume")
        return False
    _log(f"requeued SLURM job {job_id}")
    return True


@contextlib.contextmanager
def run_lease(lock_path: str | Path) -> Iterator[bool]:
    """Holds a non-blocking exclusive lock on ``lock_path`` for the block; yields whether it was obtained.

    Two array tasks of the same run (a resubmission while the first is queued, running or requeued) must not train
    into one run directory; the second finds the lease taken. The lock dies with its process (POSIX ``flock``), so
    a killed or requeued task never leaves a stale lease. Where ``flock`` is unavailable, it always yields True.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def array_indices(indices: Iterable[int], max_parallel: int | None = None) -> str:
    """The ``--array`` value for ``indices``: ranges compressed (``0-3,5,7-8``), ``%max_parallel`` appended."""
    runs: list[list[int]] = []  # maximal runs of consecutive indices
    for i in sorted(set(indices)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    spec = ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"{spec}%{max_parallel}" if max_parallel else spec


def sbatch_options(account: str | None = None, partition: str | None = None, gpus: int | None = None,
                   time: str | None = None, extra: str | None = None) -> list[str]:
    """sbatch options from ``fedlt sweep``'s --account/--partition/--gpus/--time and ``--sbatch-args``."""
    opts = [f"--{flag}={value}" for flag, value in (("account", account), ("partition", partition), ("time", time))
            if value]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    return opts + shlex.split(extra or "")


def sbatch_command(name: str, sweep_dir: str | Path, indices: Iterable[int], options: Sequence[str],
                   max_parallel: int | None = None, script: str | Path = ARRAY_SCRIPT,
                   workdir: str | None = None) -> list[str]:
    """The ``sbatch`` command of a sweep's array job over ``indices``: one log file per task (appended to when
    the task is requeued), the sweep's working directory, and this Python for the tasks (``FEDLT_PYTHON``)."""
    d = Path(sweep_dir).resolve()
    return ["sbatch", f"--array={array_indices(indices, max_parallel)}", f"--job-name={name}",
            f"--output={d / 'logs' / '%A_%a.out'}", "--open-mode=append", f"--chdir={workdir or Path.cwd()}",
            f"--export=ALL,FEDLT_PYTHON={sys.executable}", *options, str(script), str(d)]


def submit(command: Sequence[str]) -> str:
    """Runs ``sbatch`` and returns the job id it printed (``Submitted batch job 123``)."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=300, check=False)
    except OSError as err:
        raise SlurmError(f"cannot run {command[0]!r} ({err}); is this a SLURM login node?") from err
    if done.returncode != 0:
        raise SlurmError(f"sbatch failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    m = _JOB_ID.search(done.stdout)
    if m is None:
        raise SlurmError(f"sbatch printed no job id: {done.stdout.strip()!r}")
    return m.group(1)


def _main(argv: Sequence[str]) -> int:
    if list(argv) != ["requeue"]:
        print("usage: python -m fedlt.cli.slurm requeue   (requeue this SLURM job if allowed)", file=sys.stderr)
        return 2
    requeue_if_allowed()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
