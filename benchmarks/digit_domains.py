"""Federated domain generalization on the embedded digit_domains (issue 5): FedAvg, FedSAM, FedDG-GA, FedTAIL and
FedTAIL ablations, leave-one-domain-out over all four targets, several seeds.

Every row runs ``configs/fedtail_digit_domains.yaml`` (layout (i): one client per source domain, IF 10, 20 rounds of
2 local epochs, evaluated every 2 rounds) with ``--data.target_domain all``. The main table reports, per target
domain, the mean +- std over seeds of each run's mean target accuracy over the evaluations of the second half of
training (rounds 12-20), and the mean over the targets; a second table gives the target mean at the last round, at
the round selected by source-domain validation, and over the whole run (``mean_last`` of ``final.json``: with 10
evaluations that is every evaluated round, which rewards fast starters), plus the few-class accuracy.

    python benchmarks/digit_domains.py                                  # every row, seeds 0 1 2, 2 parallel jobs
    python benchmarks/digit_domains.py --rows fedavg fedtail --seeds 0

Finished runs (``domains.json`` present) are reused, so an interrupted sweep continues where it stopped. Every
finished run's numbers are also recorded in ``benchmarks/results/digit_domains.json`` (with the fedlt commit that made
them); a row and seed found there is not re-run (``--rerun`` forces it), so a sweep can be spread over machines or
sessions by committing that file, and the table is rebuilt from it (a row shows the seeds recorded so far).
``--keep`` copies the lines of rows without records from the existing table (marked "(kept)"): for rows whose
method and config did not change since that table was made (never the FedTAIL rows), so only the changed rows need
to be re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fedtail_digit_domains.yaml"
DOMAINS = ["plain", "textured", "inverted", "thick"]
NOTES = "## Notes"
# FedAvg-family local training (FedTAIL's config halves the learning rate: its objective has two CE-scale terms).
LOCAL = ["--method.init_args.lr", "0.03", "--method.init_args.momentum", "0.9",
         "--method.init_args.weight_decay", "0.0005", "--method.init_args.local_epochs", "2",
         "--method.init_args.batch_size", "32"]


def _method(name: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "method" / f"{name}.yaml"), *LOCAL]


ROWS: dict[str, tuple[str, list[str]]] = {
    "fedavg": ("FedAvg", _method("fedavg")),
    "fedavg-lr015": ("FedAvg at FedTAIL's lr 0.015", [*_method("fedavg"), "--method.init_args.lr", "0.015"]),
    "fedsam": ("FedSAM (rho 0.05)", _method("fedsam")),
    "feddgga": ("FedDG-GA (step 0.2)", _method("feddgga")),
    "fedtail": ("FedTAIL (every component)", []),
    "fedtail-no-csam": ("FedTAIL without class-wise SAM", ["--method.init_args.class_sam", "false"]),
    "fedtail-no-er": ("FedTAIL without sharp-ER", ["--method.init_args.er_weight", "0"]),
    "fedtail-uniform": ("FedTAIL, gamma_c = 1 (no curvature)", ["--method.init_args.gamma_delta", "1e9"]),
    "fedtail-no-adv": ("FedTAIL without the adversarial term (nor coherence)",
                       ["--method.init_args.adversarial", "off"]),
    "fedtail-no-coh": ("FedTAIL without gradient coherence", ["--method.init_args.coherence_alpha", "0"]),
    "fedtail-momentum": ("FedTAIL, Q_T = momentum teacher", ["--method.init_args.qt", "momentum_teacher"]),
    "fedavg-central": ("FedAvg, centralized (1 client)", [*_method("fedavg"), "--data.domain_layout", "centralized"]),
    "dgviaer-central": ("DGviaER, centralized (1 client)",
                        [*_method("dgviaer"), "--data.domain_layout", "centralized"]),
}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def record(run_dir: Path, domains: dict) -> dict:
    """The numbers the tables need from one finished run over all four targets."""
    return {
        "second_half": {t: second_half(run_dir, t) for t in DOMAINS},
        "few": sum(second_half(run_dir, t, "test/global/acc_few") for t in DOMAINS) / len(DOMAINS),
        **{k: domains["mean"][k] for k in ("final", "val_selected", "mean_last")},
        "commit": _commit(),
    }


def run_one(row: str, seed: int, root: Path) -> dict:
    """Runs (or reuses) one row and seed over all four targets; returns its :func:`record`."""
    run_dir = root / f"{row}-s{seed}"
    out = run_dir / "domains.json"
    if not out.exists():
        args = [sys.executable, "-m", "fedlt", "fit", "--config", str(CONFIG), *ROWS[row][1],
                "--data.target_domain", "all", "--seed", str(seed), "--name", f"{row}-s{seed}",
                "--run_dir", str(run_dir), "--logging.wandb", "false", "--logging.progress_bar", "false",
                "--resume", "auto"]
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        # A diverged run (fedlt's "non-finite training loss" exit, or an exploding update) is a result, not a failure
        # of the benchmark.
        if proc.returncode == 2 and ("diverged" in proc.stderr or "non-finite" in proc.stderr):
            print(f"{row} seed {seed}: diverged ({diverged_where(run_dir)})", flush=True)
            return {"diverged": diverged_where(run_dir), "commit": _commit()}
        if proc.returncode != 0:
            raise SystemExit(f"{row} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        print(f"{row} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return record(run_dir, json.loads(out.read_text()))


def diverged_where(run_dir: Path) -> str:
    """``"<target>, round <r>"``: the first target without a final report and the round after its last logged one."""
    for target in DOMAINS:
        if not (run_dir / target / "final.json").exists():
            with open(run_dir / target / "metrics.csv") as f:
                last = max((int(r["round"]) for r in csv.DictReader(f)), default=0)
            return f"{target}, round {last + 1}"
    return "unknown"


def _cell(values: list[float]) -> str:
    if not values:
        return "diverged"
    if len(values) > 1:
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{100 * values[0]:.1f}"


def second_half(run_dir: Path, target: str, key: str = "test/domain/{t}/acc") -> float:
    """Mean of ``key`` over the evaluated rounds of the second half of training of one target's run."""
    with open(run_dir / target / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key.format(t=target))]
    last = max(int(r["round"]) for r in rows)
    vals = [float(r[key.format(t=target)]) for r in rows if int(r["round"]) > last // 2]
    return sum(vals) / len(vals)


def kept_lines(old: str, row: str) -> list[str]:
    """The (main table, second table) lines of ``row`` in an existing results file, marked as kept (a file from
    before the ``n`` column gets its seed count from its header)."""
    label = ROWS[row][0]
    found = [line for line in old.splitlines() if line.startswith((f"| {label} |", f"| {label} (kept) |"))]
    if len(found) != 2:
        raise SystemExit(f"--keep: {label!r} is not in both tables of the existing results")
    header = old[old.index("seeds [") + 7 :]
    n = len(header[: header.index("]")].split(","))
    out = []
    for line, cells in zip(found, (len(DOMAINS) + 3, 6)):
        line = line.replace(f"| {label} |", f"| {label} (kept) |", 1)
        if line.count("|") - 1 == cells - 1:  # no n column yet
            line = line.replace(" (kept) |", f" (kept) | {n} |", 1)
        out.append(line)
    return out


def table(results: dict[str, dict[str, dict]], seeds: list[int], command: str, notes: str,
          kept: dict[str, list[str]] | None = None) -> str:
    """``results[row][seed]``: the :func:`record` of each run."""
    kept = kept or {}
    lines = [
        "# Federated domain generalization on embedded digit_domains",
        "",
        f"Leave-one-domain-out over the four synthetic domains, one client per source domain, seeds {seeds} "
        "(column n: the seeds a row has so far), "
        "config `configs/fedtail_digit_domains.yaml` (20 rounds, evaluated every 2). Cells: target-domain "
        "accuracy (%), "
        "mean ± std over seeds of each run's mean over the evaluations of the second half of training (rounds "
        "12-20).",
        "",
        f"Regenerate: `{command}`",
        "",
        "| method | n | " + " | ".join(DOMAINS) + " | mean |",
        "|" + "---|" * (len(DOMAINS) + 3),
    ]
    diverged = {(row, s): r["diverged"] for row, reps in results.items() for s, r in reps.items() if "diverged" in r}
    finished = {row: [r for r in reps.values() if "diverged" not in r] for row, reps in results.items()}

    def count(row: str) -> str:
        bad = sum(1 for r, _ in diverged if r == row)
        return f"{len(finished[row])}" + (f" (+{bad} diverged)" if bad else "")

    for row, reps in finished.items():
        per = [[r["second_half"][t] for t in DOMAINS] for r in reps]
        cells = [_cell([p[i] for p in per]) for i in range(len(DOMAINS))]
        cells.append(_cell([sum(p) / len(p) for p in per]))
        lines.append(f"| {ROWS[row][0]} | {count(row)} | " + " | ".join(cells) + " |")
    lines += [k[0] for k in kept.values()]
    lines += [
        "",
        "Mean over the four targets (%): at the last round, at the round with the best source-domain validation "
        "accuracy, over every evaluated round (`mean_last`), and the few-class target accuracy (second half).",
        "",
        "| method | n | last round | val-selected | whole run | few (2nd half) |",
        "|---|---|---|---|---|---|",
    ]
    for row, reps in finished.items():
        cells = [_cell([r[k] for r in reps]) for k in ("final", "val_selected", "mean_last", "few")]
        lines.append(f"| {ROWS[row][0]} | {count(row)} | " + " | ".join(cells) + " |")
    lines += [k[1] for k in kept.values()]
    if diverged:
        lines += ["", "Diverged runs (the run stopped with a non-finite or exploding client update; the cells average "
                  "the other seeds): " + "; ".join(f"{ROWS[r][0]}, seed {s}: {w}" for (r, s), w in diverged.items())
                  + "."]
    if kept:
        lines += ["", "Rows marked (kept) were not re-run: copied from the previous version of this file (same method, "
                  "config and seeds)."]
    return "\n".join(lines) + "\n\n" + notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="parallel runs (each uses one thread)")
    p.add_argument("--run-root", default=str(ROOT / "runs" / "bench_digit_domains"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digit_domains.md"))
    p.add_argument("--keep", action="store_true", help="copy the rows not run from the existing table")
    p.add_argument("--rerun", action="store_true", help="run rows and seeds already recorded in the JSON again")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the JSON, run nothing")
    a = p.parse_args(argv)
    root = Path(a.run_root)
    out = Path(a.out)
    store = out.with_suffix(".json")
    recorded: dict[str, dict[str, dict]] = json.loads(store.read_text()) if store.exists() else {}
    lock = threading.Lock()

    def job(row: str, seed: int) -> None:
        rec = run_one(row, seed, root)
        with lock:  # write after every run: an interrupted sweep keeps what finished
            recorded.setdefault(row, {})[str(seed)] = rec
            store.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")

    # Seed-major order: every row gets its first seed before any row its second.
    jobs = [(row, s) for s in a.seeds for row in a.rows
            if not a.table_only and (a.rerun or str(s) not in recorded.get(row, {}))]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(lambda rs: job(*rs), jobs))
    # Every row with recorded runs is shown (not only the ones run now); --keep adds old lines of the others.
    results = {row: {s: recorded[row][s] for s in sorted(recorded[row], key=int) if int(s) in a.seeds}
               for row in ROWS if recorded.get(row)}
    results = {row: reps for row, reps in results.items() if reps}
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else f"{NOTES}\n\n(none yet)\n"
    # FedTAIL rows are never kept: its adversarial term is on by default since this table's last full run.
    kept = {row: kept_lines(old, row) for row in ROWS
            if row not in results and not row.startswith("fedtail") and f"| {ROWS[row][0]} " in old} if a.keep else {}
    command = "python benchmarks/digit_domains.py" + ("" if a.rows == list(ROWS) else " --rows " + " ".join(a.rows)) + (
        "" if a.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, a.seeds))) + (" --keep" if a.keep else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(results, a.seeds, command, notes, kept))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
