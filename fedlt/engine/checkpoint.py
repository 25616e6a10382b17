"""Atomic round checkpoints, resume, and preemption signals (SIGTERM / SIGUSR1 -> checkpoint at the next round
boundary and a clean exit).

The client states of a memory or cpu store are not inside the checkpoint file: :class:`ClientJournal` writes them
under ``checkpoints/clients/`` as a full base file now and then and, at the other checkpoints, a delta file with
only the clients stored since the previous checkpoint. A checkpoint names its chain (base + deltas, oldest first);
:func:`load_checkpoint` reassembles the states, so the bytes written per round follow the cohort, not the number
of clients.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from fedlt.engine.faults import failpoint
from fedlt.signals import PreemptionFlag

__all__ = ["ClientJournal", "PreemptionFlag", "checkpoint_path", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "prune_checkpoints", "save_atomic"]

CKPT_DIR = "checkpoints"
CLIENTS_DIR = "clients"
_CKPT_RE = re.compile(r"round_(\d+)\.ckpt$")
_CLIENT_FILE_RE = re.compile(r"(base|delta)_r(\d+)(?:_p\d+)?\.pt$")
PART_BYTES = 128 * 2**20  # a client file holds at most about this many tensor bytes: bounds the write buffer


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
    """Loads a checkpoint on the CPU, with the client states of its journal chain reassembled into
    ``checkpoint["simulator"]["store"]["states"]`` (as a checkpoint that holds them itself has them)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    store = ckpt.get("simulator", {}).get("store", {}) if isinstance(ckpt, dict) else {}
    if isinstance(store, dict) and "journal" in store:
        store["states"] = ClientJournal.read(path.parent / CLIENTS_DIR, store["journal"])
    return ckpt


def _nbytes(states: dict[int, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for s in states.values() for t in s.values())


class ClientJournal:
    """The client states of a memory / cpu store as files beside the checkpoints, written incrementally.

    ``record`` writes, at a checkpoint of round r, either ``clients/delta_r<r>.pt`` (the clients stored since the
    previous checkpoint) or ``clients/base_r<r>.pt`` (every client): a base when there is none yet or when the
    deltas since the last base would outgrow it, so the bytes written per checkpoint are at most about twice the
    changed clients' states on average. The checkpoint holds the chain it needs, ``{"base_round": b, "files":
    [base_r<b>, delta..., ]}``; a later delta overrides an earlier file's client. Each file is written atomically
    before the checkpoint that names it, so a kill at any point leaves every checkpoint's chain complete (a file
    no checkpoint names yet is rewritten when its round is trained again, and removed by ``prune``).

    Args:
        folder: ``<run_dir>/checkpoints/clients``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.chain: list[str] = []
        self.base_round = 0
        self._base_bytes = 0
        self._chain_bytes = 0

    def restore(self, manifest: dict[str, Any] | None) -> None:
        """Continues the chain of a resumed checkpoint (``None``: a fresh run)."""
        self.chain = list(manifest["files"]) if manifest else []
        self.base_round = int(manifest["base_round"]) if manifest else 0
        sizes = [(self.folder / name).stat().st_size for name in self.chain]
        self._base_bytes = sizes[0] if sizes else 0
        self._chain_bytes = sum(sizes[1:])

    def record(self, round: int, states: dict[int, dict[str, torch.Tensor]], dirty: set[int]) -> dict[str, Any]:
        """Writes this checkpoint's client file and returns the checkpoint's manifest."""
        delta = {c: states[c] for c in sorted(dirty) if c in states}
        if (self.chain and not delta) or (not self.chain and not states):  # nothing (new) to write
            return {"base_round": self.base_round, "files": list(self.chain)}
        if not self.chain or self._chain_bytes + _nbytes(delta) > max(self._base_bytes, 1):
            names = self._write(f"base_r{round:06d}", states)
            self.chain, self.base_round = names, round
            self._base_bytes, self._chain_bytes = sum((self.folder / n).stat().st_size for n in names), 0
        else:
            names = self._write(f"delta_r{round:06d}", delta)
            self.chain += names
            self._chain_bytes += sum((self.folder / n).stat().st_size for n in names)
        failpoint("checkpoint.clients")
        return {"base_round": self.base_round, "files": list(self.chain)}

    def _write(self, stem: str, states: dict[int, dict[str, torch.Tensor]]) -> list[str]:
        """Writes ``states`` as ``<stem>.pt``, or as ``<stem>_p<i>.pt`` parts of at most ``PART_BYTES`` each (so
        that serialising a base of many clients never needs a second copy of all of them in memory)."""
        parts: list[dict[int, dict[str, torch.Tensor]]] = [{}]
        size = 0
        for c, state in states.items():
            n = sum(t.numel() * t.element_size() for t in state.values())
            if parts[-1] and size + n > PART_BYTES:
                parts.append({})
                size = 0
            parts[-1][int(c)] = state
            size += n
        names = [f"{stem}.pt"] if len(parts) == 1 else [f"{stem}_p{i}.pt" for i in range(len(parts))]
        for name, part in zip(names, parts):
            save_atomic(part, self.folder / name)
        return names

    @staticmethod
    def read(folder: str | Path, manifest: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
        """The client states a manifest's chain describes (later files override earlier ones)."""
        states: dict[int, dict[str, torch.Tensor]] = {}
        for name in manifest["files"]:
            states.update(torch.load(Path(folder) / name, map_location="cpu", weights_only=True))
        return states

    def prune(self, oldest_base_round: int) -> None:
        """Deletes the client files older than the base of the oldest kept checkpoint (no kept checkpoint can
        need them), and leftovers of interrupted writes."""
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            m = _CLIENT_FILE_RE.fullmatch(p.name)
            if (m and int(m.group(2)) < oldest_base_round) or (p.name.startswith(".") and ".tmp" in p.name):
                p.unlink(missing_ok=True)
