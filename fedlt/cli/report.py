"""``fedlt report``: tables (Markdown, LaTeX, CSV) and plots of run directories, offline (no W&B).

:mod:`fedlt.cli.report_runs` reads the run directories and aggregates them over seeds (its docstring describes the
grouping and the ``--reduce`` modes); :mod:`~fedlt.cli.report_tables` and :mod:`~fedlt.cli.report_plots` draw them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedlt.cli.errors import usage_error
from fedlt.cli.report_runs import (
    ReportError,
    Run,
    check_keys,
    find_runs,
    load_run,
    reduce_series,
    software,
    software_line,
    summarize,
    varying_keys,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ReportError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlt report`` options."""
    p = _Parser(prog="fedlt report", description="tables (markdown, LaTeX) and plots of run directories, offline")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run directories, or folders holding them")
    p.add_argument("--metric", default="test/global/acc", help="metrics.csv column (default test/global/acc)")
    p.add_argument("--rows", default="method", help="row key: method (default) or a dotted config key")
    p.add_argument("--columns", default=None,
                   help="comma-separated dotted config keys (default: the varying ones; 'none': one column)")
    p.add_argument("--reduce", default="last10", help="last10 (default; lastN: mean of the last N rounds), last, best")
    p.add_argument("--out", default=None, help="output folder (default <first input>/report)")
    p.add_argument("--title", default=None, help="title of the tables and plots")
    p.add_argument("--unfinished", action="store_true", help="include runs without final.json")
    return p


def cmd_report(argv: Sequence[str]) -> int:
    """``fedlt report``: prints the markdown table and the paths written; bad input -> exit status 2."""
    try:
        args = build_parser().parse_args(list(argv))
        return _report(args)
    except ReportError as err:
        return usage_error(str(err))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)


def _final_report(path: Path) -> dict[str, Any]:
    """The run's final.json, or {} when it is missing or unreadable (a run being written)."""
    try:
        report = json.loads((path / "final.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _select_runs(args: argparse.Namespace) -> tuple[list[Run], list[str]]:
    runs = [load_run(p) for p in find_runs(args.inputs)]
    notes = []
    if not args.unfinished:
        unfinished = [r for r in runs if not r.finished]
        if unfinished:
            notes.append(f"not in the table: {len(unfinished)} unfinished run(s) without final.json (--unfinished "
                         f"keeps them): {', '.join(sorted(r.path.name for r in unfinished))}")
        runs = [r for r in runs if r.finished]
    notes += _sweep_runs_not_run(args.inputs, {r.path.resolve() for r in runs})
    if not runs:
        raise ReportError("no finished run (final.json) found; --unfinished reports runs in progress")
    post = [r for r in runs if r.finished and "post_training" in _final_report(r.path)]
    if post:
        # FedLoGe's realignment, FedPuReL's post-hoc Stage 2, ...: evaluated once after training, not per round.
        notes.append(f"{len(post)} run(s) have a post-training evaluation (final.json 'post_training', e.g. "
                     "FedLoGe's realignment) that the per-round metrics of this report do not include; "
                     "pm_clients.png shows the post-training models of those runs")
    return runs, notes


def _sweep_runs_not_run(inputs: Sequence[str], reported: set[Path]) -> list[str]:
    """For every input that is a sweep directory (``sweep.json``): its runs that never started (pending) and those
    that started but have no complete result (interrupted: failed, preempted or still running)."""
    from fedlt.cli.sweep import SPEC, load_spec, run_status

    notes = []
    for inp in inputs:
        d = Path(inp)
        if not (d / SPEC).is_file():
            continue
        by_status: dict[str, list[str]] = {}
        for run in load_spec(d)["runs"]:
            if (d / "runs" / run["name"]).resolve() not in reported:
                by_status.setdefault(run_status(d, run), []).append(run["name"])
        for status, words in (("pending", "never started"),
                              ("interrupted", "started, no result: failed, preempted or still running"),
                              ("finished", "finished but not reported")):
            if by_status.get(status):
                names = by_status[status]
                notes.append(f"sweep {d}: {len(names)} run(s) {status} ({words}): {', '.join(names)}")
    return notes


def _report(args: argparse.Namespace) -> int:
    from fedlt.cli.report_plots import group_stats, write_plots
    from fedlt.cli.report_tables import build_table, csv_text, latex, markdown, tex_escape

    reduce_series([], args.reduce)  # validates --reduce before reading anything
    runs, notes = _select_runs(args)
    columns = args.columns
    if columns is None:
        column_keys = varying_keys(runs, args.rows)
    else:
        column_keys = [] if columns.strip() in ("", "none") else [k.strip() for k in columns.split(",") if k.strip()]
    check_keys(runs, args.metric, args.rows, column_keys)
    summary = summarize(runs, args.metric, args.reduce, args.rows, column_keys)
    if not summary["cells"]:
        raise ReportError(f"no run has a value of {args.metric} (all rounds empty or NaN)")
    out = Path(args.out) if args.out else Path(args.inputs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(summary)
    builds = software(runs)
    md = markdown(table, args.title) + f"\n{software_line(builds)}\n"
    (out / "table.tex").write_text(latex(table, args.title) + f"% {tex_escape(software_line(builds))}\n")
    (out / "table.csv").write_text(csv_text(summary))
    summary["groups"] = group_stats(summary)
    plots, plot_notes = write_plots(summary, out, args.title)
    notes += plot_notes
    if notes:  # the runs left out, the plots skipped: a reader of table.md sees them too
        md += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (out / "table.md").write_text(md)
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    public.update(num_runs=len(runs), plots=plots, notes=notes, software=builds)
    (out / "summary.json").write_text(json.dumps(public, indent=1, default=str))
    print(md)
    for warning in builds["warnings"]:
        print(f"fedlt: warning: {warning}", file=sys.stderr)
    written = ("table.md", "table.tex", "table.csv", "summary.json", *(Path(p["path"]).name for p in plots.values()))
    for name in written:
        print(f"wrote {out / name}")
    return 0
