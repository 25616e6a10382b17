"""FedALA invariants: with W fixed at 1 it trains the FedAvg models bit for bit; the ALA initialisation is the hand
formula (lower tensors global, top tensors theta_k + (theta - theta_k) ⊙ W, W clipped to [0, 1]); W_k persists per
client (start phase once, then one epoch per round) and survives a checkpoint; the released code's options."""

from __future__ import annotations

import pytest
import torch
from helpers import global_copy, personal_predictions, run, tiny_data, tiny_sim

from fedlt.methods import FedAvg
from fedlt.methods.fedala import (
    FedALA,
    ala_combine,
    ala_subset,
    ala_weight_step,
    converged,
)
from fedlt.types import ClientContext

NET, W0, W1, LAST, LEARNED = "model.fedala.net.", "model.fedala.w0", "model.fedala.w1", "model.fedala.last_round", \
    "model.fedala.learned"


def _ala(**kwargs) -> FedALA:
    kwargs.setdefault("threshold", 0.05)  # a quicker start phase on the tiny data
    return FedALA(lr=0.05, batch_size=16, **kwargs)


def _ctx(sim, cid: int, round: int) -> ClientContext:
    """The client's context as the engine builds it, after ``sim.load_client(cid)``."""
    return ClientContext(client_id=cid, round=round, num_samples=sim._sizes[cid], class_counts=sim._class_counts[cid],
                         generator=torch.Generator().manual_seed(0), device=sim.device,
                         message=sim.reducer.broadcast(round), state={})


def _main(sim) -> dict[str, torch.Tensor]:
    """The workspace network's own tensors (without the per-client state), copied."""
    return {k: v.detach().clone() for k, v in sim.model.state_dict().items() if not k.startswith("fedala.")}


def test_weights_fixed_at_one_train_the_fedavg_models_bitwise():
    """eta = 0: W stays 1, theta_hat = theta^{t-1} exactly, and the W-learning passes (which still run, start phase
    included) change neither the data order, nor the dropout stream, nor the BatchNorm statistics."""
    data = tiny_data()
    for model, rounds in (("cnn", 3), ("resnet8", 2)):
        kw = {"model": model, "rounds": rounds, "clients_per_round": 6, "data": data}
        a, b = tiny_sim(_ala(eta=0.0, num_pre_loss=2), **kw), tiny_sim(FedAvg(lr=0.05, batch_size=16), **kw)
        ma, mb = run(a), run(b)
        assert [m["train/loss"] for m in ma] == [m["train/loss"] for m in mb]
        for k, v in global_copy(b).items():
            assert torch.equal(a.global_state[k], v), (model, k)
        assert set(a.global_state) == set(b.global_state)  # theta_k and W_k are never aggregated
        for cid in range(data.num_clients):
            stored = a.store.get(cid)
            assert int(stored[LEARNED]) == 1 and int(stored[LAST]) == rounds
            assert all(torch.equal(v, torch.ones_like(v)) for k, v in stored.items() if ".fedala.w" in k)


def test_ala_combination_and_weight_step_by_hand():
    local = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5, -1.0], [3.0, 0.0]]), torch.tensor([4.0, -4.0])]
    glob = [torch.tensor([9.0, 9.0]), torch.tensor([[1.5, 1.0], [1.0, 2.0]]), torch.tensor([0.0, 0.0])]
    w = [torch.tensor([[0.0, 0.5], [1.0, 0.25]]), torch.tensor([0.75, 1.0])]
    out = ala_combine(local, glob, w)
    assert torch.equal(out[0], glob[0])  # lower layers: the global values
    assert torch.equal(out[1], torch.tensor([[0.5, 0.0], [1.0, 0.5]]))  # 0.5 + 1 * 0, -1 + 2 * 0.5, 3 - 2, 0 + 2 / 4
    assert torch.equal(out[2], torch.tensor([1.0, 0.0]))  # 4 - 4 * 0.75, -4 + 4
    assert all(torch.equal(o, g) for o, g in zip(ala_combine(local, glob, [torch.ones(2, 2), torch.ones(2)]), glob))
    assert torch.equal(ala_combine(local, glob, [torch.zeros(2, 2), torch.zeros(2)])[2], local[2])
    # W <- clip(W - eta * grad ⊙ (global - local), 0, 1)
    weights = [torch.tensor([0.5, 0.5, 0.9, 0.1])]
    grad, diff = torch.tensor([1.0, -1.0, -2.0, 2.0]), torch.tensor([0.2, 0.2, 1.0, 1.0])
    ala_weight_step(weights, [grad], [diff], eta=1.0)
    assert torch.equal(weights[0], torch.tensor([0.3, 0.7, 1.0, 0.0]))  # the last two clipped
    ala_weight_step(weights, [None], [diff], eta=1.0)  # a tensor the loss did not reach keeps its W
    assert torch.equal(weights[0], torch.tensor([0.3, 0.7, 1.0, 0.0]))


