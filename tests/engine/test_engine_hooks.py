"""The engine hooks for methods: a second client pass after aggregation and a method-chosen cohort sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from helpers import global_copy, run, tiny_sim  # noqa: E402

from fedlt.methods import FedPer  # noqa: E402
from fedlt.types import ClientContext  # noqa: E402


class _Recording(FedPer):
    """FedPer whose second pass writes a marker into the personal head: the new global state and the client's
    own personal state must both be loaded at that point."""

    runs_after_aggregation = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def after_aggregation(self, ctx: ClientContext, indices: torch.Tensor) -> None:
        shared = {k: v.detach().clone() for k, v in self.shared_tensors.items()}
        self.seen.append((ctx.round, ctx.client_id, shared))
        with torch.no_grad():
            self.model.head.bias.fill_(float(ctx.client_id + 100 * ctx.round))
        ctx.state["marker"] = torch.tensor([float(ctx.round)])

    def client_state_template(self) -> dict[str, torch.Tensor]:
        return {"marker": torch.zeros(1)}

    def cohort_sampler(self):
        def everyone_first(seed, round, num_clients, m):
            return list(range(num_clients)) if round == 1 else list(range(m))
        return everyone_first


def test_second_pass_sees_the_new_global_state_and_its_writes_are_stored() -> None:
    method = _Recording(lr=0.05, batch_size=16)
    sim = tiny_sim(method, rounds=2, clients_per_round=2)
    run(sim, 1)
    assert [cid for r, cid, _ in method.seen] == list(range(sim.data.num_clients))  # round 1: everyone
    after_round = global_copy(sim)
    for _, _, shared in method.seen:
        for k, v in shared.items():
            assert torch.equal(v, after_round[k]), k  # the aggregated state of round 1, not the client's upload
    for cid in range(sim.data.num_clients):
        stored = sim.store.get(cid)
        assert torch.all(stored["model.head.bias"] == cid + 100)
        assert stored["marker"].item() == 1.0
    method.seen.clear()
    run(sim, 2)
    assert [cid for _, cid, _ in method.seen] == [0, 1]  # round 2: the method's sampler, m = 2
    assert torch.all(sim.store.get(0)["model.head.bias"] == 200)
    assert torch.all(sim.store.get(5)["model.head.bias"] == 105)  # not in round 2's cohort: unchanged


def test_without_the_hook_nothing_runs_twice() -> None:
    method = FedPer(lr=0.05, batch_size=16)
    sim = tiny_sim(method, rounds=1, clients_per_round=2)
    assert not method.runs_after_aggregation and method.cohort_sampler() is None
    (metrics,) = run(sim)
    assert len(sim.store.state_dict()["states"]) == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
