"""Per-client persistent tensors (personal heads, local BN statistics, control variates, ...).

Three storage modes trade memory for speed:

* ``memory`` keeps every client's tensors on the training device (fastest; small personal state only);
* ``cpu`` keeps them in host memory (default for anything larger than a head);
* ``disk`` keeps one folder per client under a directory (any size; with several ranks the directory must be
  shared by them, as a run directory on a cluster file system is).

Disk state is versioned by round, so that it is always consistent with the checkpoint a run resumes from: a put
in round r writes ``<client>/r<r>.pt`` (atomically), and a get in round r reads the newest version written in a
round <= r. A resume first discards the versions of rounds past its checkpoint (``discard_after``: a killed
process wrote them for rounds that the resumed run trains again). A put removes the client's versions that no kept
checkpoint can need (older than the newest one at or before the round given to ``retain_from``), so a client
keeps about ``keep_checkpoints + 1`` files at most.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedlt.engine.collectives import all_reduce_sum_
from fedlt.engine.faults import failpoint
from fedlt.engine.params import FlatLayout

STORE_MODES = ("memory", "cpu", "disk")


class ClientStateStore:
    """Stores ``dict[str, Tensor]`` per client id.

    Args:
        mode: ``memory``, ``cpu`` or ``disk``.
        device: device of the tensors handed back by ``get``.
        directory: where ``disk`` mode writes (required for it).
    """

    def __init__(self, mode: str = "cpu", device: torch.device | str = "cpu", directory: str | Path | None = None):
        if mode not in STORE_MODES:
            raise ValueError(f"unknown client_state mode {mode!r}; valid modes: {', '.join(STORE_MODES)}")
        if mode == "disk" and directory is None:
            raise ValueError("client_state mode 'disk' needs a directory")
        self.mode = mode
        self.device = torch.device(device)
        self.directory = Path(directory) if directory is not None else None
        self._mem: dict[int, dict[str, Tensor]] = {}
        self._home = self.device if mode == "memory" else torch.device("cpu")
        self._layout: FlatLayout | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self.round = 0  # the round being trained (disk versions); the last completed one between rounds
        self._retain = 0  # disk: versions older than the newest one at or before this round are not needed
        self._dirty: set[int] = set()  # memory / cpu: clients stored since the last take_dirty (checkpoints)

    def begin_round(self, round: int) -> None:
        """Puts from now on belong to ``round``; gets read versions written in rounds <= ``round``."""
        self.round = int(round)

    def retain_from(self, round: int) -> None:
        """The oldest round a run may still resume from (its oldest kept checkpoint; 0 keeps every version)."""
        self._retain = int(round)

    def discard_after(self, round: int) -> int:
        """Disk: deletes every client's versions of rounds after ``round`` (call on one rank, holding the run
        directory, before training resumes from the checkpoint of ``round``). Returns how many were deleted."""
        if self.mode != "disk" or self.directory is None or not self.directory.is_dir():
            return 0
        removed = 0
        for folder in self.directory.iterdir():
            if not folder.name.startswith("client_") or not folder.is_dir():
                continue
            for r, path in self._versions(int(folder.name.removeprefix("client_"))):
                if r > round:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _folder(self, client_id: int) -> Path:
        assert self.directory is not None
        return self.directory / f"client_{client_id:06d}"

    def _versions(self, client_id: int) -> list[tuple[int, Path]]:
        folder = self._folder(client_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith("r") and name.endswith(".pt") and name[1:-3].isdigit():
                found.append((int(name[1:-3]), folder / name))
        return sorted(found)

    def _current(self, client_id: int) -> Path | None:
        usable = [p for r, p in self._versions(client_id) if r <= self.round]
        return usable[-1] if usable else None

    def get(self, client_id: int) -> dict[str, Tensor]:
        """The client's stored tensors on ``device`` (an empty dict for a client never stored)."""
        if self.mode == "disk":
            path = self._current(client_id)
            if path is None:
                return {}
            return torch.load(path, map_location=self.device, weights_only=True)
        state = self._mem.get(client_id)
        if state is None:
            return {}
        return {k: v.to(self.device, non_blocking=True) for k, v in state.items()}

    def holding(self, client_ids: Sequence[int], keys: Sequence[str]) -> list[bool]:
        """Whether each client has stored any of ``keys`` (disk mode reads the clients' files)."""
        if self.mode == "disk":
            return [any(k in self.get(c) for k in keys) for c in client_ids]
        empty: dict[str, Tensor] = {}
        return [any(k in self._mem.get(c, empty) for k in keys) for c in client_ids]

    def stack(self, client_ids: Sequence[int], keys: Sequence[str], defaults: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{key: (len(client_ids), ...) tensor}`` of the clients' stored ``keys`` (``defaults[key]`` for a client
        without one), on ``device``: one stack per key (memory and cpu modes read the held tensors, no copy per
        client)."""
        if self.mode == "disk":
            states = [self.get(c) for c in client_ids]
        else:
            empty: dict[str, Tensor] = {}
            states = [self._mem.get(c, empty) for c in client_ids]
        out = {}
        for key in keys:
            default = defaults[key].to(self._home)
            out[key] = torch.stack([st.get(key, default).to(self._home) for st in states]).to(self.device)
        return out

    def put(self, client_id: int, state: dict[str, Tensor]) -> None:
        """Stores detached copies of ``state`` for ``client_id``."""
        if not state:
            return
        if self.mode == "disk":
            self._put_disk(client_id, state)
            return
        self._mem[client_id] = {k: v.detach().to(self._home, copy=True) for k, v in state.items()}
        self._dirty.add(client_id)

    def take_dirty(self) -> set[int]:
        """The clients whose state was stored (or received from another rank) since the last call; resets it.
        The checkpoint of a memory or cpu store writes only these clients' states (``ClientJournal``)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def states(self) -> dict[int, dict[str, Tensor]]:
        """Every stored client's tensors as held (memory / cpu modes; not copies: read only)."""
        return self._mem

    def _put_disk(self, client_id: int, state: dict[str, Tensor]) -> None:
        folder = self._folder(client_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"r{self.round:06d}.pt"
        tmp = folder / f".r{self.round:06d}.pt.tmp{os.getpid()}"
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        failpoint("store.write")
        os.replace(tmp, path)
        if self._retain <= 0:
            return
        # Keep every version after the oldest resumable round, and the newest one at or before it.
        versions = self._versions(client_id)
        base = [r for r, _ in versions if r <= self._retain]
        keep_from = base[-1] if base else 0
        for r, old in versions:
            if r < keep_from:
                old.unlink(missing_ok=True)

    def __contains__(self, client_id: int) -> bool:
        if self.mode == "disk":
            return self._current(client_id) is not None
        return client_id in self._mem

    def set_template(self, template: dict[str, Tensor]) -> None:
        """Declares the keys, shapes and dtypes every client's state has (needed for the cross-rank exchange)."""
        self._dtypes = {k: v.dtype for k, v in template.items()}
        self._layout = FlatLayout.of({k: v.shape for k, v in template.items()})

    def sync(self, fabric: Any, cohort: Sequence[int], mine: Sequence[int]) -> None:
        """Makes the states of all ``cohort`` clients known on every rank (one sum all-reduce).

        Args:
            fabric: the Fabric object (``world_size``, ``all_reduce``).
            cohort: all clients trained this round (same list on every rank).
            mine: the clients this rank trained (and ``put``).
        """
        if fabric is None or fabric.world_size == 1 or self.mode == "disk" or not cohort:
            return
        layout = self._layout
        if layout is None or layout.numel == 0:
            return
        buf = torch.zeros(len(cohort), layout.numel, device=fabric.device)
        mine_set = set(mine)
        for row, cid in enumerate(cohort):
            if cid in mine_set and cid in self._mem:
                layout.flatten({k: v.to(fabric.device) for k, v in self._mem[cid].items()}, buf[row])
        all_reduce_sum_(fabric, buf)
        for row, cid in enumerate(cohort):
            if cid not in mine_set:
                views = layout.views(buf[row])
                self._mem[cid] = {k: v.to(self._home, dtype=self._dtypes[k], copy=True) for k, v in views.items()}
                self._dirty.add(cid)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the in-memory states (disk mode lives in its directory already)."""
        if self.mode == "disk":  # the versions live in the directory; the round says which ones are current
            return {"mode": "disk", "round": self.round}
        return {"mode": self.mode, "states": {c: {k: v.cpu() for k, v in s.items()} for c, s in self._mem.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint's client store is {state.get('mode')!r}, this run's is {self.mode!r}")
        if self.mode == "disk":
            self.round = int(state.get("round", 0))
            return
        self._mem = {int(c): {k: v.to(self._home) for k, v in s.items()} for c, s in state.get("states", {}).items()}
        self._dirty = set()
