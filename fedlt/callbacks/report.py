"""Metric history, the final report (mean of the last N evaluated rounds and the best round) and its table."""

from __future__ import annotations

import math
from typing import Any

HEADLINE = (
    ("GM acc", "test/global/acc"),
    ("GM many", "test/global/acc_many"),
    ("GM medium", "test/global/acc_medium"),
    ("GM few", "test/global/acc_few"),
    ("GM worst class", "test/global/acc_worst_class"),
    ("PM mean", "test/personal/acc_mean"),
    ("PM worst 10%", "test/personal/acc_worst10"),
    ("PM worst class", "test/personal/acc_worst_class_mean"),  # balancedness (a), per client then averaged
    ("PM few", "test/personal/acc_few"),
)


_EVAL = ("test/", "val/")  # evaluation metrics (the rest of a round's metrics are training losses and timings)


def final_report(history: dict[int, dict[str, float]], last: int = 10) -> dict[str, Any]:
    """Summarises the evaluated rounds of ``history`` (round -> metrics).

    Returns:
        ``{"rounds": [...], "last_n": n, "mean_last": {key: mean over the last n evaluated rounds},
        "final": {key: value at the last evaluated round}, "best_round": r, "best": {key: value at r}}`` where
        the best round maximises GM accuracy (PM mean accuracy for methods without a global model). With
        source-domain validation metrics (multi-domain data), ``val_selected_round`` / ``val_selected`` hold the
        latest round of best ``val/acc`` (training-domain validation model selection).
    """
    evaluated = sorted(r for r, m in history.items() if any(k.startswith(_EVAL) for k in m))
    if not evaluated:
        return {"rounds": [], "last_n": 0, "mean_last": {}, "final": {}, "best_round": None, "best": {}}
    tail = evaluated[-last:]
    keys = sorted({k for r in tail for k in history[r] if k.startswith(_EVAL)})
    mean_last = {}
    for k in keys:
        vals = [history[r][k] for r in tail if k in history[r] and not math.isnan(history[r][k])]
        mean_last[k] = sum(vals) / len(vals) if vals else float("nan")
    target = "test/global/acc" if any("test/global/acc" in history[r] for r in evaluated) else "test/personal/acc_mean"
    best = max(evaluated, key=lambda r: (history[r].get(target, float("-inf")), -r))
    test_only = lambda m: {k: v for k, v in m.items() if k.startswith(_EVAL)}  # noqa: E731
    out = {
        "rounds": evaluated,
        "last_n": len(tail),
        "mean_last": mean_last,
        "final": test_only(history[evaluated[-1]]),
        "best_round": best,
        "best": test_only(history[best]),
    }
    if any("val/acc" in history[r] for r in evaluated):
        # Training-domain validation (DomainBed): the round with the best source-domain validation accuracy.
        sel = max(evaluated, key=lambda r: (history[r].get("val/acc", float("-inf")), r))
        out["val_selected_round"] = sel
        out["val_selected"] = test_only(history[sel])
    return out


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics (percentages)."""
    if not report["rounds"]:
        return "no evaluated round"
    n = report["last_n"]
    domains = [(f"target {k.split('/')[2]}", k) for k in report["mean_last"] if k.startswith("test/domain/")]
    domains += [(f"val {k.split('/')[2]}", k) for k in report["mean_last"] if k.startswith("val/domain/")]
    rows = [(label, key) for label, key in (*HEADLINE, *domains, ("val (sources)", "val/acc"))
            if key in report["mean_last"]]
    width = max([16] + [len(label) + 2 for label, _ in rows])
    head = f"{'metric':<{width}}{'last round':>12}{f'mean last {n}':>14}{'best round':>12}"
    lines = [head, "-" * len(head)]
    for label, key in rows:
        vals = (report["final"].get(key), report["mean_last"].get(key), report["best"].get(key))
        lines.append(f"{label:<{width}}" + "".join(f"{_pct(v):>{w}}" for v, w in zip(vals, (12, 14, 12))))
    lines.append(f"(evaluated rounds: {len(report['rounds'])}; best round: {report['best_round']})")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}"


def domain_summary(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Leave-one-domain-out summary: each target's accuracy (mean of the last evaluated rounds, last round, and the
    round chosen by source-domain validation) and the mean over targets (docs/reference.md 1.8).

    Args:
        reports: target domain name -> :func:`final_report` of the run that held it out.

    Returns:
        ``{"targets": {name: {"mean_last", "final", "val_selected"}}, "mean": {...}}`` (fractions).
    """
    targets: dict[str, dict[str, float]] = {}
    for name, rep in reports.items():
        key = f"test/domain/{name}/acc"
        targets[name] = {
            "mean_last": rep["mean_last"].get(key, float("nan")),
            "final": rep["final"].get(key, float("nan")),
            "val_selected": rep.get("val_selected", {}).get(key, float("nan")),
        }
    cols = ("mean_last", "final", "val_selected")
    mean = {c: sum(t[c] for t in targets.values()) / max(len(targets), 1) for c in cols}
    return {"targets": targets, "mean": mean}


def format_domain_table(summary: dict[str, Any]) -> str:
    """Plain-text table of :func:`domain_summary` (percentages)."""
    rows = [*summary["targets"].items(), ("mean", summary["mean"])]
    width = max(len(name) for name, _ in rows) + 2
    head = f"{'target domain':<{max(width, 15)}}{'mean last':>12}{'last round':>12}{'val-selected':>14}"
    lines = [head, "-" * len(head)]
    for name, v in rows:
        lines.append(f"{name:<{max(width, 15)}}{_pct(v['mean_last']):>12}{_pct(v['final']):>12}"
                     f"{_pct(v['val_selected']):>14}")
    return "\n".join(lines)