class _Uploads(FedALA):
    """Records every client's uploaded (trained) model."""

    uploads: dict[int, dict[str, torch.Tensor]] = {}

    def on_client_end(self, ctx):
        update = super().on_client_end(ctx)
        self.uploads[ctx.client_id] = {k: v.detach().clone() for k, v in update.tensors.items()}
        return update


def test_the_stored_local_model_is_the_clients_trained_model():
    data = tiny_data()
    sim = tiny_sim(_Uploads(lr=0.05, batch_size=16, threshold=0.05), rounds=2, clients_per_round=3, data=data)
    for r in (1, 2):
        _Uploads.uploads = {}
        run(sim, r)
        for cid, upload in _Uploads.uploads.items():
            stored = sim.store.get(cid)
            assert int(stored[LAST]) == r
            assert upload.keys() == sim.global_state.keys()
            for k, v in upload.items():
                assert torch.equal(stored[NET + k], v), k


def test_local_initialisation_is_the_ala_of_the_stored_local_model():
    """Round 2 of a client: lower tensors = theta^1, top = theta_k + (theta^1 - theta_k) ⊙ W with the W it learned
    (in [0, 1], moved from ones)."""
    data = tiny_data()
    sim = tiny_sim(_ala(), rounds=2, clients_per_round=6, data=data)
    run(sim, 1)
    glob = global_copy(sim)
    names = [k for k, _ in sim.model.named_parameters() if not k.startswith("fedala.")]
    for cid in (0, 4):
        sim.load_client(cid)
        sim.method.on_client_start(_ctx(sim, cid, 2))
        w = sim.method.state.weights()
        assert all(((x >= 0) & (x <= 1)).all() for x in w) and any(not torch.equal(x, torch.ones_like(x)) for x in w)
        stored = sim.store.get(cid)
        local = [stored[NET + k] for k in names]
        expected = ala_combine(local, [glob[k] for k in names], w)
        got = dict(sim.model.named_parameters())
        for k in names[:-2]:
            assert torch.equal(got[k], glob[k]), k
        for k, e, lo, wk in zip(names[-2:], expected[-2:], local[-2:], w):
            torch.testing.assert_close(got[k], lo + (glob[k] - lo) * wk, rtol=0, atol=1e-6)
            assert torch.equal(got[k], e), k
            assert not torch.equal(got[k], glob[k]) and not torch.equal(got[k], lo)


class _Counting(FedALA):
    """Counts the forward passes of the ALA (in ``on_client_start``) per client and round."""

    calls: dict[tuple[int, int], int] = {}

    def on_client_start(self, ctx):
        hook = self.model.register_forward_hook(lambda *_: self.calls.__setitem__(
            (ctx.client_id, ctx.round), self.calls.get((ctx.client_id, ctx.round), 0) + 1))
        try:
            super().on_client_start(ctx)
        finally:
            hook.remove()


