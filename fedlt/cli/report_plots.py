"""The PNG plots of ``fedlt report``: accuracy vs round, many/medium/few bars, per-client PM accuracy.

One panel per column setting of the table, one series per row (method). matplotlib's Agg canvas is used
directly, so no global backend is switched and no display is needed. Each plot function returns what it drew,
read back from the axes (the plotted points, bar heights, box medians), which ``summary.json`` records.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from fedlt.cli.report_runs import GROUPS, Cell, metric_label, reduce_series
from fedlt.cli.report_tables import describe_reduce

_GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}  # as fedlt.data.plot


def write_plots(summary: dict[str, Any], out: Path, title: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Writes ``accuracy_vs_round.png``, ``groups.png`` and ``pm_clients.png`` into ``out``.

    Returns:
        ({name: {"path": ..., "panels": [...]}} of the plots written, notes on the plots skipped).
    """
    plots, notes = {}, []
    for name, draw in (("accuracy_vs_round", _curves), ("groups", _groups), ("pm_clients", _pm_clients)):
        result = draw(summary, out / f"{name}.png", title)
        if isinstance(result, str):
            notes.append(f"{name}.png skipped: {result}")
        else:
            plots[name] = result
    return plots, notes


def _panels(summary: dict[str, Any]) -> list[tuple[str, dict[str, list]]]:
    """[(column label, {row label: [runs]})] in table order."""
    grouping, row_of, label_of = summary["_grouping"], summary["_row_of"], summary["_label_of"]
    out = []
    for col in grouping.columns:
        rows = {row_of[r]: grouping.members[(r, col)] for r in grouping.rows if (r, col) in grouping.members}
        out.append((label_of[col], rows))
    return out


def _figure(n: int, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Any, path: Path, title: str | None, panels: list[dict[str, Any]]) -> dict[str, Any]:
    if title:  # wrapped to the figure's width (about 11 characters an inch at this size), never clipped
        import textwrap

        fig.suptitle(textwrap.fill(title, width=max(40, int(fig.get_figwidth() * 11))), fontsize=11)
    fig.savefig(path, dpi=150)
    return {"path": str(path), "panels": panels}


def _title(given: str | None, what: str) -> str:
    """The figure's title: the report's ``--title`` with what the figure shows, or that alone."""
    return f"{given}: {what}" if given else what


def _ylabel(summary: dict[str, Any], metric: str) -> str:
    return metric_label(metric)


