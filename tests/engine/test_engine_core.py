"""Unit tests of the engine's pure parts: sharding, flat layouts, the client store, the reducer, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlt.engine.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints, save_atomic
from fedlt.engine.client_state import ClientStateStore
from fedlt.engine.params import FlatLayout
from fedlt.engine.sharding import assign_to_ranks, client_seed, sample_cohort
from fedlt.methods.base import Reducer
from fedlt.types import ClientUpdate


def test_sample_cohort_is_deterministic_sorted_and_distinct():
    a = sample_cohort(3, 7, 100, 10)
    assert a == sample_cohort(3, 7, 100, 10)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= c < 100 for c in a)
    assert a != sample_cohort(3, 8, 100, 10)
    assert sample_cohort(0, 1, 5, 10) == [0, 1, 2, 3, 4]


def test_sample_cohort_is_uniform():
    counts = np.zeros(20)
    for r in range(2000):
        counts[sample_cohort(0, r, 20, 5)] += 1
    expected = 2000 * 5 / 20
    assert np.all(np.abs(counts - expected) < 0.15 * expected)


def test_assign_to_ranks_balances_sizes_and_covers_cohort():
    sizes = [1000, 10, 10, 10, 500, 500, 20, 30]
    cohort = list(range(8))
    parts = assign_to_ranks(cohort, sizes, 2)
    assert sorted(c for p in parts for c in p) == cohort
    loads = [sum(sizes[c] for c in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 20  # round robin would give 1530 vs 550
    assert assign_to_ranks(cohort, sizes, 1) == [cohort]
    assert assign_to_ranks([3], sizes, 4)[1:] == [[], [], []]


def test_client_seed_depends_on_round_and_client_only():
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2)
    assert len({client_seed(0, r, c) for r in range(5) for c in range(5)}) == 25
    assert client_seed(1, 1, 2) != client_seed(0, 1, 2)


def test_flat_layout_roundtrip():
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4), "c": torch.randn(1, 1, 2)}
    layout = FlatLayout.of({k: v.shape for k, v in tensors.items()})
    buf = layout.flatten(tensors, torch.empty(layout.numel))
    assert layout.numel == 12
    for k, v in layout.views(buf).items():
        assert torch.equal(v, tensors[k])


@pytest.mark.parametrize("mode", ["memory", "cpu", "disk"])
def test_client_store_roundtrip(mode, tmp_path):
    store = ClientStateStore(mode, "cpu", tmp_path / "s")
    assert store.get(3) == {}
    w = torch.randn(3, 2)
    store.put(3, {"w": w})
    w.add_(1.0)  # the store keeps a copy
    got = store.get(3)
    assert torch.allclose(got["w"] + 1.0, w) and 3 in store and 4 not in store
    restored = ClientStateStore(mode, "cpu", tmp_path / "s")
    restored.load_state_dict(store.state_dict())
    assert torch.equal(restored.get(3)["w"], got["w"])


@pytest.mark.parametrize("mode", ["memory", "cpu", "disk"])
def test_client_store_stacks_clients_with_defaults(mode, tmp_path):
    store = ClientStateStore(mode, "cpu", tmp_path / "s")
    store.put(2, {"w": torch.full((2,), 2.0)})
    store.put(5, {"w": torch.full((2,), 5.0), "other": torch.ones(1)})
    store.put(6, {"other": torch.ones(1)})
    assert store.holding([5, 0, 2, 6], ["w"]) == [True, False, True, False]
    got = store.stack([5, 0, 2, 6], ["w"], {"w": torch.full((2,), -1.0)})
    assert got["w"].tolist() == [[5.0, 5.0], [-1.0, -1.0], [2.0, 2.0], [-1.0, -1.0]]


def test_client_store_rejects_unknown_mode():
    with pytest.raises(ValueError, match="valid modes"):
        ClientStateStore("gpu")


def test_reducer_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    glob = {"w": torch.zeros(3, 2), "n": torch.zeros((), dtype=torch.long)}
    red = Reducer()
    red.setup(glob, torch.device("cpu"))
    red.begin_round(1)
    ws = [rng.normal(size=(3, 2)) for _ in range(3)]
    weights = [5.0, 1.0, 14.0]
    for w, n in zip(ws, weights):
        red.accumulate(ClientUpdate(0, n, {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(7)}))
    red.reduce(None)
    red.server_step(1)
    expected = sum(n * w for w, n in zip(ws, weights)) / sum(weights)
    np.testing.assert_allclose(glob["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(glob["n"]) == 7


def test_reducer_without_clients_keeps_global():
    glob = {"w": torch.ones(2)}
    red = Reducer()
    red.setup(glob, torch.device("cpu"))
    red.begin_round(1)
    red.reduce(None)
    red.server_step(1)
    assert torch.equal(glob["w"], torch.ones(2))


def test_checkpoints_are_atomic_listed_and_pruned(tmp_path):
    for r in (1, 2, 3):
        save_atomic({"round": r}, checkpoint_path(tmp_path, r))
    assert latest_checkpoint(tmp_path).name == "round_00003.ckpt"
    prune_checkpoints(tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round_00002.ckpt", "round_00003.ckpt"]  # no temporary file left behind
    assert latest_checkpoint(tmp_path / "missing") is None


def test_disk_store_reads_the_versions_of_the_resumed_round(tmp_path):
    """A put in round r writes version r; after a resume at round R, versions of later rounds (left by a killed
    process) are never read, and versions no kept checkpoint can need are removed."""
    store = ClientStateStore("disk", "cpu", tmp_path / "s")
    for r in (1, 2, 3):
        store.begin_round(r)
        store.put(5, {"w": torch.full((2,), float(r))})
    assert float(store.get(5)["w"][0]) == 3.0
    resumed = ClientStateStore("disk", "cpu", tmp_path / "s")
    resumed.load_state_dict({"mode": "disk", "round": 2})  # the checkpoint of round 2; round 3 was never committed
    assert float(resumed.get(5)["w"][0]) == 2.0
    assert resumed.discard_after(2) == 1
    resumed.begin_round(3)
    assert float(resumed.get(5)["w"][0]) == 2.0  # the rerun of round 3 starts from round 2's state
    resumed.retain_from(2)
    resumed.put(5, {"w": torch.full((2,), 30.0)})
    assert float(resumed.get(5)["w"][0]) == 30.0
    assert sorted(p.name for p in (tmp_path / "s" / "client_000005").iterdir()) == ["r000002.pt", "r000003.pt"]
    with pytest.raises(ValueError, match="client store"):
        resumed.load_state_dict({"mode": "cpu", "states": {}})
