"""A live progress bar over rounds: round, loss, last GM accuracy and ETA (rank 0 only)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


class ProgressBar:
    """tqdm over rounds. Disabled off rank 0 or when ``enabled`` is false.

    Args:
        total: total number of rounds.
        initial: rounds already done (resume).
        enabled: show the bar.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="rounds", unit="round", disable=not enabled,
                        file=sys.stdout, dynamic_ncols=True, leave=True)
        self.last_acc: float | None = None

    def update(self, round: int, metrics: dict[str, Any], keys: Iterable[str] = ()) -> None:
        """Advances to ``round``; shows the loss, the last accuracy and the metrics ``keys`` (``self.log(...,
        prog_bar=True)``)."""
        acc = metrics.get("test/global/acc", metrics.get("test/personal/acc_mean"))
        if acc is not None:
            self.last_acc = acc
        postfix = {"loss": f"{metrics.get('train/loss', float('nan')):.3f}"}
        if self.last_acc is not None:
            postfix["acc"] = f"{100 * self.last_acc:.1f}"
        for key in sorted(keys):
            if key in metrics:
                postfix[key.removeprefix("train/")] = f"{metrics[key]:.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
