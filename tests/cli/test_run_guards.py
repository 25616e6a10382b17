"""Run-directory guards: a resume refuses a config that would change the result, one process per run directory
(an OS lock), nothing written before the input is valid, and stale temporary files removed at start."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlt.cli import main
from fedlt.engine.rundir import RunDirLock, config_changes

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _fit(run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run_dir), *extra])


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256): 'unchanged' means this map is equal."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-round tiny run (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("guards") / "run"
    assert _fit(run, "--trainer.rounds", "1", "--logging.wandb", "false") == 0
    return run


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_resume_with_a_changed_config_is_refused_and_changes_nothing(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    before = tree_hash(run)
    status = _fit(run, "--resume", "auto", "--trainer.rounds", "2", "--data.num_clients", "6",
                  "--method.init_args.lr", "0.01", "--logging.wandb", "false")
    err = capsys.readouterr().err
    assert status == 2
    assert "data.num_clients: 8 -> 6" in err and "method.init_args.lr: 0.05 -> 0.01" in err, err
    assert "trainer.rounds:" not in err  # an allowed change is not listed as a problem
    assert tree_hash(run) == before


def test_a_resume_with_an_allowed_change_logs_it_and_never_rewrites_the_run_files(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    config, partition = (run / "config.yaml").read_bytes(), (run / "partition.json").read_bytes()
    assert _fit(run, "--resume", "auto", "--trainer.rounds", "2", "--logging.wandb", "false",
                "--logging.project", "elsewhere") == 0
    assert (run / "config.yaml").read_bytes() == config and (run / "partition.json").read_bytes() == partition
    (entry,) = [json.loads(line) for line in (run / "resume_log.jsonl").read_text().splitlines()]
    assert entry["round"] == 1
    changes = entry["changes"]
    assert changes.pop("run_dir") == [str(trained), str(run)]  # the test moved the run; a resume records it
    assert changes == {"trainer.rounds": [1, 2], "logging.project": ["fedlt", "elsewhere"]}
    assert json.loads((run / "final.json").read_text())["rounds"] == [1, 2]


def test_config_changes_splits_allowed_from_refused():
    old = "trainer: {rounds: 5, devices: 1, eval_every: 1}\nlogging: {project: a}\nmethod: {init_args: {lr: 0.1}}\n"
    new = "trainer: {rounds: 9, devices: 4, eval_every: 2}\nlogging: {project: b}\nmethod: {init_args: {lr: 0.1}}\n"
    allowed, refused = config_changes(old, new)
    assert allowed == {"trainer.rounds": (5, 9), "trainer.devices": (1, 4), "logging.project": ("a", "b")}
    assert refused == {"trainer.eval_every": (1, 2)}


def test_a_setting_added_later_resumes_at_its_old_behaviour_only():
    """A checkpoint from before ``trainer.vectorize_cohort`` existed resumes with the setting off (what fedlt did
    then), not with it on."""
    old = "trainer: {rounds: 5}\n"
    assert config_changes(old, "trainer: {rounds: 5, vectorize_cohort: false}\n") == ({}, {})
    assert config_changes(old, "trainer: {rounds: 5, vectorize_cohort: true}\n")[1] == {
        "trainer.vectorize_cohort": (None, True)}


def test_a_second_process_on_a_held_run_directory_exits_2_naming_the_holder(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    lock = RunDirLock(run).acquire()
    try:
        before = tree_hash(run)
        assert _fit(run, "--resume", "auto", "--trainer.rounds", "2", "--logging.wandb", "false") == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "in use" in err, err
        assert tree_hash(run) == before
        fresh = tmp_path / "fresh"
        fresh_lock = RunDirLock(fresh).acquire()
        assert _fit(fresh, "--seed", "1", "--logging.wandb", "false") == 2
        assert "in use" in capsys.readouterr().err
        assert sorted(p.name for p in fresh.iterdir()) == [".lock"]  # seed 1 wrote nothing into seed 0's dir
        fresh_lock.release()
    finally:
        lock.release()


def test_a_dead_holders_lock_is_released_by_the_os(tmp_path):
    run = tmp_path / "run"
    code = f"from fedlt.engine.rundir import RunDirLock; RunDirLock({str(run)!r}).acquire(); print('held', flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="in use by pid"):
        RunDirLock(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    deadline = time.time() + 10
    lock = None
    while lock is None and time.time() < deadline:
        try:
            lock = RunDirLock(run).acquire()
        except Exception:
            time.sleep(0.05)
    assert lock is not None and lock.held  # the stale .lock note did not block it
    lock.release()


@pytest.mark.parametrize("args, needle", [
    (["--trainer.rounds", "0"], "rounds"),
    (["--trainer.rounds", "-3"], "rounds"),
    (["--trainer.eval_every", "-1"], "eval_every"),
    (["--trainer.clients_per_round", "0"], "clients_per_round"),
    (["--trainer.devices", "0"], "devices"),
    (["--trainer.checkpoint_every", "-1"], "checkpoint_every"),
    (["--trainer.round", "5"], "trainer.round"),  # no prefix abbreviation of --trainer.rounds
])
def test_out_of_range_values_exit_2_before_anything_is_created(tmp_path, capsys, args, needle):
    run = tmp_path / "run"
    assert _fit(run, *args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not run.exists()
    assert not (tmp_path / "wandb").exists()


def test_stale_temporary_files_are_removed_at_start(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    stale = [run / "checkpoints" / ".round_00002.ckpt.tmp4242", run / "partition.json.4242.tmp",
             run / ".environment.json.4242.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    assert _fit(run, "--resume", "auto", "--trainer.rounds", "2", "--logging.wandb", "false") == 0
    assert not any(p.exists() for p in stale)
    assert (run / "checkpoints" / "round_00002.ckpt").is_file()


def _popen_fit(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedlt", "fit", "--config", TINY, "--run_dir", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _nan_message(text: str) -> tuple[int, int]:
    import re

    m = re.search(r"non-finite training loss in round (\d+) \(client (\d+)", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def test_the_nan_report_names_the_first_bad_cohort_client_the_same_with_two_ranks(tmp_path, capsys):
    from fedlt.engine.sharding import sample_cohort

    args = ("--trainer.rounds", "3", "--method.init_args.lr", "1e12", "--logging.wandb", "false",
            "--trainer.clients_per_round", "4")
    assert _fit(tmp_path / "one", *args) == 2
    err = capsys.readouterr().err
    rnd, client = _nan_message(err)
    assert client in sample_cohort(0, rnd, 8, 4)
    if rnd == 1:
        assert "No checkpoint exists yet and none was written" in err
        assert not (tmp_path / "one" / "checkpoints").exists()
    else:
        assert f"round_{rnd - 1:05d}.ckpt, is kept" in err
    p = _popen_fit(tmp_path / "two", *args, "--trainer.devices", "2")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and "Traceback" not in out, out
    assert _nan_message(out) == (rnd, client)


def test_sigterm_during_start_up_exits_3_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    p = _popen_fit(run, "--logging.wandb", "false")
    time.sleep(1.0)  # inside the imports of torch and Lightning: the command line's handler is already there
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 3, out
    assert "preempted" in out and not run.exists()


@pytest.mark.parametrize("args, needle", [
    (["--model.kwargs", "{bogus: 1}"], "has no argument 'bogus'"),
    (["--trainer.accelerator", "gpu"], "no CUDA GPU is visible"),
])
def test_bad_model_arguments_and_a_missing_gpu_exit_2(tmp_path, capsys, args, needle):
    import torch

    if "gpu" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert _fit(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (needs root and a mount namespace that allows it; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_exits_2_naming_the_file_and_leaves_no_partial_file(small_disk):
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 150 * 1024))  # room for about two checkpoints
    run = small_disk / "run"
    p = _popen_fit(run, "--trainer.rounds", "30", "--logging.wandb", "false", "--logging.progress_bar", "false")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and "Traceback" not in out, out
    assert "No space left on device" in out and "MiB needed" in out and "checkpoints/round_" in out, out
    assert not [x for x in run.rglob("*") if "tmp" in x.name]
    assert list_checkpoints_of(run)  # the checkpoints that fitted are intact and resumable


def list_checkpoints_of(run: Path) -> list[int]:
    from fedlt.engine.checkpoint import list_checkpoints, load_checkpoint

    rounds = [r for r, _ in list_checkpoints(run)]
    for _, path in list_checkpoints(run):
        assert load_checkpoint(path)["simulator"]["round"] in rounds
    return rounds


def test_yaml_errors_name_the_file_and_line_and_an_empty_config_says_so(tmp_path, capsys):
    bad, empty = tmp_path / "bad.yaml", tmp_path / "empty.yaml"
    bad.write_text("trainer:\n  rounds: 3\n  eval_every: [1\n")
    empty.write_text("# nothing here\n\n")
    assert main(["fit", "--config", TINY, "--config", str(bad), "--run_dir", str(tmp_path / "run")]) == 2
    assert f"config file {bad}, line 4, column 1: not valid YAML" in capsys.readouterr().err
    assert main(["fit", "--config", TINY, "--config", str(empty), "--run_dir", str(tmp_path / "run")]) == 2
    assert f"config file {empty} is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_truncated_latest_checkpoint_names_the_newest_intact_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(run, "--trainer.rounds", "3", "--trainer.keep_checkpoints", "0", "--logging.wandb", "false") == 0
    latest = run / "checkpoints" / "round_00003.ckpt"
    latest.write_bytes(latest.read_bytes()[:1000])
    before = tree_hash(run)
    capsys.readouterr()
    assert _fit(run, "--trainer.rounds", "4", "--resume", "auto", "--logging.wandb", "false") == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "newest intact checkpoint is" in err and "round_00002.ckpt" in err, err
    assert tree_hash(run) == before


def test_wandb_that_cannot_write_disables_itself_with_one_warning(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").write_text("a plain file where W&B wants its folder")
    assert _fit(run, "--logging.wandb", "true", "--logging.wandb_mode", "offline") == 0
    err = capsys.readouterr().err
    assert err.count("W&B is disabled for this run") == 1 and "Traceback" not in err, err
    assert json.loads((run / "final.json").read_text())["rounds"] == [1, 2]
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 rounds
