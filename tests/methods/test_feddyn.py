"""Invariants of FedDyn (fedlt/methods/feddyn.py): the server state h and the global model by hand over two rounds,
the clients' gradient state, the checkpoint round trip and the released code's options."""

from __future__ import annotations

import pytest
import torch
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.methods.feddyn import _G, _LAST, FedDyn
from fedlt.types import ClientContext

ALPHA = 0.1


def _round(sim, r: int):
    """One round driven by hand (as Simulator.run_round): returns theta^{t-1}, the cohort and each client's model
    and gradient state before the round (float64 copies)."""
    x = {k: v.double() for k, v in global_copy(sim).items()}
    cohort = list(sim.cohort_sampler(sim.seed, r, sim.data.num_clients, sim.clients_per_round))
    before = {cid: {k: v.double().clone() for k, v in sim.store.get(cid).items()} for cid in cohort}
    message = sim.reducer.broadcast(r)
    sim.reducer.begin_round(r)
    sim.store.begin_round(r)
    sim.method.begin_round(r)
    models = {}
    for cid in cohort:
        sim.train_client(cid, message)
        models[cid] = {k: v.detach().double().clone() for k, v in sim.method.shared_tensors.items()}
    sim.reducer.reduce(None)
    sim.reducer.server_step(r)
    sim.round = r
    return x, cohort, models, before


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6, msg=what)


def test_server_state_global_model_and_client_state_by_hand_over_two_rounds():
    sim = tiny_sim(FedDyn(alpha=ALPHA, lr=0.05, batch_size=16, local_steps=3), rounds=2, clients_per_round=4)
    m = sim.data.num_clients
    keys = list(sim.reducer.h)
    assert keys and set(keys) == {k for k, p in sim.model.named_parameters()}  # cnn: every parameter, no buffers
    h = {k: torch.zeros_like(sim.global_state[k], dtype=torch.float64) for k in keys}
    g: dict[int, dict[str, torch.Tensor]] = {}
    cohorts = []
    for r in (1, 2):
        x, cohort, models, before = _round(sim, r)
        cohorts.append(cohort)
        for cid in cohort:  # the state the client started from: none the first time, else last round's
            for k in keys:
                if cid in g:
                    _close(before[cid][_G + k], g[cid][k], f"round {r}: g_{cid}[{k}] before")
                else:
                    assert _G + k not in before[cid]
        # Hand computation: g_k -= alpha (theta_k - theta^{t-1}); h -= (alpha/m) sum_P (theta_k - theta^{t-1});
        # theta^t = (1/|P|) sum_P theta_k - h/alpha (the uniform mean over the cohort, m = all clients).
        for cid in cohort:
            g[cid] = {k: g.get(cid, {}).get(k, torch.zeros_like(h[k])) - ALPHA * (models[cid][k] - x[k]) for k in keys}
        for k in keys:
            h[k] = h[k] - ALPHA / m * sum(models[cid][k] - x[k] for cid in cohort)
            mean = sum(models[cid][k] for cid in cohort) / len(cohort)
            _close(sim.reducer.h[k], h[k], f"round {r}: h[{k}]")
            _close(sim.global_state[k], mean - h[k] / ALPHA, f"round {r}: theta[{k}]")
            assert h[k].abs().sum() > 0
        for cid in range(m):
            stored = sim.store.get(cid)
            if cid not in g:
                assert stored == {}
                continue
            for k in keys:
                _close(stored[_G + k], g[cid][k], f"round {r}: g_{cid}[{k}]")
    assert set(cohorts[0]) & set(cohorts[1]), "a client returns in round 2 (its linear term is non-zero)"
    assert len(cohorts[0]) < m  # partial participation: 1/m and 1/|P| differ


def test_round_two_objective_uses_the_stored_gradient_state():
    sim = tiny_sim(FedDyn(alpha=ALPHA, lr=0.05, batch_size=16), rounds=2, clients_per_round=4)
    run(sim, 1)
    cid = next(c for c in range(sim.data.num_clients) if sim.store.get(c))
    msg = sim.reducer.broadcast(2)
    ctx = ClientContext(cid, 2, 10, torch.ones(sim.data.num_classes), torch.Generator(), torch.device("cpu"), msg,
                        sim.load_client(cid))
    method = sim.method
    method.on_client_start(ctx)
    params = dict(method.model.named_parameters())
    with torch.no_grad():  # move away from theta^{t-1} so that the quadratic term is non-zero
        for p in params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    term, value = method.penalty()
    grads = torch.autograd.grad(term, list(params.values()))
    expected_value = 0.0
    for (k, p), grad in zip(params.items(), grads):
        g_k = sim.store.get(cid)[_G + k]
        # d/dtheta [(alpha/2)||theta - theta^{t-1}||^2 - <g_k, theta>] = alpha (theta - theta^{t-1}) - g_k
        torch.testing.assert_close(grad, ALPHA * (p - msg.state[k]) - g_k, rtol=1e-5, atol=1e-7)
        expected_value += float(0.5 * ALPHA * (p - msg.state[k]).pow(2).sum() - (g_k * p).sum())
        assert g_k.abs().sum() > 0
    assert float(value) == pytest.approx(expected_value, rel=1e-5)