def test_start_phase_once_then_one_epoch_per_round_and_w_persists():
    data = tiny_data()
    sim = tiny_sim(_Counting(lr=0.05, batch_size=16, threshold=0.05), rounds=4, clients_per_round=6, data=data)
    _Counting.calls = {}
    weights = []
    for r in (1, 2, 3, 4):
        run(sim, r)
        weights.append({c: [sim.store.get(c)[k].clone() for k in (W0, W1)] for c in range(data.num_clients)})
    for cid in range(data.num_clients):
        batches = -(-int(0.8 * sim._sizes[cid]) // 16)  # the 80 % subset in batches of 16 (no single-sample tail)
        if int(0.8 * sim._sizes[cid]) % 16 == 1:
            batches -= 1
        assert (cid, 1) not in _Counting.calls  # round 1: no previous local model, no ALA
        assert _Counting.calls[(cid, 2)] >= 11 * batches and _Counting.calls[(cid, 2)] % batches == 0  # start phase
        assert _Counting.calls[(cid, 3)] == _Counting.calls[(cid, 4)] == batches  # one epoch from the stored W
        assert all(torch.equal(w, torch.ones_like(w)) for w in weights[0][cid])
        for before, after in zip(weights[1:], weights[2:]):
            assert any(not torch.equal(a, b) for a, b in zip(before[cid], after[cid]))
    assert any(not torch.equal(a, b) for a, b in zip(weights[-1][0], weights[-1][1]))  # per client


def test_each_round_learns_w_from_the_clients_stored_w():
    """Round 3 of a client continues from the W stored in round 2 (one epoch), not from ones: the W the engine stores
    after round 3 is the one learned from the stored W, and a restart from ones would give another one."""
    data = tiny_data()
    sim = tiny_sim(_ala(), rounds=3, clients_per_round=6, data=data)
    run(sim, 2)
    learned = {}
    for cid in (1, 5):
        sim.load_client(cid)
        assert int(sim.method.state.learned) == 1
        sim.method.on_client_start(_ctx(sim, cid, 3))
        learned[cid] = [w.clone() for w in sim.method.state.weights()]
        sim.load_client(cid)
        for w in sim.method.state.weights():
            w.fill_(1.0)
        sim.method.state.learned.zero_()
        sim.method.on_client_start(_ctx(sim, cid, 3))
        assert any(not torch.equal(a, b) for a, b in zip(learned[cid], sim.method.state.weights()))
    run(sim, 3)
    for cid, weights in learned.items():
        stored = sim.store.get(cid)
        assert torch.equal(stored[W0], weights[0]) and torch.equal(stored[W1], weights[1])


def test_checkpoint_round_trip_keeps_every_clients_state():
    data = tiny_data()
    a = tiny_sim(_ala(), rounds=3, clients_per_round=4, data=data)
    run(a, 2)
    state = a.state_dict()
    b = tiny_sim(_ala(), rounds=3, clients_per_round=4, data=data)
    b.load_state_dict(state)
    for cid in range(data.num_clients):
        sa, sb = a.store.get(cid), b.store.get(cid)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    run(a), run(b)
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k
    for cid in range(data.num_clients):
        sa, sb = a.store.get(cid), b.store.get(cid)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), cid
    assert a.evaluate() == pytest.approx(b.evaluate(), nan_ok=True)


def test_pm_is_the_trained_local_model_and_gm_the_global_model():
    data = tiny_data()
    sim = tiny_sim(_ala(), rounds=2, clients_per_round=3, data=data)
    run(sim)
    trained, x, gm, clients = personal_predictions(sim, LAST)
    for cid, pm in clients:
        if cid in trained:
            net = sim.method.state.net
            stored = sim.store.get(cid)
            assert all(torch.equal(v, stored[NET + k]) for k, v in net.state_dict().items())
            assert torch.equal(pm, net(x)) and not torch.equal(pm, gm)
        else:
            assert torch.equal(pm, gm)


def test_first_participation_starts_from_the_global_or_the_initial_model():
    data = tiny_data()
    init = None
    for first in ("global", "initial"):
        sim = tiny_sim(_ala(first_local=first), rounds=2, clients_per_round=2, data=data)
        init = init or global_copy(sim)
        run(sim, 1)
        fresh = next(c for c in range(data.num_clients) if int(sim.store.get(c).get(LAST, 0)) == 0)
        glob = global_copy(sim)
        sim.load_client(fresh)
        sim.method.on_client_start(_ctx(sim, fresh, 2))
        got = _main(sim)
        if first == "global":  # theta_hat = theta^1, W untouched
            assert all(torch.equal(got[k], v) for k, v in glob.items())
            assert int(sim.method.state.learned) == 0
        else:  # the code: ALA of theta^0 and theta^1 (start phase): lower tensors theta^1, top tensors in between
            names = [k for k, _ in sim.model.named_parameters() if not k.startswith("fedala.")]
            assert all(torch.equal(got[k], glob[k]) for k in names[:-2])
            w = sim.method.state.weights()
            for k, wk in zip(names[-2:], w):
                torch.testing.assert_close(got[k], init[k] + (glob[k] - init[k]) * wk, rtol=0, atol=1e-6)
            assert int(sim.method.state.learned) == 1


