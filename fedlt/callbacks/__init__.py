"""Loggers (CSV, W&B), the progress bar and the final report.

The names are imported on first use (PEP 562): the loggers need lightning, which the report and the CLI's
help and error paths do not.
"""

from __future__ import annotations

from fedlt._lazy import lazy_names

_NAMES = {"CSVMetricsLogger": "loggers", "WandbFabricLogger": "loggers", "resolve_wandb_mode": "loggers",
          "ProgressBar": "progress", "final_report": "report", "format_table": "report"}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_names(__name__, _NAMES, globals())
