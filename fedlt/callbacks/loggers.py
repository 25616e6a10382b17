"""Fabric loggers: a CSV file in the run directory and Weights & Biases (online with credentials, otherwise
offline with a one-line hint on how to sync; never prompts, never blocks), plus the W&B run layout that makes runs
comparable in dashboards: flattened config, automatic tags, ``round`` as the step and a final summary."""

from __future__ import annotations

import csv
import json
import netrc
import os
import sys
from argparse import Namespace
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only


class CSVMetricsLogger(Logger):
    """Wide CSV (``metrics.csv``): one row per round, one column per metric key.

    The whole file is rewritten atomically at every call (a few hundred rows), so a new metric key simply adds a
    column, and a resumed run drops the rows after its checkpoint round.

    Args:
        run_dir: the run directory.
        resume_round: keep only rows with ``round <= resume_round`` of an existing file (``None``: start anew).
    """

    def __init__(self, run_dir: str | Path, resume_round: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: dict[int, dict[str, float]] = {}
        if resume_round is not None and self.path.exists():
            with self.path.open() as f:
                for row in csv.DictReader(f):
                    r = int(row.pop("round"))
                    if r <= resume_round:
                        self.rows[r] = {k: float(v) for k, v in row.items() if v != ""}

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters go to ``config.yaml`` in the run directory; nothing to do here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            raise ValueError("CSVMetricsLogger needs the round as step")
        self.rows.setdefault(int(step), {}).update({k: float(v) for k, v in metrics.items()})
        self._write()

    def _write(self) -> None:
        keys = sorted({k for row in self.rows.values() for k in row})
        tmp = self.path.with_suffix(".csv.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", *keys])
            for r in sorted(self.rows):
                writer.writerow([r, *(_fmt(self.rows[r].get(k)) for k in keys)])
        os.replace(tmp, self.path)


def _fmt(v: float | None) -> str:
    return "" if v is None else repr(v)