def test_subsets_random_and_window():
    indices = torch.arange(100, 150)
    g = torch.Generator().manual_seed(0)
    window = ala_subset(indices, 80.0, "window", g)
    assert window.numel() == 40 and torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 40))
    assert 100 <= int(window[0]) <= 110
    rand = ala_subset(indices, 80.0, "random", torch.Generator().manual_seed(0))
    assert rand.numel() == 40 and rand.unique().numel() == 40 and bool(((rand >= 100) & (rand < 150)).all())
    assert not torch.equal(rand.sort().values, torch.arange(100, 140))
    assert torch.equal(rand, ala_subset(indices, 80.0, "random", torch.Generator().manual_seed(0)))
    assert ala_subset(indices[:1], 80.0, "random", g).numel() == 0  # int(0.8 * 1) = 0: W is kept


def test_stopping_rule_is_the_std_of_the_last_losses():
    assert not converged([1.0] * 10, 10, 0.01)  # needs more than num_pre_loss losses
    assert converged([5.0] + [1.0] * 10, 10, 0.01)
    assert not converged([1.0] * 10 + [1.1], 10, 0.01)  # pstdev of nine 1.0 and one 1.1 = 0.03
    assert converged([1.0] * 10 + [1.1], 10, 0.05)


def test_adapted_pm_is_the_model_the_next_round_starts_from():
    """``personal_model="adapted"`` (the code's evaluation): under full participation the PM of a client is exactly
    the ALA initialisation of its next round, and evaluating stores nothing."""
    data = tiny_data()
    sim = tiny_sim(_ala(personal_model="adapted"), rounds=3, clients_per_round=6, data=data)
    run(sim, 2)
    before = {c: sim.store.get(c) for c in range(data.num_clients)}
    metrics = sim.evaluate()
    assert 0.0 <= metrics["test/personal/acc_mean"] <= 1.0
    for cid in (0, 3):
        sim.load_client(cid)
        sim.method.prepare_personal(cid)
        pm = _main(sim)
        stored = sim.store.get(cid)
        assert all(torch.equal(stored[k], v) for k, v in before[cid].items())  # nothing stored by the evaluation
        sim.load_client(cid)
        sim.method.on_client_start(_ctx(sim, cid, 3))
        nxt = _main(sim)
        assert all(torch.equal(pm[k], v) for k, v in nxt.items()), cid


def test_local_buffers_keep_the_clients_batchnorm_statistics():
    data = tiny_data()
    sim = tiny_sim(_ala(local_buffers=True), model="resnet8", rounds=2, clients_per_round=6, data=data)
    run(sim, 1)
    glob = global_copy(sim)
    sim.load_client(2)
    stored = sim.store.get(2)
    sim.method.on_client_start(_ctx(sim, 2, 2))
    got = _main(sim)
    buffers = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert buffers and all(torch.equal(got[k], stored[NET + k]) for k in buffers)
    assert any(not torch.equal(got[k], glob[k]) for k in buffers)
    default = tiny_sim(_ala(), model="resnet8", rounds=2, clients_per_round=6, data=data)
    run(default, 1)
    default.load_client(2)
    default.method.on_client_start(_ctx(default, 2, 2))
    got = _main(default)
    assert all(torch.equal(got[k], default.global_state[k]) for k in buffers)


def test_released_code_options_train_and_evaluate():
    sim = tiny_sim(_ala(**{**FedALA.released_code, "threshold": 0.1}), rounds=3, clients_per_round=3)
    for metrics in run(sim):
        assert metrics["train/loss"] > 0
    metrics = sim.evaluate()
    assert 0.0 <= metrics["test/personal/acc_mean"] <= 1.0 and 0.0 <= metrics["test/global/acc"] <= 1.0


def test_rejects_bad_arguments():
    for kwargs in ({"rand_percent": 0}, {"layer_idx": -1}, {"eta": -1.0}, {"subset": "all"},
                   {"personal_model": "global"}, {"first_local": "zero"}, {"threshold": 0.0, "max_start_epochs": None}):
        with pytest.raises(ValueError):
            FedALA(**kwargs)
    with pytest.raises(ValueError):
        tiny_sim(FedALA(layer_idx=99))
