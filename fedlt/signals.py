"""SIGTERM / SIGUSR1 -> a flag that the round loop checks at round boundaries (checkpoint, then exit status 3).

Standard library only, so that the command line installs it before its slow imports (torch, Lightning): from the
moment ``fedlt fit`` starts, a preemption signal never kills it with the default action.
"""

from __future__ import annotations

import signal
from typing import Any


class PreemptionFlag:
    """Installs SIGTERM/SIGUSR1 handlers that only set a flag; the round loop checks it at round boundaries,
    writes a checkpoint and exits cleanly (SLURM sends SIGUSR1 before the time limit with ``--signal``)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def install(self) -> PreemptionFlag:
        """Takes over SIGTERM/SIGUSR1 until :meth:`uninstall`. Nested flags chain: a signal that an outer flag
        (the command line's, installed before the slow imports) already caught counts for this one too."""
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                previous = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread (e.g. under some test runners): no handler
                continue
            self._previous[sig] = previous
            outer = getattr(previous, "__self__", None)
            if isinstance(outer, PreemptionFlag) and outer.signum is not None and self.signum is None:
                self.signum = outer.signum
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before :meth:`install` (and passes a caught signal outwards)."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
            outer = getattr(prev, "__self__", None)
            if isinstance(outer, PreemptionFlag) and self.signum is not None and outer.signum is None:
                outer.signum = self.signum
        self._previous.clear()
