"""Reading run directories for ``fedlt report``: runs, grouping, aggregation over seeds (offline, no W&B).

Every run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per round) and, once
finished, ``final.json`` (and ``clients.json``, the per-client PM accuracy of the last evaluation). Runs are
grouped by a row key (default: the method) and column keys (default: the config fields that vary between runs,
other than the seed, the run name/dir, logging and hardware settings, and fields fixed by the row such as a
method's own hyperparameters), and aggregated over seeds: mean, sample std (ddof 1; 0 for a single seed) and n.

A run's value is its metric reduced over the evaluated rounds (those where the metric is present):
``last10`` (default) the mean of the last 10 (the project's final-report convention), ``lastN`` the last N,
``last`` the last one, ``best`` the maximum.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlt.errors import ConfigError
from fedlt.provenance import build_id, read_environments

GROUPS = ("many", "medium", "few")
_IGNORED = {"name", "run_dir", "resume", "seed", "data.seed", "data.storage", "data.source.init_args.root"}
_IGNORED_PREFIXES = ("logging.", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                     "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.eval_batch_size",
                     "trainer.client_state")
_REDUCE = re.compile(r"^(best|last|last([1-9]\d*))$")


class ReportError(ConfigError):
    """Bad input to ``fedlt report`` (printed as ``fedlt: error: ...``, exit status 2)."""


@dataclass
class Run:
    """One run directory: flattened config, metric series and per-client PM accuracies."""

    path: Path
    config: dict[str, Any]
    series: dict[str, list[tuple[int, float]]]
    clients: list[float] | None = None
    finished: bool = True
    environments: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Cell:
    """The runs of one (row, column) setting, aggregated over seeds."""

    values: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the evaluated rounds each run's value reduces

    def stats(self) -> dict[str, Any]:
        """``mean``, ``std`` (sample, 0 for one value), ``n``, the rounds each value reduces and the inputs."""
        n = len(self.values)
        std = statistics.stdev(self.values) if n > 1 else 0.0
        return {"mean": statistics.fmean(self.values), "std": std, "n": n, "seeds": self.seeds,
                "values": self.values, "runs": self.runs, "rounds": self.rounds}


# -- reading -----------------------------------------------------------------------------------------------
def find_runs(inputs: Sequence[str | Path]) -> list[Path]:
    """Run directories (``config.yaml`` + ``metrics.csv``) at or below each input, sorted, without duplicates."""
    found: dict[Path, None] = {}
    for inp in inputs:
        root = Path(inp)
        if not root.is_dir():
            raise ReportError(f"{inp}: no such directory")
        for cfg in sorted(root.rglob("config.yaml")):
            if (cfg.parent / "metrics.csv").is_file():
                found.setdefault(cfg.parent.resolve(), None)
    if not found:
        raise ReportError(f"no run directories (config.yaml + metrics.csv) under {', '.join(map(str, inputs))}")
    return list(found)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: leaf}``; lists become tuples (hashable)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def load_run(path: Path) -> Run:
    """Reads one run directory."""
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{path / 'config.yaml'}: not valid YAML ({err})") from err
    series: dict[str, list[tuple[int, float]]] = {}
    with (path / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            rnd = int(row.pop("round"))
            for key, value in row.items():
                if value not in ("", None):
                    series.setdefault(key, []).append((rnd, float(value)))
    clients = None
    if (path / "clients.json").is_file():
        clients = [a for a in json.loads((path / "clients.json").read_text()).get("acc", []) if a is not None]
    return Run(path, flatten(config if isinstance(config, dict) else {}), series, clients,
               (path / "final.json").is_file(), read_environments(path))


def method_name(config: dict[str, Any]) -> str:
    """The method's class name (``fedlt.methods.FedAvg`` -> ``FedAvg``), or its registry name."""
    value = config.get("method.class_path", config.get("method"))
    return str(value).rsplit(".", 1)[-1] if value is not None else "?"


def row_value(run: Run, key: str) -> Any:
    """A run's value of a row or column key: the method for ``method``, else the config value of ``key``."""
    return method_name(run.config) if key == "method" else run.config.get(key)


# -- grouping ----------------------------------------------------------------------------------------------
def _ignored(key: str) -> bool:
    return key in _IGNORED or key.startswith(_IGNORED_PREFIXES) or key == "method" or key.startswith("method.class")


def varying_keys(runs: Sequence[Run], row_key: str) -> list[str]:
    """Config keys whose value differs between runs, skipping ignored keys and keys fixed by the row."""
    keys = sorted({k for r in runs for k in r.config})
    out = []
    for key in keys:
        if _ignored(key) or key == row_key or len({_h(r.config.get(key)) for r in runs}) < 2:
            continue
        per_row: dict[Any, set] = {}
        for r in runs:
            per_row.setdefault(_h(row_value(r, row_key)), set()).add(_h(r.config.get(key)))
        if any(len(v) > 1 for v in per_row.values()):  # varies inside a row: a setting, not a row attribute
            out.append(key)
    return out


def _h(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list, tuple)) else value