def test_checkpoint_round_trip_restores_h_and_the_client_states():
    data = tiny_data()
    a = tiny_sim(FedDyn(alpha=ALPHA, lr=0.05, batch_size=16), data=data, rounds=3, clients_per_round=4)
    run(a, 2)
    state = a.state_dict()
    b = tiny_sim(FedDyn(alpha=ALPHA, lr=0.05, batch_size=16), data=data, rounds=3, clients_per_round=4)
    b.load_state_dict(state)
    assert b.round == 2
    for k, v in a.reducer.h.items():
        assert torch.equal(b.reducer.h[k], v) and v.abs().sum() > 0, k
    for cid in range(a.data.num_clients):
        mine, theirs = a.store.get(cid), b.store.get(cid)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(theirs[k], v) for k, v in mine.items())
    run(a), run(b)  # round 3 continues identically
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k
    for k, v in a.reducer.h.items():
        assert torch.equal(b.reducer.h[k], v), k


def test_adaptive_alpha_scales_by_relative_data_size_in_the_client_only():
    sim = tiny_sim(FedDyn(alpha=ALPHA, adaptive_alpha=True, lr=0.05, batch_size=16, local_steps=2), rounds=1,
                   clients_per_round=4)
    sizes = [int(i.numel()) for i in sim.data.client_indices]
    assert len(set(sizes)) > 1
    x, cohort, models, _ = _round(sim, 1)
    m = sim.data.num_clients
    for cid in cohort:
        alpha_k = ALPHA / (sizes[cid] * m / sum(sizes))  # the code's alpha / weight_list[k]
        assert sim.method.client_alpha(sizes[cid]) == pytest.approx(alpha_k, rel=1e-12)
        for k in sim.reducer.h:
            _close(sim.store.get(cid)[_G + k], -alpha_k * (models[cid][k] - x[k]), f"g_{cid}[{k}]")
    for k, h in sim.reducer.h.items():  # the server's h keeps the global alpha
        _close(h, -ALPHA / m * sum(models[c][k] - x[k] for c in cohort), f"h[{k}]")


def test_quadratic_as_weight_decay_is_the_same_update_unless_clipping_is_active():
    data = tiny_data()
    common = {"alpha": 0.5, "lr": 0.05, "batch_size": 16, "weight_decay": 1e-3}
    sims = [tiny_sim(FedDyn(quadratic_as_weight_decay=q, **common), data=data, rounds=2) for q in (False, True)]
    metrics = [run(s) for s in sims]
    for k, v in sims[0].global_state.items():
        torch.testing.assert_close(sims[1].global_state[k], v, rtol=1e-4, atol=1e-5)
    # the logged objective is the same quantity in both forms
    assert metrics[1][-1]["train/loss_dyn"] == pytest.approx(metrics[0][-1]["train/loss_dyn"], rel=1e-3, abs=1e-5)
    clipped = [tiny_sim(FedDyn(quadratic_as_weight_decay=q, grad_clip=0.05, **common), data=data, rounds=2)
               for q in (False, True)]
    run(clipped[0]), run(clipped[1])
    assert any(not torch.allclose(clipped[1].global_state[k], v, rtol=1e-4, atol=1e-5)
               for k, v in clipped[0].global_state.items())


def test_eval_models_cohort_mean_and_all_mean_by_hand():
    data = tiny_data()
    for eval_model in ("cohort_mean", "all_mean"):
        sim = tiny_sim(FedDyn(alpha=ALPHA, eval_model=eval_model, lr=0.05, batch_size=16, local_steps=2),
                       data=data, rounds=2, clients_per_round=3)
        m = sim.data.num_clients
        theta0 = {k: v.double() for k, v in global_copy(sim).items()}
        latest = {cid: theta0 for cid in range(m)}  # a client never trained counts with theta^0
        for r in (1, 2):
            _, cohort, models, _ = _round(sim, r)
            for cid in cohort:
                latest[cid] = models[cid]
            for k, v in sim.reducer.eval_params.items():
                if eval_model == "cohort_mean":
                    expected = sum(models[c][k] for c in cohort) / len(cohort)
                else:
                    expected = sum(latest[c][k] for c in range(m)) / m
                _close(v, expected, f"{eval_model} round {r}: {k}")
                assert not torch.allclose(v, sim.global_state[k])  # not theta^t
        trained = {c for c in range(m) if latest[c] is not theta0}
        assert 0 < len(trained) < m  # the mean over all clients includes theta^0 for the untrained ones
        for cid in range(m):  # all_mean: every trained client keeps its latest model
            stored = sim.store.get(cid)
            for k in sim.reducer.eval_params:
                if eval_model == "all_mean" and cid in trained:
                    _close(stored[_LAST + k], latest[cid][k], f"latest model of client {cid}: {k}")
                else:
                    assert _LAST + k not in stored
        # GM (and PM) predict with the evaluated parameters, not the broadcast model.
        sim.load_global()
        sim.model.eval()
        xb = sim.data.get_batch(sim.data.test, torch.arange(8), None, train=False)[0]
        with torch.no_grad():
            got = sim.method.predict_global(xb)
            for k, p in sim.model.named_parameters():
                p.copy_(sim.reducer.eval_params[k])
            want = sim.model(xb)
            sim.load_global()
            assert not torch.allclose(sim.model(xb), want)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(sim.method.predict_personal(xb, 0), want)
        assert 0.0 <= sim.evaluate()["test/global/acc"] <= 1.0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        FedDyn(alpha=0.0)
    with pytest.raises(ValueError):
        FedDyn(eval_model="avg")
    FedDyn(**FedDyn.released_code)
