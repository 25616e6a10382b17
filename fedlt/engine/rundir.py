"""The run directory's guards: one process at a time (an OS lock), a resume that refuses a config that would change
the result, and the removal of temporary files that a killed process left behind.

The lock is ``flock`` on the run directory itself: the OS releases it when its holder dies, however it dies, so a
stale lock never blocks a run and no lock is ever broken by guessing. The holder's host, pid and start time are
written to ``.lock`` inside the directory for the message a second process prints.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

LOCK_INFO = ".lock"

# Fields that cannot change what a run computes, so a resume may change them. Keys are dotted config keys;
# an entry ending in "." allows every key below it.
RESUME_ALLOWED = (
    "trainer.rounds",  # extend (or finish early) a run; rounds already trained are never redone
    "trainer.devices", "trainer.num_nodes", "trainer.accelerator",  # results do not depend on the world size
    "trainer.checkpoint_every", "trainer.keep_checkpoints",  # checkpoint cadence
    "trainer.eval_batch_size",  # batching of evaluation forward passes only
    "logging.",  # W&B project, tags, group, progress bar
    "name", "run_dir",
    "data.source.init_args.root",  # where the same data set lives (a cluster's mount point)
    "data.partition.init_args.max_seconds",  # how soon a hopeless draw fails; a partition found is the same
)

# Settings added in a later fedlt version, with the value that does what the versions before them did: a
# checkpoint whose config predates the setting resumes when the setting has that value (and only then).
ADDED_SETTINGS: dict[str, object] = {
    "trainer.vectorize_cohort": False,
    "model.class_path": None,
    "model.init_args": {},
    "model.head": "head",
    "method.init_args.lr_schedule": None,
    "method.init_args.local_lr_schedule": None,
    "method.init_args.server_lr_schedule": None,
}

# Not part of what a run computes, nor worth recording: how this invocation was asked to start.
_NOT_COMPARED = ("resume",)

# Temporary files of fedlt's atomic writes: checkpoints, partition.json, environment.json, client-state files.
_STALE = re.compile(r"(^\..+\.tmp\d+$)|(^.+\.\d+\.tmp$)|(^client_\d+.*\.tmp\d+$)")


class RunDirBusy(Exception):
    """Another live process holds the run directory."""


class RunDirLock:
    """An exclusive ``flock`` on a run directory for the life of a process (or until :meth:`release`).

    Args:
        run_dir: the directory (created by :meth:`acquire` if missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """The holder as written in ``.lock`` (host, pid, start time), or a note that it is unknown."""
        try:
            info = json.loads((self.run_dir / LOCK_INFO).read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def acquire(self) -> RunDirLock:
        """Takes the lock or raises :class:`RunDirBusy` naming the holder; never waits."""
        import fcntl

        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirBusy(f"run directory {self.run_dir} is in use by {self.holder()}; wait for it to "
                                 "finish, or pick another --run_dir / --name") from None
            raise
        self._fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (self.run_dir / LOCK_INFO).write_text(json.dumps(info))
        return self

    def release(self) -> None:
        """Removes the holder note and releases the lock (the OS does the latter on any exit, too)."""
        if self._fd is None:
            return
        (self.run_dir / LOCK_INFO).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Deletes the temporary files of interrupted atomic writes (``.round_N.ckpt.tmpPID``,
    ``partition.json.PID.tmp``, ``client_N.tmpPID``, ...) anywhere in the run directory; call it holding the lock.
    Returns what was removed."""
    removed: list[Path] = []
    root = Path(run_dir)
    if not root.is_dir():
        return removed
    for path in root.rglob("*"):
        if path.is_file() and _STALE.match(path.name) and "wandb" not in path.relative_to(root).parts:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_ALLOWED)


def config_changes(old_yaml: str, new_yaml: str) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compares two resolved configs key by key.

    Returns:
        (allowed, refused): ``{dotted key: (old value, new value)}`` of the differing keys that
        :data:`RESUME_ALLOWED` lets a resume change, and of those it does not.
    """
    import yaml

    old = _flatten(yaml.safe_load(old_yaml) or {})
    new = _flatten(yaml.safe_load(new_yaml) or {})
    allowed: dict[str, tuple[Any, Any]] = {}
    refused: dict[str, tuple[Any, Any]] = {}
    missing = object()
    for key in sorted((set(old) | set(new)) - set(_NOT_COMPARED)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b or (a is missing and key in ADDED_SETTINGS and b == ADDED_SETTINGS[key]):
            continue
        pair = (None if a is missing else a, None if b is missing else b)
        (allowed if _allowed(key) else refused)[key] = pair
    return allowed, refused


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key: old -> new`` per line."""
    return "\n".join(f"  {k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}"
                     for k, (a, b) in changes.items())
