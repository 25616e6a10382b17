"""Atomic round checkpoints, resume, and preemption signals (SIGTERM / SIGUSR1 -> checkpoint at the next round
boundary and a clean exit)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from fedlt.engine.faults import failpoint
from fedlt.signals import PreemptionFlag

__all__ = ["PreemptionFlag", "checkpoint_path", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "prune_checkpoints", "save_atomic"]

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"round_(\d+)\.ckpt$")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # Serialised in memory first, then written with Python's I/O: a full disk then raises OSError(ENOSPC) naming
    # the file (torch.save straight to a file turns it into an opaque RuntimeError).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            data = buffer.getbuffer()
            f.write(data[: len(data) // 2])
            failpoint("checkpoint.write")
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise WriteError(err.errno, err.strerror, str(path), needed=buffer.getbuffer().nbytes) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class WriteError(OSError):
    """A file could not be written (full disk, read-only file system, ...); ``needed`` is its size in bytes."""

    def __init__(self, errno: int | None, strerror: str | None, filename: str, needed: int | None = None) -> None:
        super().__init__(errno, strerror, filename)
        self.needed = needed


def checkpoint_path(run_dir: str | Path, round: int) -> Path:
    """Where the checkpoint of ``round`` goes."""
    return Path(run_dir) / CKPT_DIR / f"round_{round:05d}.ckpt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of the run's checkpoints, oldest first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest round checkpoint of the run, or ``None``."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Deletes all but the ``keep`` newest round checkpoints (``keep <= 0`` keeps everything)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)
