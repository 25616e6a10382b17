"""The offline CLIP demos (tiny CLIP, embedded digits), each method in its paper mode and, where it declares one,
with its ``released_code`` arguments (the ``@code`` rows).

Two settings, both without downloads: ``configs/clip/fedpurel_digits.yaml`` (the frozen tiny CLIP with prompt
PEFT: FedPuReL and the prompt baselines) and ``configs/clip/fedsm_digits.yaml`` (a ResNet-8 student with the
tiny CLIP as teacher: FedSM and CLIP2FL). The tiny CLIP's weights are fedlt's offline digits "pretraining", so the
numbers show the mechanics and the paper-vs-code effect at toy size, not the papers' claims.

    python benchmarks/clip_demos.py                                  # every row, seeds 0 1 2
    python benchmarks/clip_demos.py --rows fedpurel fedpurel@code --seeds 0

Finished runs (``final.json`` present) are reused, so an interrupted sweep continues where it stopped. Cells: mean
± std over seeds of the value at the last round; "after training" is the evaluation after a post-training stage
(FedPuReL's post-hoc Stage 2), else the last round again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_lt_baselines import released_code_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ROOT / "configs" / "clip" / "fedpurel_digits.yaml"
STUDENT = ROOT / "configs" / "clip" / "fedsm_digits.yaml"
TINY_TEACHER = ["--method.init_args.clip_model", "fedlt-tiny-clip", "--method.init_args.clip_pretrained", "true",
                "--method.init_args.clip_tag", "fedlt-digits"]
# row -> (base config, extra arguments). The @code suffix appends the method's released_code arguments.
ROWS: dict[str, tuple[Path, list[str]]] = {
    "zeroshot_clip": (PROMPT, ["--config", str(ROOT / "configs" / "method" / "zeroshot_clip.yaml")]),
    "promptfl": (PROMPT, ["--config", str(ROOT / "configs" / "method" / "promptfl.yaml")]),
    "promptfolio": (PROMPT, ["--config", str(ROOT / "configs" / "method" / "promptfolio.yaml")]),
    "fedpurel": (PROMPT, []),
    "fedsm": (STUDENT, []),
    "clip2fl": (STUDENT, ["--config", str(ROOT / "configs" / "method" / "clip2fl.yaml"), *TINY_TEACHER,
                          "--method.init_args.lr", "0.05", "--method.init_args.local_epochs", "2",
                          "--method.init_args.batch_size", "32"]),
}
DEFAULT_ROWS = ["zeroshot_clip", "promptfl", "promptfolio", "promptfolio@code", "fedpurel", "fedpurel@code", "fedsm",
                "clip2fl", "clip2fl@code"]
COLUMNS = [("GM acc", "test/global/acc", "final"), ("GM balancedness", "test/global/balancedness", "final"),
           ("PM acc (last round)", "test/personal/acc_mean", "final"),
           ("PM acc (after training)", "test/personal/acc_mean", "after"),
           ("PM balancedness (after training)", "test/personal/balancedness", "after")]
NOTES = "## Notes"


def run_one(row: str, seed: int, root: Path) -> dict:
    from fedlt.cli import main

    method, _, variant = row.partition("@")
    if variant not in ("", "code"):
        raise SystemExit(f"unknown variant {variant!r} in {row!r} (only '@code')")
    base, extra = ROWS[method]
    if variant == "code":
        extra = [*extra, *released_code_args(method)]
    name = f"{method}-code-s{seed}" if variant else f"{method}-s{seed}"
    run_dir = root / name
    final = run_dir / "final.json"
    if not final.exists():
        t0 = time.time()
        code = main(["fit", "--config", str(base), *extra, "--seed", str(seed), "--name", name,
                     "--run_dir", str(run_dir), "--logging.wandb", "false", "--logging.progress_bar", "false",
                     "--resume", "auto"])
        if code not in (0, None):
            raise SystemExit(f"{row} seed {seed} failed with exit status {code}")
        print(f"{row} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(final.read_text())


def value(report: dict, key: str, when: str) -> float:
    final = report.get("final", {})
    source = report.get("post_training", final) if when == "after" else final
    return float(source.get(key, float("nan")))


def _cell(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    std = 100 * statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.fmean(vals):.1f} ± {std:.1f}"


def table(results: dict[str, list[dict]], seeds: list[int], command: str) -> str:
    lines = [
        "# CLIP demos on embedded digits (tiny CLIP), paper mode and released code",
        "",
        "Settings: `configs/clip/fedpurel_digits.yaml` (frozen tiny CLIP, prompt PEFT, 10 clients, 4 per round, 5 "
        "rounds) for zeroshot_clip, promptfl, promptfolio and fedpurel; `configs/clip/fedsm_digits.yaml` (ResNet-8 "
        "student, tiny CLIP teacher, 20 rounds) for fedsm and clip2fl. Rows `@code` add the method's "
        "`released_code` arguments (docs/paper_vs_code.md). Cells: accuracy (%), mean ± std over seeds "
        f"{', '.join(map(str, seeds))} at the last round; \"after training\": after the post-training stage where "
        "the method has one (FedPuReL's post-hoc Stage 2), else the last round. Balancedness: worst-class accuracy. "
        "'-': not defined for the method.",
        "",
        f"Regenerate: `{command}`",
        "",
        "| method | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row, reports in results.items():
        cells = [_cell([value(r, key, when) for r in reports]) for _, key, when in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--run-root", type=Path, default=ROOT / "runs" / "clip_demos")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "clip_demos.md")
    args = p.parse_args(argv)
    for row in args.rows:
        if row.partition("@")[0] not in ROWS:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)} (optionally with @code)")
    results = {row: [run_one(row, s, args.run_root) for s in args.seeds] for row in args.rows}
    command = "python benchmarks/clip_demos.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = ""
    if args.out.exists() and NOTES in args.out.read_text():
        notes = "\n" + NOTES + args.out.read_text().split(NOTES, 1)[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(results, args.seeds, command.strip()) + notes)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