def _sort_key(value: Any) -> tuple:
    if isinstance(value, tuple):
        return tuple(_sort_key(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def format_value(value: Any) -> str:
    """A config value for a label: ``20.0`` -> ``20``, ``0.5`` -> ``0.5``, lists as JSON."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


def column_labels(keys: Sequence[str], values: Sequence[tuple], metric: str) -> list[str]:
    """``alpha=0.5, imbalance_factor=100`` per column (the shortest unique key suffixes); the metric if none."""
    if not keys:
        return [metric for _ in values]
    short = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k == name or k.endswith("." + name) for k in keys) == 1:
                break
        short.append(name)
    return [", ".join(f"{s}={format_value(v)}" for s, v in zip(short, vals)) for vals in values]


def reduce_series(points: Sequence[tuple[int, float]], mode: str, higher: bool = True) -> float | None:
    """A run's value from its (round, value) points: ``lastN`` mean, ``last`` or ``best`` (NaNs skipped); ``best``
    is the maximum, or the minimum when lower is better (``higher=False``: losses, timings)."""
    m = _REDUCE.match(mode)
    if m is None:
        raise ReportError(f"--reduce {mode!r}: expected last10 (or lastN), last or best")
    if mode == "last":
        return points[-1][1] if points and not math.isnan(points[-1][1]) else None
    vals = [v for _, v in (points if mode == "best" else points[-int(m.group(2)):]) if not math.isnan(v)]
    if not vals:
        return None
    if mode == "best":
        return max(vals) if higher else min(vals)
    return statistics.fmean(vals)


def rounds_used(points: Sequence[tuple[int, float]], mode: str) -> int:
    """How many evaluated rounds :func:`reduce_series` reduces (``lastN`` with fewer evaluations: all of them)."""
    finite = [p for p in points if not math.isnan(p[1])]
    if mode in ("last", "best"):
        return min(len(finite), 1) if mode == "last" else len(finite)
    m = _REDUCE.match(mode)
    return len([p for p in points[-int(m.group(2)):] if not math.isnan(p[1])]) if m else 0


_SCOPES = (("test/global/", "GM"), ("test/personal/", "PM"), ("val/global/", "validation GM"),
           ("val/personal/", "validation PM"), ("val/", "validation"), ("train/", "train"), ("time/", "time"))
_WORDS = {"acc": "accuracy", "acc_mean": "mean accuracy over clients", "acc_std": "accuracy std over clients",
          "acc_many": "many-class accuracy", "acc_medium": "medium-class accuracy", "acc_few": "few-class accuracy",
          "acc_worst10": "accuracy of the worst 10% clients", "acc_worst_class": "worst-class accuracy",
          "acc_worst_class_mean": "worst-class accuracy (mean over clients)", "loss": "loss",
          "round_s": "seconds per round", "balancedness": "balancedness"}


def metric_label(metric: str) -> str:
    """A metric key in words with its unit: ``test/global/acc`` -> ``GM accuracy (%)``,
    ``test/personal/acc_few`` -> ``PM few-class accuracy (%)``, ``time/round_s`` -> ``time: seconds per round``."""
    scope, rest = "", metric
    if metric.startswith("test/domain/") and metric.count("/") >= 3:  # test/domain/<name>/acc
        _, _, name, rest = metric.split("/", 3)
        scope = f"{name} domain"
    else:
        for prefix, words in _SCOPES:
            if metric.startswith(prefix):
                scope, rest = words, metric[len(prefix):]
                break
    words = _WORDS.get(rest, rest.replace("_", " "))
    text = f"{scope}: {words}" if scope in ("train", "time") else f"{scope} {words}".strip()
    return f"{text} (%)" if is_percent(metric) else text


@dataclass
class Grouping:
    """Runs grouped by row value and column values."""

    row_key: str
    column_keys: list[str]
    rows: list[Any]
    columns: list[tuple]
    members: dict[tuple[Any, tuple], list[Run]]


def group_runs(runs: Sequence[Run], row_key: str, column_keys: Sequence[str]) -> Grouping:
    """Groups runs by (row value, column values), rows and columns sorted (numbers numerically)."""
    members: dict[tuple[Any, tuple], list[Run]] = {}
    for run in runs:
        col = tuple(row_value(run, k) for k in column_keys)
        members.setdefault((row_value(run, row_key), col), []).append(run)
    rows = sorted({r for r, _ in members}, key=lambda v: _sort_key(_h(v)))
    cols = sorted({c for _, c in members}, key=lambda v: _sort_key(tuple(_h(x) for x in v)))
    return Grouping(row_key, list(column_keys), rows, cols, members)


def aggregate(grouping: Grouping, metric: str, mode: str) -> dict[tuple[Any, tuple], Cell]:
    """One :class:`Cell` per (row, column) with the reduced metric of each run that has it."""
    cells: dict[tuple[Any, tuple], Cell] = {}
    for key, runs in grouping.members.items():
        cell = Cell()
        for run in runs:
            points = run.series.get(metric, [])
            value = reduce_series(points, mode, higher_is_better(metric))
            if value is not None:
                cell.values.append(value)
                cell.seeds.append(run.config.get("seed"))
                cell.runs.append(str(run.path))
                cell.rounds.append(rounds_used(points, mode))
        if cell.values:
            cells[key] = cell
    return cells


def check_keys(runs: Sequence[Run], metric: str, row_key: str, column_keys: Sequence[str]) -> None:
    """Raises :class:`ReportError` for a metric or config key that no run has."""
    metrics = sorted({k for r in runs for k in r.series})
    if metric not in metrics:
        close = difflib.get_close_matches(metric, metrics, n=5, cutoff=0.4) or metrics[:8]
        raise ReportError(f"unknown metric {metric!r} (not in any metrics.csv); e.g. {', '.join(close)}")
    keys = sorted({k for r in runs for k in r.config})
    for opt, key in [("--rows", row_key), *(("--columns", k) for k in column_keys)]:
        if key != "method" and key not in keys:
            close = difflib.get_close_matches(key, keys, n=5, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else " (dotted keys of config.yaml, e.g. seed)"
            raise ReportError(f"{opt}: unknown config key {key!r}{hint}")


# -- tables ------------------------------------------------------------------------------------------------
def is_percent(metric: str) -> bool:
    """Evaluation metrics (``test/``, ``val/``) are fractions shown in %."""
    return metric.startswith(("test/", "val/")) and not metric.endswith("num_clients")


def higher_is_better(metric: str) -> bool:
    """False for losses, timings and spreads (std)."""
    return not ("loss" in metric or metric.startswith("time/") or "std" in metric.rsplit("/", 1)[-1])


# -- summary -----------------------------------------------------------------------------------------------
def summarize(runs: Sequence[Run], metric: str, mode: str, row_key: str, column_keys: Sequence[str]) -> dict:
    """The report's numbers: per-cell statistics of ``metric``, the best row per column and the groups."""
    grouping = group_runs(runs, row_key, column_keys)
    labels = column_labels(column_keys, grouping.columns, metric)
    label_of = dict(zip(grouping.columns, labels))
    rows = [str(r) if row_key == "method" else format_value(r) for r in grouping.rows]
    row_of = dict(zip(grouping.rows, rows))
    cells: dict[str, dict[str, Any]] = {}
    for (row, col), cell in aggregate(grouping, metric, mode).items():
        cells.setdefault(row_of[row], {})[label_of[col]] = cell.stats()
    sign = 1.0 if higher_is_better(metric) else -1.0
    best = {}
    for label in labels:
        means = {r: c[label]["mean"] for r, c in cells.items() if label in c}
        top = max((sign * m for m in means.values()), default=None)
        best[label] = [r for r, m in means.items() if top is not None and sign * m >= top - 1e-12]
    used = [n for row in cells.values() for c in row.values() for n in c["rounds"]]
    return {"metric": metric, "metric_label": metric_label(metric), "reduce": mode,
            "rounds_used": [min(used, default=0), max(used, default=0)], "rows_key": row_key,
            "column_keys": list(column_keys),
            "percent": is_percent(metric), "higher_is_better": sign > 0, "std": "sample (ddof=1), 0 for n=1",
            "rows": rows, "columns": labels, "cells": cells, "best": best,
            "column_values": {label_of[c]: dict(zip(column_keys, c)) for c in grouping.columns},
            "_grouping": grouping, "_row_of": row_of, "_label_of": label_of}


# -- provenance --------------------------------------------------------------------------------------------
def software(runs: Sequence[Run]) -> dict[str, Any]:
    """The builds behind a table: for each of fedlt (commit, or version outside a checkout) and torch, which
    version trained which runs (every environment of a run counts: a run resumed under another build is listed
    under both), the runs without an environment record, and one warning per field with more than one value."""
    by_field: dict[str, dict[str, list[str]]] = {"fedlt": {}, "torch": {}}
    unrecorded = []
    for run in runs:
        if not run.environments:
            unrecorded.append(str(run.path))
        for env in run.environments:
            for key, value in build_id(env).items():
                names = by_field[key].setdefault(value, [])
                if str(run.path) not in names:
                    names.append(str(run.path))
    warnings = []
    for key, versions in by_field.items():
        if len(versions) > 1:
            parts = "; ".join(f"{key} {v}: {', '.join(names)}" for v, names in sorted(versions.items()))
            warnings.append(f"the cells of this table come from different {key} builds ({parts})")
    return {"versions": by_field, "unrecorded": unrecorded, "warnings": warnings}


def software_line(info: dict[str, Any]) -> str:
    """``Software: fedlt 1a2b3c4d5e6f, torch 2.14.1`` (several versions joined by ``|``) for the table's foot."""
    parts = [f"{key} {' | '.join(sorted(v))}" for key, v in info["versions"].items() if v]
    text = "Software: " + (", ".join(parts) if parts else "not recorded")
    if info["unrecorded"] and parts:
        text += f" ({len(info['unrecorded'])} run(s) without an environment record)"
    return text


# -- command -----------------------------------------------------------------------------------------------
