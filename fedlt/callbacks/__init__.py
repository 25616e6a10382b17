"""Loggers (CSV, W&B), the progress bar and the final report.

The names are imported on first use (PEP 562): the loggers need lightning, which the report and the CLI's
help and error paths do not.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"CSVMetricsLogger": "loggers", "WandbFabricLogger": "loggers", "resolve_wandb_mode": "loggers",
          "ProgressBar": "progress", "final_report": "report", "format_table": "report"}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
