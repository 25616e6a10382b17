"""Invariants of FedNova (fedlt/methods/fednova.py): FedAvg with equal local steps, the normalized aggregation by hand
with unequal steps (vanilla, momentum and proximal SGD), and the released code's tau_eff."""

from __future__ import annotations

import pytest
import torch
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg
from fedlt.methods.fednova import FedNova
from fedlt.models import build_model


def _round(sim, r: int):
    """One round driven by hand: theta^t, the cohort, each client's model, step count and the method's a_k."""
    x = {k: v.double() for k, v in global_copy(sim).items()}
    cohort = list(sim.cohort_sampler(sim.seed, r, sim.data.num_clients, sim.clients_per_round))
    message = sim.reducer.broadcast(r)
    sim.reducer.begin_round(r)
    sim.store.begin_round(r)
    sim.method.begin_round(r)
    models, steps, a = {}, {}, {}
    for cid in cohort:
        _, steps[cid] = sim.train_client(cid, message)
        a[cid] = sim.method._a
        models[cid] = {k: v.detach().double().clone() for k, v in sim.method.shared_tensors.items()}
    sim.reducer.reduce(None)
    sim.reducer.server_step(r)
    sim.round = r
    return x, cohort, models, steps, a


def _closed_form_a(tau: int, rho: float = 0.0, lr_mu: float = 0.0) -> float:
    if rho:
        return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
    if lr_mu:
        return (1 - (1 - lr_mu) ** tau) / lr_mu
    return float(tau)


@pytest.mark.parametrize("model", ["cnn", "resnet8"])  # resnet8: BatchNorm statistics (p_k-weighted, as FedAvg)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
def test_equal_local_steps_is_fedavg_bit_for_bit(momentum, model):
    data = tiny_data()
    kwargs = {"lr": 0.05, "batch_size": 16, "local_steps": 4, "momentum": momentum}
    a = tiny_sim(FedAvg(**kwargs), data=data, model=model, rounds=2)
    b = tiny_sim(FedNova(**kwargs), data=data, model=model, rounds=2)
    before = global_copy(b)
    metrics = run(a), run(b)
    assert metrics[1][-1]["train/tau_eff"] == pytest.approx(_closed_form_a(4, momentum), rel=1e-12)
    assert [m["train/loss"] for m in metrics[0]] == [m["train/loss"] for m in metrics[1]]
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k
    assert all(not torch.equal(before[k], v) for k, v in a.global_state.items() if v.is_floating_point())