def _curve(runs: list, metric: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over runs per round (rounds where at least one run has a finite value)."""
    by_round: dict[int, list[float]] = {}
    for run in runs:
        for rnd, value in run.series.get(metric, []):
            if not math.isnan(value):
                by_round.setdefault(rnd, []).append(value)
    rounds = sorted(by_round)
    means = [statistics.fmean(by_round[r]) for r in rounds]
    stds = [statistics.stdev(by_round[r]) if len(by_round[r]) > 1 else 0.0 for r in rounds]
    return rounds, means, stds


def _curves(summary: dict[str, Any], path: Path, title: str | None) -> dict[str, Any] | str:
    from matplotlib.ticker import MaxNLocator

    metric, scale = summary["metric"], 100.0 if summary["percent"] else 1.0
    panels = _panels(summary)
    fig, axes = _figure(len(panels))
    described = []
    for ax, (label, rows) in zip(axes, panels):
        for row, runs in rows.items():
            rounds, means, stds = _curve(runs, metric)
            if not rounds:
                continue
            lo = [(m - s) * scale for m, s in zip(means, stds)]
            hi = [(m + s) * scale for m, s in zip(means, stds)]
            (line,) = ax.plot(rounds, [m * scale for m in means], marker="o" if len(rounds) < 30 else None,
                              markersize=3, label=f"{row} (n={len(runs)})")
            ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(label if len(panels) > 1 else "", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, title=summary["rows_key"], title_fontsize=8)
        series = {ln.get_label(): ln.get_xydata().tolist() for ln in ax.get_lines()}
        described.append({"title": label, "series": series})
    axes[0].set_ylabel(_ylabel(summary, metric))
    return _save(fig, path, _title(title, f"{metric_label(metric)} per round (mean ± std over seeds)"), described)


def group_stats(summary: dict[str, Any]) -> dict[str, Any]:
    """``{"metrics": [...], "cells": {column: {row: {many|medium|few: stats}}}}`` of ``<prefix>acc_<group>``
    (``test/personal/`` for a PM metric, else ``test/global/``) with the table's reduction."""
    prefix = "test/personal/" if summary["metric"].startswith("test/personal/") else "test/global/"
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label, rows in _panels(summary):
        for row, runs in rows.items():
            for group in GROUPS:
                cell = Cell()
                for run in runs:
                    value = reduce_series(run.series.get(f"{prefix}acc_{group}", []), summary["reduce"])
                    if value is not None:
                        cell.values.append(value)
                        cell.seeds.append(run.config.get("seed"))
                        cell.runs.append(str(run.path))
                if cell.values:
                    out.setdefault(label, {}).setdefault(row, {})[group] = cell.stats()
    return {"metrics": [f"{prefix}acc_{g}" for g in GROUPS], "cells": out}


def _groups(summary: dict[str, Any], path: Path, title: str | None) -> dict[str, Any] | str:
    stats = summary["groups"]["cells"]
    if not stats:
        return "no run has many/medium/few accuracies (test/global/acc_many etc.)"
    labels = [label for label, _ in _panels(summary) if label in stats]
    fig, axes = _figure(len(labels), width=max(5.0, 1.2 * len(summary["rows"]) + 2))
    described, width = [], 0.26
    for ax, label in zip(axes, labels):
        rows = list(stats[label])
        for i, group in enumerate(GROUPS):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            cells = [stats[label][r].get(group) for r in rows]
            heights = [100 * c["mean"] if c else 0.0 for c in cells]
            errs = [100 * c["std"] if c else 0.0 for c in cells]
            ax.bar(xs, heights, width, yerr=errs, capsize=2, color=_GROUP_COLOURS[group], label=group)
        ax.set_xticks(range(len(rows)), rows, rotation=30 if len(rows) > 4 else 0)
        ax.set_title(label if len(labels) > 1 else "", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        described.append({"title": label, "rows": rows, "bars": [round(p.get_height(), 6) for p in ax.patches]})
    scope = "PM" if summary["groups"]["metrics"][0].startswith("test/personal/") else "GM"
    axes[0].set_ylabel(f"{scope} accuracy per class group (%)")
    axes[0].legend(fontsize=8, title="classes", title_fontsize=8)
    fig.supxlabel(f"bars: mean over seeds of the {describe_reduce(summary['reduce'])}, whiskers: std", fontsize=8)
    return _save(fig, path, _title(title, f"{scope} many / medium / few-class accuracy"), described)


def _pm_clients(summary: dict[str, Any], path: Path, title: str | None) -> dict[str, Any] | str:
    data = [(label, {row: [100 * a for run in runs for a in (run.clients or [])] for row, runs in rows.items()})
            for label, rows in _panels(summary)]
    data = [(label, {r: v for r, v in rows.items() if v}) for label, rows in data]
    data = [(label, rows) for label, rows in data if rows]
    if not data:
        return "no run has clients.json (per-client PM accuracy; none without local test sets, e.g. domain data)"
    fig, axes = _figure(len(data), width=max(5.0, 0.9 * len(summary["rows"]) + 2))
    described = []
    for ax, (label, rows) in zip(axes, data):
        box = ax.boxplot(list(rows.values()), showmeans=True, widths=0.6, showfliers=False)
        for i, vals in enumerate(rows.values(), start=1):  # every client as a dot, spread deterministically
            xs = [i + 0.4 * ((j * 0.618) % 1 - 0.5) for j in range(len(vals))]
            ax.scatter(xs, vals, s=7, color="0.35", alpha=0.5, linewidths=0, zorder=3)
        ax.set_xticks(range(1, len(rows) + 1), list(rows), rotation=30 if len(rows) > 4 else 0)
        ax.set_title(label if len(data) > 1 else "", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        medians = [float(m.get_ydata()[0]) for m in box["medians"]]
        described.append({"title": label, "rows": list(rows), "medians": medians,
                          "num_clients": [len(v) for v in rows.values()]})
    axes[0].set_ylabel("PM accuracy of each client (%)")
    fig.supxlabel("box: quartiles, line: median, triangle: mean, dots: clients (all seeds)", fontsize=8)
    return _save(fig, path, _title(title, "per-client PM accuracy at the last evaluation"), described)
