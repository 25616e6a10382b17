"""``fedlt sweep``: a grid of runs as one SLURM array job, with stable run names, skip-finished and resume.

The grid file maps dotted config keys (anything ``fedlt fit`` accepts as ``--key value``) to lists of values;
the special key ``config`` lists extra config files (a file, or a list of files applied together), e.g.::

    config: [configs/method/fedavg.yaml, configs/method/fedrod.yaml]
    data.partition.init_args.alpha: [0.1, 0.5]
    seed: [0, 1, 2]

Keys are sorted (``config`` first, then ``method``, the others alphabetically, ``seed`` last) before the
cartesian product is taken, so run indices and run names (``fedavg-alpha0.1-seed0``; a short hash is appended
when two runs would share a name) do not depend on the order of the grid file. Each run's composed config is
resolved and validated up front and frozen in ``<sweep_dir>/configs/<run>.yaml``; ``sweep.json`` lists the runs
(index, name, grid values, run dir, the ``fedlt fit`` argv). Run ``i`` is
``fedlt sweep --sweep_dir DIR --run-index i``: it skips a finished run, resumes an interrupted one from its
latest checkpoint, and on preemption (exit 3) requeues its SLURM array task (:mod:`fedlt.cli.slurm`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlt.cli.commands import guarded
from fedlt.cli.errors import EXIT_PREEMPTED, usage_error, usage_message, user_errors
from fedlt.cli.parser import build_parser, method_aliases
from fedlt.cli.slurm import (
    ARRAY_SCRIPT,
    array_indices,
    requeue_if_allowed,
    run_lease,
    sbatch_command,
    sbatch_options,
    submit,
)
from fedlt.errors import ConfigError


class SweepError(ConfigError):
    """Bad input to ``fedlt sweep`` (a grid, a sweep directory, an index): message and exit status 2."""

SPEC = "sweep.json"
CONFIG_KEY = "config"
RESERVED = ("name", "run_dir", "resume")  # set by the sweep for every run
STATUSES = ("finished", "interrupted", "pending")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
_NUMERIC = re.compile(r"^[-+.0-9]")
_MAX_NAME = 80

USAGE = """\
fedlt sweep --config BASE.yaml [--config ...] --grid GRID.yaml [--name NAME] [--sweep_dir DIR]
                   [--submit | --dry-run] [sbatch options] [--key value ...   (fit overrides for every run)]
       fedlt sweep --sweep_dir DIR [--submit | --dry-run] [sbatch options]   (status; resubmit unfinished runs)
       fedlt sweep --sweep_dir DIR --run-index [I]     (run element I; default $SLURM_ARRAY_TASK_ID)"""


# -- the grid --------------------------------------------------------------------------------------------------
def load_grid(path: str | Path) -> dict[str, list[Any]]:
    """Reads and checks a grid file: a mapping of dotted keys to (lists of) values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SweepError(f"--grid {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"--grid {path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(data, dict) or not data:
        raise SweepError(f"--grid {path}: expected a mapping of dotted config keys to lists of values, "
                         "e.g. 'seed: [0, 1, 2]'")
    grid: dict[str, list[Any]] = {}
    for key, values in data.items():
        key = str(key)
        if key in RESERVED or key.startswith("-"):
            raise SweepError(f"grid key {key!r}: not allowed (the sweep sets name, run_dir and resume)")
        if isinstance(values, dict):
            raise SweepError(f"grid key {key!r} maps to a mapping; use dotted keys, e.g. '{key}.<field>: [1, 2]'")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"grid key {key!r} has no values")
        seen = [repr(v) for v in values]
        if len(set(seen)) != len(seen):
            raise SweepError(f"grid key {key!r} repeats a value ({values}): two runs would share one run directory")
        grid[key] = values
    return grid


def _key_order(key: str) -> tuple[int, str]:
    rank = {CONFIG_KEY: 0, "method": 1, "method.class_path": 1, "seed": 3}.get(key, 2)
    return rank, key


def expand(grid: dict[str, list[Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The sorted keys and the cartesian product of their values, one dict per run, in index order."""
    keys = sorted(grid, key=_key_order)
    return keys, [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key (``init_args`` dropped) that no other key shares."""
    parts = {k: [p for p in k.split(".") if p not in ("init_args", "class_path")] or [k] for k in keys}
    labels = {}
    for k in keys:
        n = 1
        while n < len(parts[k]) and any(parts[o][-n:] == parts[k][-n:] for o in keys if o != k):
            n += 1
        labels[k] = ".".join(parts[k][-n:])
    return labels


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _part(key: str, label: str, value: Any) -> str:
    if key == CONFIG_KEY:
        files = value if isinstance(value, list) else [value]
        return "+".join(Path(str(f)).stem for f in files)
    if key in ("method", "method.class_path") and isinstance(value, str):
        return value.rsplit(".", 1)[-1].lower()
    text = _text(value)
    return f"{label}{text}" if _NUMERIC.match(text) else f"{label}_{text}"


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:6]


def run_names(keys: Sequence[str], runs: Sequence[dict[str, Any]]) -> list[str]:
    """Stable, readable run names from the grid values (a short hash only where needed to keep them unique)."""
    labels = _labels(keys)
    slugs = [_SAFE.sub("_", "-".join(_part(k, labels[k], run[k]) for k in keys)).strip("_") for run in runs]
    counts = Counter(slugs)
    return [slug if counts[slug] == 1 and len(slug) <= _MAX_NAME else f"{slug[:_MAX_NAME - 8]}-{_digest(run)}"
            for slug, run in zip(slugs, runs)]


# -- expansion: one validated, frozen config per run -------------------------------------------------------------
def _existing(path: str, base: Path | None = None, what: str = "--config") -> str:
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([base / p] if base is not None else [])
    hit = next((c for c in candidates if c.is_file()), None)
    if hit is None:
        raise SweepError(f"{what}: no such config file {path!r}")
    return str(hit.resolve())


def _fit_argv(base: Sequence[str], overrides: Sequence[str], params: dict[str, Any], grid_dir: Path) -> list[str]:
    argv = [a for c in base for a in ("--config", c)]
    extra = params.get(CONFIG_KEY, [])
    for c in extra if isinstance(extra, list) else [extra]:
        argv += ["--config", _existing(str(c), grid_dir, f"grid key {CONFIG_KEY!r}")]
    argv += list(overrides)
    for key, value in params.items():
        if key != CONFIG_KEY:
            argv += [f"--{key}", _text(value)]
    return argv


def _clean(message: str) -> str:
    """The CLI's short form of a jsonargparse error."""
    return usage_message(message)


def _explain(err: BaseException, params: dict[str, Any], run: str, overrides: Sequence[str]) -> str:
    """Names the grid key (or fit override) a jsonargparse error is about."""
    raw = str(err)
    mentions = lambda k: f"--{k}" in raw or f'"{k}"' in raw or f"'{k.rsplit('.', 1)[-1]}'" in raw  # noqa: E731
    bad = [k for k in params if k != CONFIG_KEY and mentions(k)]
    if bad:
        return f"grid key {bad[0]!r} (value {params[bad[0]]!r}, run {run}): {_clean(raw)}"
    flags = [o.split("=", 1)[0][2:] for o in overrides if o.startswith("--")]
    bad = [k for k in flags if mentions(k)]
    if bad:
        return f"fit override --{bad[0]} (run {run}): {_clean(raw)}"
    return f"run {run} ({', '.join(f'{k}={v!r}' for k, v in params.items())}): {_clean(raw)}"


def _resolve(parser: Any, argv: list[str], params: dict[str, Any], run: str,
             overrides: Sequence[str]) -> tuple[str, int]:
    """Parses a run's argv, freezes the resolved config and checks that it parses and instantiates again."""
    try:
        text = parser.dump(parser.parse_args(method_aliases(argv)), skip_none=False)
        cfg = parser.parse_string(text)
        parser.instantiate_classes(cfg)
    except user_errors() as err:
        raise SweepError(_explain(err, params, run, overrides)) from err
    return text, int(cfg.trainer.rounds)


def build(configs: Sequence[str], grid_path: str, sweep_dir: str, name: str,
          overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Expands and validates a sweep; returns its spec (``sweep.json``) and the frozen config of each run."""
    grid = load_grid(grid_path)
    keys, combos = expand(grid)
    names = run_names(keys, combos)
    base = [_existing(c) for c in configs]
    parser = build_parser("fit")
    runs, texts = [], {}
    for index, (params, run) in enumerate(zip(combos, names)):
        run_dir = str(Path(sweep_dir) / "runs" / run)
        argv = _fit_argv(base, overrides, params, Path(grid_path).resolve().parent)
        argv += ["--name", run, "--run_dir", run_dir, "--logging.group", name, "--resume", "auto"]
        texts[run], rounds = _resolve(parser, argv, params, run, overrides)
        runs.append({"index": index, "name": run, "params": params, "run_dir": run_dir,
                     "config": f"configs/{run}.yaml", "rounds": rounds, "argv": ["fit", *argv]})
    spec = {"name": name, "workdir": str(Path.cwd()), "base_configs": base, "grid_file": str(grid_path),
            "grid": {k: grid[k] for k in keys}, "overrides": list(overrides), "runs": runs}
    return spec, texts


def load_spec(sweep_dir: str | Path) -> dict[str, Any]:
    """Reads ``<sweep_dir>/sweep.json``."""
    path = Path(sweep_dir) / SPEC
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise SweepError(f"--sweep_dir {sweep_dir}: no {SPEC} (create the sweep with --config/--grid)") from err
    except json.JSONDecodeError as err:
        raise SweepError(f"{path}: not valid JSON ({err})") from err


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2))


def write(spec: dict[str, Any], texts: dict[str, str], sweep_dir: str | Path) -> dict[str, Any]:
    """Writes the sweep directory; an existing one must hold the same runs with the same configs."""
    d = Path(sweep_dir)
    if (d / SPEC).is_file():
        old = load_spec(d)
        same = [r["name"] for r in old["runs"]] == [r["name"] for r in spec["runs"]] and all(
            (d / r["config"]).is_file() and (d / r["config"]).read_text() == texts[r["name"]] for r in spec["runs"])
        if not same:
            raise SweepError(f"{d} already holds a different sweep ({len(old['runs'])} runs); pick another --name "
                             "or --sweep_dir, or delete it")
        spec = {**old, **{k: v for k, v in spec.items() if k not in ("workdir",)}}
    (d / "configs").mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    for run in spec["runs"]:  # only new or changed files, atomically: running tasks may be reading them
        path = d / run["config"]
        if not path.is_file() or path.read_text() != texts[run["name"]]:
            _write_text(path, texts[run["name"]])
    _write_json(d / SPEC, spec)
    return spec


# -- status ------------------------------------------------------------------------------------------------------
def _finished(run_dir: Path, rounds: int | None) -> bool:
    if (run_dir / "domains.json").is_file():  # data.target_domain: all (one sub-run per domain)
        return True
    try:
        report = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return False
    done = report.get("rounds") if isinstance(report, dict) else None
    return isinstance(done, list) and (not done or rounds is None or max(done) >= rounds)


def run_status(sweep_dir: str | Path, run: dict[str, Any]) -> str:
    """``finished`` (complete final.json), ``interrupted`` (checkpoints, no final.json) or ``pending``."""
    from fedlt.engine.checkpoint import latest_checkpoint

    run_dir = Path(sweep_dir) / "runs" / run["name"]
    if _finished(run_dir, run.get("rounds")):
        return "finished"
    return "interrupted" if latest_checkpoint(run_dir) is not None else "pending"


def format_runs(spec: dict[str, Any], statuses: Sequence[str], sweep_dir: str | Path) -> str:
    """The runs table: index, status, name."""
    counts = Counter(statuses)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    lines = [f"sweep {spec['name']}: {len(spec['runs'])} runs in {sweep_dir} ({summary})",
             f"{'index':>5}  {'status':<11}  name"]
    lines += [f"{r['index']:>5}  {s:<11}  {r['name']}" for r, s in zip(spec["runs"], statuses)]
    return "\n".join(lines)


# -- submission ----------------------------------------------------------------------------------------------
def _submit_or_print(args: argparse.Namespace, spec: dict[str, Any], sweep_dir: Path) -> int:
    statuses = [run_status(sweep_dir, r) for r in spec["runs"]]
    print(format_runs(spec, statuses, sweep_dir))
    todo = [r["index"] for r, s in zip(spec["runs"], statuses) if s != "finished"]
    if not todo:
        print("all runs finished; nothing to submit")
        return 0
    options = sbatch_options(args.account, args.partition, args.gpus, args.time, args.sbatch_args)
    options = options or spec.get("sbatch_options", [])
    script = Path(args.script) if args.script else ARRAY_SCRIPT
    if not args.dry_run and not script.is_file():
        raise SweepError(f"array script {script} not found; pass --script path/to/array.sbatch")
    cmd = sbatch_command(spec["name"], sweep_dir, todo, options, args.max_parallel, script, spec.get("workdir"))
    if not args.submit:
        if not (sweep_dir / SPEC).is_file():  # --dry-run of a new sweep: nothing exists that these could run
            print(f"would submit, once the sweep exists:\n  {shlex.join(cmd)}")
            print(f"--dry-run wrote nothing: create the sweep first (this command without --dry-run writes "
                  f"{sweep_dir / SPEC}), then --submit it or run it locally with --run-index")
            return 0
        print(f"{'would submit' if args.dry_run else 'submit with'}:\n  {shlex.join(cmd)}")
        print(f"or run locally: for i in {' '.join(map(str, todo))}; do fedlt sweep --sweep_dir {sweep_dir} "
              "--run-index $i; done")
        return 0
    job = submit(cmd)
    spec["sbatch_options"] = list(options)
    spec.setdefault("submissions", []).append({"job_id": job, "array": array_indices(todo, args.max_parallel)})
    _write_json(sweep_dir / SPEC, spec)
    print(f"submitted array job {job} ({len(todo)} runs; logs in {sweep_dir / 'logs'})")
    return 0


# -- one array task ----------------------------------------------------------------------------------------------
def _rank_zero() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _task_index(value: int | None) -> int:
    if value is not None and value >= 0:
        return value
    env = os.environ.get("SLURM_ARRAY_TASK_ID")
    if env is None or not env.isdigit():
        raise SweepError("--run-index: give an index, or run inside a SLURM array task (SLURM_ARRAY_TASK_ID)")
    return int(env)


def run_index(sweep_dir: str | Path, index: int) -> int:
    """Runs element ``index`` of the sweep: skips it when finished, resumes it when interrupted; on preemption
    (exit 3) requeues the SLURM job when allowed."""
    d = Path(sweep_dir)
    runs = load_spec(d)["runs"]
    if not 0 <= index < len(runs):
        raise SweepError(f"--run-index {index}: the sweep has {len(runs)} runs (0-{len(runs) - 1})")
    run = runs[index]
    status = run_status(d, run)
    if status == "finished":
        print(f"fedlt sweep: run {index} ({run['name']}) already finished; skipping", flush=True)
        return 0
    # Rank 0 holds the run's lease; ranks spawned by Fabric re-enter here and must not contend for it.
    with run_lease(d / "runs" / f".{run['name']}.lock") if _rank_zero() else contextlib.nullcontext(True) as ours:
        if not ours:
            print(f"fedlt sweep: run {index} ({run['name']}) is being trained by another task; skipping", flush=True)
            return 0
        print(f"fedlt sweep: run {index} of {len(runs)}: {run['name']} ({status})", flush=True)
        code = guarded("fit", ["--config", str(d / run["config"]), "--run_dir", str(d / "runs" / run["name"]),
                               "--resume", "auto"])
    if code == EXIT_PREEMPTED and _rank_zero():
        requeue_if_allowed()
    return code


# -- the command ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # -> exit 2 through fedlt's error path, not argparse's
        raise SweepError(f"{message} (see fedlt sweep --help)")


def _arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlt sweep", usage=USAGE, allow_abbrev=False, description=(
        "Expand a grid of fedlt fit runs into a SLURM array job; submit it, or run one element. Options not listed "
        "here (--key value) are fit overrides applied to every run. sbatch also reads SBATCH_ACCOUNT, "
        "SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_GRES ... from the environment."))
    p.add_argument("--config", action="append", default=[], help="base config file(s) of every run; later ones win")
    p.add_argument("--grid", help="grid YAML: dotted keys -> lists of values; 'config' lists extra config files")
    p.add_argument("--name", help="sweep name (W&B group; default: the --sweep_dir name or the grid file's stem)")
    p.add_argument("--sweep_dir", "--sweep-dir", help="sweep directory (default sweeps/<name>)")
    p.add_argument("--run-index", "--run_index", type=int, nargs="?", const=-1, default=None,
                   help="run one element (default index: $SLURM_ARRAY_TASK_ID)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="submit the unfinished runs with sbatch")
    mode.add_argument("--dry-run", "--dry_run", action="store_true", help="print the runs and sbatch command only")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--gpus", type=int, help="GPUs per array task (sbatch --gres=gpu:N)")
    p.add_argument("--time", help="time limit per array task (sbatch --time, e.g. 04:00:00)")
    p.add_argument("--max-parallel", "--max_parallel", type=int, help="at most this many tasks at once (%%N)")
    p.add_argument("--sbatch-args", "--sbatch_args", metavar="'OPTIONS'",
                   help='more sbatch options in one string, with "=": --sbatch-args="--qos=high --mem=32G"')
    p.add_argument("--script", help=f"array job script (default {ARRAY_SCRIPT})")
    return p


def _create(args: argparse.Namespace, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    name = args.name or (Path(args.sweep_dir).name if args.sweep_dir else Path(args.grid).stem)
    sweep_dir = Path(args.sweep_dir or Path("sweeps") / name)
    spec, texts = build(args.config, args.grid, str(sweep_dir), name, overrides)
    if not args.dry_run:
        spec = write(spec, texts, sweep_dir)
        print(f"wrote {sweep_dir / SPEC} ({len(spec['runs'])} runs, configs in {sweep_dir / 'configs'})")
    return spec, sweep_dir


def _sweep(argv: Sequence[str]) -> int:
    args, overrides = _arg_parser().parse_known_args(list(argv))
    if overrides and (args.grid is None or not overrides[0].startswith("--")):
        raise SweepError(f"unrecognized arguments: {' '.join(overrides)} (fit overrides need --grid)")
    if args.run_index is not None:
        if args.sweep_dir is None:
            raise SweepError("--run-index needs --sweep_dir")
        return run_index(args.sweep_dir, _task_index(args.run_index))
    if args.grid is not None:
        spec, sweep_dir = _create(args, overrides)
    elif args.sweep_dir is not None:
        spec, sweep_dir = load_spec(args.sweep_dir), Path(args.sweep_dir)
    else:
        raise SweepError("give --grid (and --config) to create a sweep, or --sweep_dir for an existing one")
    return _submit_or_print(args, spec, sweep_dir)


def cmd_sweep(argv: Sequence[str]) -> int:
    """``fedlt sweep``: returns the exit status (2 with a message for bad input)."""
    if argv and argv[0] in ("-h", "--help"):
        _arg_parser().print_help()
        return 0
    try:
        return _sweep(argv)
    except user_errors() as err:
        return usage_error(str(err))
    except SystemExit as done:  # argparse's --help
        return int(done.code or 0)