def test_equal_client_sizes_at_fixed_epochs_is_fedavg_bit_for_bit():
    """local_epochs over equal client sizes: every tau_k (and a_k) is the same, the reference client's too."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 32, generator=g), torch.randint(0, 4, (96,), generator=g)
    sims = []
    for method in (FedAvg(lr=0.1, batch_size=10, local_epochs=2, momentum=0.5),
                   FedNova(lr=0.1, batch_size=10, local_epochs=2, momentum=0.5)):
        data = FederatedDataset.from_tensors(x, y, x[:8], y[:8], list(torch.arange(96).chunk(4)), num_classes=4)
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=4, in_features=32)
        sims.append(Simulator(None, data, model, method, rounds=2, clients_per_round=3, client_state="memory").setup())
    run(sims[0]), run(sims[1])
    assert sims[1].reducer.reference_a == pytest.approx(_closed_form_a(2 * 3, 0.5), rel=1e-12)  # 24 samples: 3 batches
    for k, v in sims[0].global_state.items():
        assert torch.equal(sims[1].global_state[k], v), k


def _hand_update(x, cohort, models, sizes, a_of, tau_eff_of=None):
    """theta^t - tau_eff sum_k p_k (theta^t - theta_k) / a_k, p_k = n_k / sum_S n (float64)."""
    total = sum(sizes[c] for c in cohort)
    p = {c: sizes[c] / total for c in cohort}
    tau_eff = sum(p[c] * (tau_eff_of or a_of)[c] for c in cohort)
    out = {}
    for k in models[cohort[0]]:
        if not x[k].is_floating_point():
            continue
        out[k] = x[k] - tau_eff * sum(p[c] * (x[k] - models[c][k]) / a_of[c] for c in cohort)
    return out, tau_eff


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9], ids=["sgd", "momentum0.5", "momentum0.9"])
def test_unequal_steps_match_the_normalized_aggregation_by_hand(momentum):
    sim = tiny_sim(FedNova(lr=0.05, batch_size=16, local_epochs=1, momentum=momentum), rounds=2, clients_per_round=4)
    sizes = [int(i.numel()) for i in sim.data.client_indices]
    for r in (1, 2):
        x, cohort, models, steps, a = _round(sim, r)
        assert len({steps[c] for c in cohort}) > 1, "local epochs over unequal data: unequal tau_k"
        for c in cohort:  # the step-by-step a_k is the paper's closed form
            assert a[c] == pytest.approx(_closed_form_a(steps[c], momentum), rel=1e-12)
        expected, tau_eff = _hand_update(x, cohort, models, sizes, a)
        for k, v in expected.items():
            torch.testing.assert_close(sim.global_state[k].double(), v, rtol=1e-5, atol=1e-6, msg=f"round {r}: {k}")
        assert sim.method.round_metrics(r)["train/tau_eff"] == pytest.approx(tau_eff, rel=1e-6)
        # not FedAvg: the weighted mean of the client models is another point
        fedavg = {k: sum(sizes[c] * models[c][k] for c in cohort) / sum(sizes[c] for c in cohort) for k in expected}
        assert any(not torch.allclose(sim.global_state[k].double(), v, rtol=1e-4, atol=1e-5)
                   for k, v in fedavg.items())


def test_batchnorm_statistics_take_the_sample_weighted_mean_with_unequal_steps():
    sim = tiny_sim(FedNova(lr=0.05, batch_size=16, local_epochs=1), model="resnet8", rounds=1, clients_per_round=4)
    sizes = [int(i.numel()) for i in sim.data.client_indices]
    x, cohort, models, steps, a = _round(sim, 1)
    assert len({steps[c] for c in cohort}) > 1
    total = sum(sizes[c] for c in cohort)
    buffers = [k for k, _ in sim.model.named_buffers()]
    assert buffers
    for k in buffers:
        mean = sum(sizes[c] * models[c][k] for c in cohort) / total
        if sim.global_state[k].is_floating_point():
            torch.testing.assert_close(sim.global_state[k].double(), mean, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(sim.global_state[k], mean.round().to(sim.global_state[k].dtype)), k
    expected, _ = _hand_update(x, cohort, models, sizes, a)
    for k in dict(sim.model.named_parameters()):
        torch.testing.assert_close(sim.global_state[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("prox_tau_eff", ["a", "steps"])
def test_proximal_solver_a_and_tau_eff_by_hand(prox_tau_eff):
    lr, mu = 0.05, 0.5
    sim = tiny_sim(FedNova(lr=lr, mu=mu, prox_tau_eff=prox_tau_eff, batch_size=16, local_epochs=1), rounds=1,
                   clients_per_round=4)
    sizes = [int(i.numel()) for i in sim.data.client_indices]
    x, cohort, models, steps, a = _round(sim, 1)
    for c in cohort:
        assert a[c] == pytest.approx(_closed_form_a(steps[c], lr_mu=lr * mu), rel=1e-12)
        assert a[c] < steps[c]
    tau_eff_of = {c: float(steps[c]) for c in cohort} if prox_tau_eff == "steps" else None
    expected, tau_eff = _hand_update(x, cohort, models, sizes, a, tau_eff_of)
    for k, v in expected.items():
        torch.testing.assert_close(sim.global_state[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert sim.reducer.tau_eff == pytest.approx(tau_eff, rel=1e-6)


def test_server_momentum_starts_from_the_fednova_update():
    data = tiny_data()
    plain = tiny_sim(FedNova(lr=0.05, batch_size=16), data=data, rounds=2)
    heavy = tiny_sim(FedNova(lr=0.05, batch_size=16, server_momentum=0.9), data=data, rounds=2)
    run(plain, 1), run(heavy, 1)
    for k, v in plain.global_state.items():  # m_0 = 0: the first step is the FedNova update
        assert torch.equal(heavy.global_state[k], v), k
    run(plain), run(heavy)
    assert any(not torch.allclose(heavy.global_state[k], v) for k, v in plain.global_state.items())


def test_invalid_arguments():
    with pytest.raises(ValueError):
        FedNova(mu=0.1, momentum=0.9)
    with pytest.raises(ValueError):
        FedNova(mu=-1.0)
    with pytest.raises(ValueError):
        FedNova(prox_tau_eff="tau")
    FedNova(**FedNova.released_code)