def wandb_credentials_available() -> bool:
    """True when W&B can log online without prompting: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` with credentials else ``offline``; ``WANDB_MODE`` in the environment wins."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env == "dryrun" else env
    if mode != "auto":
        return mode
    return "online" if wandb_credentials_available() else "offline"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level with dotted keys (``data.partition.init_args.alpha``), lists kept as values;
    an empty mapping adds no key.

    W&B dashboards filter, group and slice runs by config keys; dotted keys are the ones ``fedlt fit --a.b value``
    and ``fedlt sweep`` grids use, so a sweep's axes appear as config columns as they are written.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty mapping (no settings, e.g. model.init_args: {}) adds no key
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_tags(summary: Mapping[str, Any], method: str, seed: int, extra: Iterable[str] = ()) -> list[str]:
    """Automatic W&B tags of a run: dataset, imbalance factor, partition concentration, seed, method, then ``extra``.

    Args:
        summary: the federated split's summary (``source``, ``imbalance_factor``, ``partition``).
        method: the method's registry name.
        seed: the experiment seed.
        extra: the user's tags (``logging.tags``), appended; duplicates are dropped.

    Returns:
        e.g. ``["digits", "IF100", "alpha0.5", "seed0", "fedavg", ...]`` (no IF tag without a known imbalance
        factor, no concentration tag for a partition without ``alpha``/``beta``).
    """
    tags = [str(summary["source"])] if summary.get("source") else []
    imbalance = summary.get("imbalance_factor")
    if isinstance(imbalance, (int, float)):
        tags.append(f"IF{imbalance:g}")
    partition = summary.get("partition") or {}
    for key in ("alpha", "beta"):
        if isinstance(partition.get(key), (int, float)):
            tags.append(f"{key}{partition[key]:g}")
    tags += [f"seed{seed}", method, *extra]
    return [t[:64] for t in dict.fromkeys(tags)]  # W&B caps a tag at 64 characters


class WandbFabricLogger(Logger):
    """Weights & Biases as a Fabric logger (rank 0 only).

    Every logged row carries ``round``, which is the x axis of all metrics (``define_metric``), so resumed runs
    and runs of different lengths line up in dashboards.

    Args:
        run_dir: the run directory (W&B files go to ``<run_dir>/wandb``).
        project: W&B project.
        entity: W&B entity (team or user); ``None`` uses the default.
        name: run name shown in the W&B UI.
        tags: run tags.
        mode: ``auto``, ``online``, ``offline`` or ``disabled``.
        run_id: resume this W&B run (from a checkpoint).
        config: the run config (flattened, see :func:`flatten_config`).
        group: W&B group (the runs of one sweep share it).
        job_type: W&B job type (the method's registry name).
    """

    def __init__(self, run_dir: str | Path, project: str = "fedlt", entity: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, mode: str = "auto",
                 run_id: str | None = None, config: dict[str, Any] | None = None, group: str | None = None,
                 job_type: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.mode = resolve_wandb_mode(mode)
        self._kwargs = dict(project=project, entity=entity, name=name, tags=tags or None, config=config or {},
                            group=group, job_type=job_type)
        self._run_id = run_id
        self._run: Any = None

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str | None:
        return self._run_id

    @property
    def experiment(self) -> Any:
        """The ``wandb`` run, started on first use; ``None`` once W&B has disabled itself (it could not write)."""
        if self._run is None and self.mode != "disabled":
            try:
                self._start()
            except Exception as err:  # wandb and the file system raise many types; none may end the training
                # Never lose a run to W&B: metrics.csv has everything, so go on without it and say so once.
                print(f"fedlt: warning: W&B cannot log to {self.run_dir / 'wandb'} ({type(err).__name__}: {err}); "
                      "W&B is disabled for this run (metrics.csv and final.json still have every metric)",
                      file=sys.stderr, flush=True)
                self.mode = "disabled"
                self._run = None
        return self._run

    def _start(self) -> None:
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._run = self._init(wandb)
        except Exception as err:  # wandb raises its own error types for auth/network problems
            if self.mode != "online":
                raise
            # Never lose a run to the network: fall back to offline logging and say so.
            print(f"W&B online init failed ({type(err).__name__}: {err}); logging offline instead")
            self.mode = "offline"
            self._run = self._init(wandb)
        self._run_id = self._run.id
        if self.mode == "offline":
            sync_dir = Path(self._run.dir).parent
            if len(list(sync_dir.parent.glob("offline-run-*"))) > 1:
                sync_dir = sync_dir.parent / "offline-run-*"  # a resumed run: one folder per segment, in order
            print(f"W&B is offline (no credentials found); sync later with: wandb sync {sync_dir}")

    def _init(self, wandb: Any) -> Any:
        run = wandb.init(
            dir=str(self.run_dir), mode=self.mode, id=self._run_id, resume="allow" if self._run_id else None,
            settings=wandb.Settings(silent=True, console="off", init_timeout=60), **self._kwargs,
        )
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        return run

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        if self.experiment is not None:
            self.experiment.config.update(vars(params) if isinstance(params, Namespace) else params,
                                          allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Logs one round's row with ``round = step`` as its x value, and no explicit W&B step: W&B drops a row
        whose step is not above the last one it has, which is every round a resume after an unclean stop
        trains again; its own counter never goes back, and the dashboards plot against ``round``."""
        if self.experiment is not None:
            self.experiment.log(dict(metrics, round=step))

    @rank_zero_only
    def log_partition(self, summary: dict[str, Any]) -> None:
        """Logs the partition summary: a clients x classes table, the rest (partitioner, sizes) in the run summary."""
        import wandb

        if self.experiment is None:
            return
        counts = summary.get("client_class_counts", [])
        columns: list[str | int] = ["client", *(f"class_{c}" for c in range(len(counts[0]) if counts else 0))]
        table = wandb.Table(columns=columns, data=[[k, *row] for k, row in enumerate(counts)])
        self.experiment.log({"partition/client_class_counts": table})
        rest = {k: v for k, v in summary.items() if k != "client_class_counts"}  # the table holds those
        self.experiment.summary["partition"] = json.loads(json.dumps(rest, default=str))

    @rank_zero_only
    def log_final(self, report: dict[str, Any]) -> None:
        """Writes the final report into the run summary (what bar charts and run tables show).

        Keys: ``mean_last/<metric>`` (mean over the last ``last_n`` evaluated rounds, 10 by default),
        ``best/<metric>`` and ``best_round`` (the round of best GM accuracy), ``final/<metric>`` (last evaluated
        round), ``last_n``, and ``post_training/<metric>`` / ``val_selected/<metric>`` when the report has them.

        Args:
            report: :func:`fedlt.callbacks.report.final_report`'s dict (as written to ``final.json``).
        """
        if self.experiment is None:
            return
        summary = self.experiment.summary
        for part in ("mean_last", "best", "final", "post_training", "val_selected"):
            for key, value in (report.get(part) or {}).items():
                summary[f"{part}/{key}"] = value
        for key in ("best_round", "last_n", "val_selected_round"):
            if report.get(key) is not None:
                summary[key] = report[key]

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)
            self._run = None
