"""Comparison sweep of the baselines on the embedded digits-LT protocol (issue 3).

Every method runs the quick-start protocol (embedded digits, IF=100, Dirichlet alpha=0.5, 20 clients,
10 per round) with the SAME local training settings (overridden after the method's own config, so that the
comparison isolates the method), for several seeds; the table reports the mean +- std over seeds of each
run's "mean of the last 10 evaluated rounds".

    python benchmarks/digits_lt_baselines.py                       # all methods, seeds 0 1 2
    python benchmarks/digits_lt_baselines.py --methods fedavg creff --seeds 0
    python benchmarks/digits_lt_baselines.py --methods fedavg fedrod creff fedloge redgrape \
        --out benchmarks/results/digits_lt_core.md --title "Core methods on embedded digits-LT"   # issue 4

A method name with the suffix ``@bn`` runs on the CNN with BatchNorm layers (``model.kwargs.norm: batch``, the
FedBN paper's CNN): FedBN only differs from FedAvg on a model with norm layers, so its row is ``fedbn@bn`` and
``fedavg@bn`` is the reference on the same backbone. The suffix ``@code`` runs the method with the arguments of
its ``released_code`` (what the authors' released code did; docs/paper_vs_code.md), e.g. ``creff@code``;
``@code:<arg>[+<arg>...]`` applies only the named ones (one difference at a time), e.g. ``fedloge@code:gamma``.

Finished runs (``final.json`` present) are reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["fedavg", "fedprox", "fedavgm", "fedavg@bn", "fedbn@bn", "fedrep", "ditto", "fedrod", "fedbabu",
                   "fedetf",
                   "fedfocal", "ratioloss", "climb", "creff", "fedgrab", "fedlc"]
COLUMNS = [("GM acc", "test/global/acc"), ("GM many", "test/global/acc_many"),
           ("GM medium", "test/global/acc_medium"), ("GM few", "test/global/acc_few"),
           ("PM mean", "test/personal/acc_mean")]
NOTES = "## Notes"
LOCAL = ["--method.init_args.lr", "0.05", "--method.init_args.momentum", "0.5",
         "--method.init_args.local_epochs", "2", "--method.init_args.batch_size", "16"]


def released_code_args(method: str, only: list[str] | None = None) -> list[str]:
    """``--method.init_args.<arg> <value>`` for every argument of the method's ``released_code`` (or the ``only``
    ones)."""
    import yaml

    import fedlt.methods  # noqa: F401  (registers every method)
    from fedlt.methods.base import METHODS

    code = METHODS.get(method).released_code
    if not code:
        raise SystemExit(f"{method} declares no released_code")
    unknown = sorted(set(only or ()) - set(code))
    if unknown:
        raise SystemExit(f"{method}.released_code has no {', '.join(unknown)} (it has: {', '.join(code)})")
    out: list[str] = []
    for arg, value in code.items():
        if only is not None and arg not in only:
            continue
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        out += [f"--method.init_args.{arg}", text]
    return out


def run_one(row: str, seed: int, rounds: int, root: Path) -> dict:
    """Runs (or reuses) one (method[@bn], seed) and returns its final report."""
    from fedlt.cli import main

    method, _, variant = row.partition("@")
    variant, _, only = variant.partition(":")
    if variant not in ("", "bn", "code") or (only and variant != "code"):
        raise SystemExit(f"unknown variant in {row!r} ('@bn', '@code' or '@code:<arg>[+<arg>...]')")
    model = ["--model.kwargs", "{norm: batch}"] if variant == "bn" else []
    if variant == "code":
        model = released_code_args(method, only.split("+") if only else None)
    suffix = variant + ("-" + only.replace("+", "-") if only else "")
    name = f"{method}-{suffix}-s{seed}" if variant else f"{method}-s{seed}"
    run_dir = root / name
    final = run_dir / "final.json"
    if not final.exists():
        args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                "--config", str(ROOT / "configs" / "method" / f"{method}.yaml"), *LOCAL, *model,
                "--seed", str(seed), "--trainer.rounds", str(rounds), "--name", name,
                "--run_dir", str(run_dir), "--logging.wandb", "false", "--logging.progress_bar", "false",
                "--resume", "auto"]
        t0 = time.time()
        code = main(args)
        if code != 0:
            raise SystemExit(f"{method} seed {seed} failed with exit status {code}")
        print(f"{row} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(final.read_text())


def _cell(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    mean = 100 * statistics.fmean(vals)
    std = 100 * statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _value(report: dict, key: str) -> float:
    """A run's cell value: its evaluation after a post-training stage when it has one, else its mean over the
    last evaluated rounds."""
    if "post_training" in report:
        return float(report["post_training"].get(key, float("nan")))
    return float(report["mean_last"].get(key, float("nan")))


def table(results: dict[str, list[dict]], seeds: list[int], rounds: int, command: str,
          title: str = "Baselines on embedded digits-LT", old: str = "") -> str:
    """The results table; with ``old`` (an existing table), the rows of methods not in ``results`` are copied
    from it, marked "(kept)", in their old order, and the new rows replace or follow them."""
    lines = [
        f"# {title}",
        "",
        f"Protocol: embedded digits (16x16), IF=100, Dirichlet alpha=0.5, 20 clients, 10 per round, {rounds} rounds,",
        "FedAvg CNN, local SGD lr 0.05 / momentum 0.5 / 2 epochs / batch 16 for every method. Cells: mean ± std",
        f"over seeds {', '.join(map(str, seeds))} of each run's mean accuracy (%) over its last 10 evaluated rounds",
        "(evaluation every 2 rounds). GM = global model on the balanced test set; PM = personalized models on",
        "the clients' local test sets. '-' = not defined for the method (no global model, or no test sample).",
        "Rows `@bn` use the CNN with BatchNorm (FedBN's model); compare `fedbn@bn` with `fedavg@bn`.",
        "",
        f"Regenerate: `{command}`",
        "",
        "| method | " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    rows: dict[str, str] = {}
    for line in old.split(NOTES)[0].splitlines():
        name = line.split("|")[1].strip().removesuffix(" (kept)") if line.startswith("| ") else ""
        if name and name != "method":
            rows[name] = line if line.startswith(f"| {name} (kept) |") else line.replace(f"| {name} |",
                                                                                         f"| {name} (kept) |", 1)
    post = []
    for method, reports in results.items():
        cells = [_cell([_value(r, k) for r in reports]) for _, k in COLUMNS]
        rows[method] = f"| {method} | " + " | ".join(cells) + " |"
        if any("post_training" in r for r in reports):
            post.append(method)
    lines += rows.values()
    if post:
        lines += ["", f"{', '.join(post)}: the cells are the evaluation after the method's post-training stage "
                  "(CCVR's classifier calibration), not a mean over the last evaluated rounds."]
    if any("(kept) |" in r for r in rows.values()):
        lines += ["", "Rows marked (kept) were not re-run: copied from the previous version of this file (same "
                  "protocol and seeds; the method's code and defaults did not change since)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--run-root", type=Path, default=ROOT / "runs" / "digits_lt_baselines")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "digits_lt_baselines.md")
    p.add_argument("--title", default="Baselines on embedded digits-LT")
    p.add_argument("--keep", action="store_true", help="copy the rows of the other methods from the existing table")
    args = p.parse_args(argv)
    results = {m: [run_one(m, s, args.rounds, args.run_root) for s in args.seeds] for m in args.methods}
    command = "python benchmarks/digits_lt_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Hand-written commentary below the "## Notes" heading of an existing table survives regeneration.
    notes = ""
    if args.out.exists() and NOTES in args.out.read_text():
        notes = "\n" + NOTES + args.out.read_text().split(NOTES, 1)[1]
    old = args.out.read_text() if args.keep and args.out.exists() else ""
    args.out.write_text(table(results, args.seeds, args.rounds, command.strip(), args.title, old) + notes)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
