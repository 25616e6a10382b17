"""Fail points: crash the run at a named instant, for the crash-consistency (kill -9) tests.

``FEDLT_FAILPOINT=<name>:<n>`` (several separated by commas) kills the process with SIGKILL the ``n``-th time
it reaches fail point ``name``: no handler, no ``finally``, no flush runs, as when a node dies. With
``FEDLT_FAILPOINT_GROUP=1`` it kills its whole process group instead (several ranks: every rank counts its own
hits, and the first to get there takes the others down with it); only set that for a process started in a
session of its own (``start_new_session``). Unset (always, outside tests) a fail point costs one dictionary
lookup.

The fail points:

* ``client.end``: a client finished its local fit, before its update is accumulated and its state saved;
* ``store.write``: a disk client-store file was written under its temporary name, before the rename;
* ``checkpoint.write``: half of a checkpoint's bytes (or of a checkpoint's client-state file) are in its temporary
  file;
* ``checkpoint.clients``: a checkpoint's client-state file (memory / cpu store) is written, before the checkpoint
  that names it;
* ``round.end``: a round's server step is done, before the checkpoint (if any) is written.
"""

from __future__ import annotations

import os
import signal

ENV = "FEDLT_FAILPOINT"


def _parse(spec: str | None) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, count = item.strip().partition(":")
        points[name] = int(count or 1)
    return points


_POINTS = _parse(os.environ.get(ENV))
_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Counts a hit of ``name`` and dies on the configured one (a no-op unless ``FEDLT_FAILPOINT`` names it)."""
    if name not in _POINTS:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == _POINTS[name]:
        if os.environ.get(ENV + "_GROUP") == "1":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
