"""Federated domain generalization on the embedded digits_dg (issue 5): FedAvg, FedSAM, FedDG-GA, FedTAIL and
FedTAIL ablations, leave-one-domain-out over all four targets, several seeds.

Every row runs ``configs/fedtail_digits_dg.yaml`` (layout (i): one client per source domain, IF 10, 20 rounds of
2 local epochs) with ``--data.target_domain all``; the table reports, per target domain, the mean +- std over
seeds of each run's mean target accuracy over its last 10 evaluated rounds, and the mean over the targets.

    python benchmarks/digits_dg.py                                  # every row, seeds 0 1 2, 2 parallel jobs
    python benchmarks/digits_dg.py --rows fedavg fedtail --seeds 0

Finished runs (``domains.json`` present) are reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fedtail_digits_dg.yaml"
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
    "fedsam": ("FedSAM (rho 0.05)", _method("fedsam")),
    "feddgga": ("FedDG-GA (step 0.2)", _method("feddgga")),
    "fedtail": ("FedTAIL (class-SAM + sharp-ER)", []),
    "fedtail-no-csam": ("FedTAIL without class-wise SAM", ["--method.init_args.class_sam", "false"]),
    "fedtail-no-er": ("FedTAIL without sharp-ER", ["--method.init_args.er_weight", "0"]),
    "fedtail-uniform": ("FedTAIL, gamma_c = 1 (no curvature)", ["--method.init_args.gamma_delta", "1e9"]),
    "fedavg-central": ("FedAvg, centralized (1 client)", [*_method("fedavg"), "--data.domain_layout", "centralized"]),
    "dgviaer-central": ("DGviaER, centralized (1 client)",
                        [*_method("dgviaer"), "--data.domain_layout", "centralized"]),
}


def run_one(row: str, seed: int, root: Path) -> dict:
    """Runs (or reuses) one row and seed over all four targets; returns its ``domains.json``."""
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
        if proc.returncode != 0:
            raise SystemExit(f"{row} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        print(f"{row} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def _cell(values: list[float]) -> str:
    if len(values) > 1:
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{100 * values[0]:.1f}"


def table(results: dict[str, list[dict]], seeds: list[int], command: str, notes: str) -> str:
    head = "| method | " + " | ".join(DOMAINS) + " | mean |"
    lines = [
        "# Federated domain generalization on embedded digits_dg",
        "",
        f"Leave-one-domain-out over the four synthetic domains, one client per source domain, seeds {seeds}. "
        "Cells: target-domain accuracy (%), mean ± std over seeds of each run's mean over its last 10 evaluated "
        "rounds (of 20 rounds, evaluated every 2). Config: `configs/fedtail_digits_dg.yaml`.",
        "",
        f"Regenerate: `{command}`",
        "",
        head,
        "|" + "---|" * (len(DOMAINS) + 2),
    ]
    for row, reps in results.items():
        cells = [_cell([r["targets"][d]["mean_last"] for r in reps]) for d in DOMAINS]
        cells.append(_cell([r["mean"]["mean_last"] for r in reps]))
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="parallel runs (each uses one thread)")
    p.add_argument("--run-root", default=str(ROOT / "runs" / "bench_digits_dg"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits_dg.md"))
    a = p.parse_args(argv)
    root = Path(a.run_root)
    jobs = [(row, s) for row in a.rows for s in a.seeds]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = list(pool.map(lambda rs: run_one(rs[0], rs[1], root), jobs))
    results: dict[str, list[dict]] = {}
    for (row, _), rep in zip(jobs, done):
        results.setdefault(row, []).append(rep)
    out = Path(a.out)
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else f"{NOTES}\n\n(none yet)\n"
    command = "python benchmarks/digits_dg.py" + ("" if a.rows == list(ROWS) else " --rows " + " ".join(a.rows)) + (
        "" if a.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, a.seeds)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(results, a.seeds, command, notes))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
