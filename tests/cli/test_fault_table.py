"""The bad-input table: every bad command line, config file, checkpoint or environment exits with status 2, a
message naming the cause, no traceback, and a run directory unchanged byte for byte (or never created).

Each row is ``(id, argv builder, needle)``. A builder gets the case's temporary folder and a finished run
(copied per case) and returns the command line and the folder whose files must not change.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_run_guards import tree_hash  # tests/cli is on sys.path, as for every test module

from fedlt.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
QUIET = ["--logging.wandb", "false", "--logging.progress_bar", "false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round tiny run, copied by every resume case."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["fit", "--config", TINY, "--run_dir", str(run), *QUIET]) == 0
    return run


Builder = Callable[[Path, Path], tuple[list[str], Path]]


def fresh(*args: str) -> Builder:
    """``fedlt fit`` of the tiny config plus ``args`` into a run directory that does not exist yet."""
    return lambda tmp, _: (["fit", "--config", TINY, "--run_dir", str(tmp / "new"), *QUIET, *args], tmp / "new")


def resume(*args: str) -> Builder:
    """``fedlt fit --resume auto`` of the finished run (a copy) with ``args``."""
    def build(tmp: Path, run: Path) -> tuple[list[str], Path]:
        return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", "auto", *args], run
    return build


def with_file(text: str | bytes, *args: str, name: str = "extra.yaml", flag: str = "--config") -> Builder:
    """``fedlt fit`` with a file of ``text`` given as ``flag``."""
    def build(tmp: Path, _: Path) -> tuple[list[str], Path]:
        f = tmp / name
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["fit", "--config", TINY, "--run_dir", str(tmp / "new"), *QUIET, flag, str(f), *args], tmp / "new"
    return build


def command(*args: str) -> Builder:
    """Another subcommand; ``{run}`` is the finished run (a copy), ``{tmp}`` the case folder."""
    def build(tmp: Path, run: Path) -> tuple[list[str], Path]:
        return [a.format(run=run, tmp=tmp) for a in args], run
    return build


def _other_model_checkpoint(tmp: Path, run: Path) -> tuple[list[str], Path]:
    other = tmp / "other"
    assert main(["fit", "--config", TINY, "--run_dir", str(other), *QUIET, "--trainer.rounds", "1",
                 "--model.kwargs", "{hidden: 16}"]) == 0
    ckpt = other / "checkpoints" / "round_00001.ckpt"
    return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", str(ckpt)], run


def _garbage_checkpoint(tmp: Path, run: Path) -> tuple[list[str], Path]:
    bad = tmp / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    return ["fit", "--config", TINY, "--run_dir", str(tmp / "new"), *QUIET, "--resume", str(bad)], tmp / "new"


def _truncated_latest(tmp: Path, run: Path) -> tuple[list[str], Path]:
    latest = run / "checkpoints" / "round_00002.ckpt"
    latest.write_bytes(latest.read_bytes()[:2000])
    return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", "auto", "--trainer.rounds", "3"], run


def _run_dir_is_a_file(tmp: Path, _: Path) -> tuple[list[str], Path]:
    f = tmp / "afile"
    f.write_text("I am a file")
    return ["fit", "--config", TINY, "--run_dir", str(f), *QUIET], tmp


def _locked(tmp: Path, run: Path) -> tuple[list[str], Path]:
    from fedlt.engine.rundir import RunDirLock

    lock = RunDirLock(run)
    lock.acquire()
    _HELD.append(lock)
    return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", "auto", "--trainer.rounds", "3"], run


_HELD: list = []


def _config_dir(tmp: Path, _: Path) -> tuple[list[str], Path]:
    return ["fit", "--config", str(tmp), "--run_dir", str(tmp / "new"), *QUIET], tmp / "new"


def _bad_partition_json(tmp: Path, run: Path) -> tuple[list[str], Path]:
    (run / "partition.json").write_text("{ not json")
    return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", "auto", "--trainer.rounds", "3"], run


def _other_partition_record(tmp: Path, run: Path) -> tuple[list[str], Path]:
    """partition.json says the clients had other sizes: the data changed since round 1."""
    import json

    record = json.loads((run / "partition.json").read_text())
    record["client_sizes"] = list(reversed(record["client_sizes"]))
    (run / "partition.json").write_text(json.dumps(record))
    return ["fit", "--config", TINY, "--run_dir", str(run), *QUIET, "--resume", "auto", "--trainer.rounds", "3"], run


def _empty_report(tmp: Path, _: Path) -> tuple[list[str], Path]:
    (tmp / "empty").mkdir()
    return ["report", str(tmp / "empty")], tmp / "empty"


def _bad_sweep_grid(tmp: Path, _: Path) -> tuple[list[str], Path]:
    grid = tmp / "grid.yaml"
    grid.write_text("grid:\n  method.init_args.lr: 0.1\n")  # a scalar where a list of values belongs
    return ["sweep", "--config", TINY, "--grid", str(grid), "--sweep_dir", str(tmp / "sweep")], tmp / "sweep"


CASES: list[tuple[str, Builder, str]] = [
    # -- the command line --------------------------------------------------------------------------------------
    ("unknown-key", fresh("--bogus", "1"), "bogus"),
    ("unknown-trainer-key", fresh("--trainer.roundz", "3"), "roundz"),
    ("prefix-abbreviation", fresh("--trainer.round", "5"), "trainer.round"),
    ("wrong-type-int", fresh("--trainer.rounds", "abc"), "trainer.rounds"),
    ("float-for-int", fresh("--trainer.rounds", "2.5"), "trainer.rounds"),
    ("rounds-0", fresh("--trainer.rounds", "0"), "rounds"),
    ("rounds-negative", fresh("--trainer.rounds", "-3"), "rounds"),
    ("eval-every-negative", fresh("--trainer.eval_every", "-1"), "eval_every"),
    ("cohort-0", fresh("--trainer.clients_per_round", "0"), "clients_per_round"),
    ("devices-0", fresh("--trainer.devices", "0"), "devices"),
    ("nodes-0", fresh("--trainer.num_nodes", "0"), "num_nodes"),
    ("checkpoint-every-negative", fresh("--trainer.checkpoint_every", "-1"), "checkpoint_every"),
    ("keep-checkpoints-negative", fresh("--trainer.keep_checkpoints", "-2"), "keep_checkpoints"),
    ("eval-batch-0", fresh("--trainer.eval_batch_size", "0"), "eval_batch_size"),
    ("exact-reduction-not-bool", fresh("--trainer.exact_reduction", "maybe"), "exact_reduction"),
    ("bad-precision", fresh("--trainer.precision", "13-bogus"), "precision"),
    ("bad-accelerator", fresh("--trainer.accelerator", "tpuz"), "accelerator"),
    ("bad-client-state", fresh("--trainer.client_state", "cloud"), "client_state"),
    ("unknown-method", fresh("--method", "bogusavg"), "bogusavg"),
    ("unknown-method-class", fresh("--method.class_path", "NoSuchMethod"), "NoSuchMethod"),
    ("unknown-method-arg", fresh("--method.init_args.bogus", "1"), "bogus"),
    ("method-arg-wrong-type", fresh("--method.init_args.lr", "fast"), "lr"),
    ("method-batch-size-0", fresh("--method.init_args.batch_size", "0"), "batch_size"),
    ("method-local-epochs-negative", fresh("--method.init_args.local_epochs", "-1"), "local_epochs"),
    ("unknown-model", fresh("--model.name", "nosuchnet"), "nosuchnet"),
    ("bogus-model-kwargs", fresh("--model.kwargs", "{bogus: 1}"), "bogus"),
    ("model-kwargs-not-a-mapping", fresh("--model.kwargs", "[1, 2]"), "model.kwargs"),
    ("num-clients-0", fresh("--data.num_clients", "0"), "num_clients"),
    ("imbalance-factor-0", fresh("--data.imbalance_factor", "0"), "imbalance_factor"),
    ("dirichlet-alpha-negative", fresh("--data.partition.init_args.alpha", "-1"), "alpha"),
    ("impossible-partition", fresh("--data.partition.init_args.min_size", "100000"), "min_size"),
    ("unknown-partition", fresh("--data.partition.class_path", "NoSuchSplit"), "NoSuchSplit"),
    ("unknown-data-source", fresh("--data.source.class_path", "NoSuchData"), "NoSuchData"),
    ("missing-dataset", fresh("--data.source", "CIFAR10", "--data.source.init_args.root", "/nonexistent/cifar"),
     "/nonexistent/cifar"),
    ("gpu-without-gpu", fresh("--trainer.accelerator", "gpu"), "GPU"),
    ("bad-wandb-mode", fresh("--logging.wandb_mode", "sometimes"), "wandb_mode"),
    ("seed-not-int", fresh("--seed", "zero"), "seed"),
    ("missing-config-file", fresh("--config", "/nonexistent/conf.yaml"), "/nonexistent/conf.yaml"),
    ("config-is-a-directory", _config_dir, "config"),
    ("yaml-syntax-error", with_file("trainer:\n  rounds: 3\n  eval_every: [1\n"), "line 4"),
    ("yaml-tab-indent", with_file("trainer:\n\trounds: 3\n"), "not valid YAML"),
    ("empty-config", with_file("# nothing\n\n"), "is empty"),
    ("config-is-a-list", with_file("- rounds\n- 3\n"), "mapping"),
    ("config-unknown-section", with_file("trainr:\n  rounds: 3\n"), "trainr"),
    ("config-binary", with_file(b"\x00\xff\xfe garbage \x00"), "config"),
    ("resume-without-checkpoint-file", fresh("--resume", "/nonexistent/round_00001.ckpt"), "round_00001.ckpt"),
    ("resume-garbage-file", _garbage_checkpoint, "checkpoint"),
    ("run-dir-is-a-file", _run_dir_is_a_file, "afile"),
    ("unknown-subcommand", command("fitt", "--config", TINY), "fitt"),
    # -- resuming a finished run --------------------------------------------------------------------------------
    ("resume-changed-clients", resume("--data.num_clients", "6"), "data.num_clients: 8 -> 6"),
    ("resume-changed-lr", resume("--method.init_args.lr", "0.01"), "method.init_args.lr: 0.05 -> 0.01"),
    ("resume-changed-seed", resume("--seed", "7"), "seed: 0 -> 7"),
    ("resume-changed-method", resume("--method", "fedprox"), "method"),
    ("resume-changed-model", resume("--model.kwargs", "{hidden: 16}"), "model.kwargs"),
    ("resume-changed-store", resume("--trainer.client_state", "disk"), "trainer.client_state"),
    ("resume-changed-cohort", resume("--trainer.clients_per_round", "2"), "trainer.clients_per_round"),
    ("resume-changed-exactness", resume("--trainer.exact_reduction", "false"), "trainer.exact_reduction"),
    ("resume-changed-partition", resume("--data.partition.init_args.alpha", "5.0"), "alpha"),
    ("resume-changed-imbalance", resume("--data.imbalance_factor", "50"), "data.imbalance_factor"),
    ("resume-other-model-checkpoint", _other_model_checkpoint, "checkpoint"),
    ("resume-truncated-latest", _truncated_latest, "round_00001.ckpt"),
    ("resume-corrupt-partition-json", _bad_partition_json, "partition.json"),
    ("resume-other-partition-record", _other_partition_record, "client_sizes"),
    ("resume-locked-run-dir", _locked, "is in use by pid"),
    ("resume-bad-range", resume("--trainer.rounds", "0"), "rounds"),
    # -- other subcommands ----------------------------------------------------------------------------------------
    ("validate-missing-checkpoint", command("validate", "--config", TINY, "--run_dir", "{tmp}/nothing",
                                            "--ckpt_path", "{tmp}/nothing/round_00001.ckpt", *QUIET),
     "round_00001.ckpt"),
    ("validate-other-model-checkpoint", command("validate", "--config", TINY, "--model.kwargs", "{{hidden: 16}}",
                                                "--ckpt_path", "{run}/checkpoints/round_00002.ckpt", *QUIET),
     "checkpoint"),
    ("report-missing-folder", command("report", "{tmp}/no-runs"), "no-runs"),
    ("report-empty-folder", _empty_report, "run"),
    ("partition-bad-config", command("partition", "--config", TINY, "--data.num_clients", "0"), "num_clients"),
    ("sweep-bad-grid", _bad_sweep_grid, "grid"),
]


@pytest.mark.parametrize("case, build, needle", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_exits_2_with_a_message_and_changes_nothing(case, build, needle, finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    argv, watched = build(tmp_path, run)
    before = tree_hash(watched)
    existed = watched.exists()
    capsys.readouterr()
    try:
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse-level errors
            status = exc.code
        after = tree_hash(watched)
    finally:
        while _HELD:
            _HELD.pop().release()
    out, err = capsys.readouterr()
    assert status == 2, (status, out[-2000:], err[-2000:])
    assert needle in err, err[-2000:]
    assert "Traceback" not in out + err
    assert watched.exists() == existed
    assert after == before


def test_the_table_is_large():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_the_lock_is_an_os_lock(tmp_path):
    """(The premise of the locked-run-dir row: the lock is flock, which the OS drops with its holder.)"""
    import os

    from fedlt.engine.rundir import RunDirLock

    lock = RunDirLock(tmp_path)
    lock.acquire()
    fd = os.open(tmp_path, os.O_RDONLY)  # the lock is on the directory itself
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.release()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
