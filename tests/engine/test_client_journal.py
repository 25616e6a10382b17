"""Incremental client-state checkpoints (``ClientJournal``): a checkpoint writes only the clients stored since the
previous one, reassembles to the full states, and pruning keeps every kept checkpoint's chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlt.cli import main
from fedlt.engine.checkpoint import ClientJournal, load_checkpoint, save_atomic

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _states(k: int, value: float) -> dict[int, dict[str, torch.Tensor]]:
    return {c: {"w": torch.full((64,), value + c)} for c in range(k)}


def test_deltas_hold_the_changed_clients_and_reassemble(tmp_path):
    journal = ClientJournal(tmp_path)
    states = _states(1000, 0.0)
    first = journal.record(1, states, dirty=set(range(1000)))
    assert first == {"base_round": 1, "files": ["base_r000001.pt"]}
    written = []
    for rnd in range(2, 12):
        for c in (rnd, rnd + 100):
            states[c] = {"w": torch.full((64,), float(rnd * 1000 + c))}
        manifest = journal.record(rnd, states, dirty={rnd, rnd + 100})
        written.append((tmp_path / manifest["files"][-1]).stat().st_size)
        got = ClientJournal.read(tmp_path, manifest)
        assert got.keys() == states.keys() and all(torch.equal(got[c]["w"], states[c]["w"]) for c in states)
    base = (tmp_path / "base_r000001.pt").stat().st_size
    assert max(written) < base / 50  # two clients of 1,000, plus file overhead
    assert manifest["files"][0] == "base_r000001.pt" and len(manifest["files"]) == 11
    # Nothing changed: the same chain, no file.
    assert journal.record(12, states, dirty=set()) == manifest


def test_a_new_base_when_the_deltas_outgrow_it_bounds_the_bytes_per_checkpoint(tmp_path):
    journal = ClientJournal(tmp_path)
    states = _states(20, 0.0)
    journal.record(1, states, dirty=set(range(20)))
    bases = []
    total = 0
    for rnd in range(2, 42):
        dirty = {rnd % 20, (rnd + 7) % 20}
        for c in dirty:
            states[c] = {"w": torch.full((64,), float(rnd))}
        manifest = journal.record(rnd, states, dirty)
        total += (tmp_path / manifest["files"][-1]).stat().st_size
        if len(manifest["files"]) == 1:
            bases.append(rnd)
        assert ClientJournal.read(tmp_path, manifest)[(rnd + 7) % 20]["w"][0] == rnd
    assert bases  # the chain was compacted into a new base
    delta = (tmp_path / f"delta_r{bases[0] + 1:06d}.pt").stat().st_size
    assert total / 40 <= 2.5 * delta  # about twice the changed clients' bytes per checkpoint, on average


def test_prune_keeps_the_chains_of_kept_checkpoints_and_drops_leftovers(tmp_path):
    journal = ClientJournal(tmp_path)
    states = _states(4, 0.0)
    manifests = {1: journal.record(1, states, set(range(4)))}
    for rnd in range(2, 6):
        states[0] = {"w": torch.full((64,), float(rnd))}
        manifests[rnd] = journal.record(rnd, states, {0})
    (tmp_path / ".delta_r000006.pt.tmp123").write_bytes(b"partial")
    journal.prune(oldest_base_round=manifests[4]["base_round"])
    for rnd in (4, 5):  # the kept checkpoints' chains are complete
        assert all((tmp_path / f).is_file() for f in manifests[rnd]["files"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    save_atomic({}, tmp_path / "base_r000009.pt")
    journal.prune(oldest_base_round=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_r000009.pt"]


def _fit(run: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, "--run_dir", str(run), "--method", "FedPer", "--trainer.rounds", "4",
                 "--trainer.client_state", "cpu", "--logging.wandb", "false", "--logging.progress_bar", "false",
                 *extra])


def test_a_run_writes_client_files_and_its_checkpoints_reassemble(tmp_path):
    run = tmp_path / "run"
    assert _fit(run, "--trainer.keep_checkpoints", "2") == 0
    clients = run / "checkpoints" / "clients"
    files = sorted(p.name for p in clients.iterdir())
    assert files[0].startswith("base_r") and all(f.startswith(("base_r", "delta_r")) for f in files)
    ckpt = load_checkpoint(run / "checkpoints" / "round_00004.ckpt")
    store = ckpt["simulator"]["store"]
    assert store["journal"]["files"] and store["states"]
    raw = torch.load(run / "checkpoints" / "round_00004.ckpt", weights_only=False)["simulator"]["store"]
    assert "states" not in raw  # the checkpoint file itself holds no client state
    # Every client trained so far has its personal head in the reassembled state.
    assert all(any(k.startswith("model.head.") for k in s) for s in store["states"].values())


def test_a_missing_client_file_is_a_clear_error_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(run, "--trainer.rounds", "2") == 0
    for p in (run / "checkpoints" / "clients").iterdir():
        p.unlink()
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
    assert _fit(run, "--trainer.rounds", "3", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "Traceback" not in err
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("store", ["memory", "cpu"])
def test_resume_continues_the_chain(tmp_path, store):
    run = tmp_path / "run"
    assert _fit(run, "--trainer.rounds", "2", "--trainer.client_state", store) == 0
    assert _fit(run, "--trainer.client_state", store, "--resume", "auto") == 0
    straight = tmp_path / "straight"
    assert _fit(straight, "--trainer.client_state", store) == 0
    resumed = load_checkpoint(run / "checkpoints" / "round_00004.ckpt")["simulator"]["store"]
    want = load_checkpoint(straight / "checkpoints" / "round_00004.ckpt")["simulator"]["store"]
    # The resumed run continued the chain it found: the same files as the uninterrupted run, the same states.
    assert resumed["journal"] == want["journal"] and len(want["journal"]["files"]) >= 2
    assert resumed["states"].keys() == want["states"].keys()
    for c, state in want["states"].items():
        assert all(torch.equal(resumed["states"][c][k], v) for k, v in state.items())


def test_a_large_base_is_written_in_parts(tmp_path, monkeypatch):
    import fedlt.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "PART_BYTES", 1000)  # 256-byte states: three clients per part
    journal = ClientJournal(tmp_path)
    states = _states(10, 0.0)
    manifest = journal.record(1, states, set(range(10)))
    assert manifest["files"] == [f"base_r000001_p{i}.pt" for i in range(4)]
    states[3] = {"w": torch.zeros(64)}
    manifest = journal.record(2, states, {3})
    got = ClientJournal.read(tmp_path, manifest)
    assert all(torch.equal(got[c]["w"], states[c]["w"]) for c in states)
    journal.prune(oldest_base_round=manifest["base_round"])  # the round-2 checkpoint needs every part
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(manifest["files"])
    journal.prune(oldest_base_round=2)  # once no kept checkpoint's chain starts before round 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta_r000002.pt"]
