"""Invariants that catch wrong implementations of the first methods (docs/architecture.md section 9)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg, FedPer, FedProx
from fedlt.models import build_model


def test_fedprox_with_mu_zero_equals_fedavg():
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16))
    b = tiny_sim(FedProx(mu=0.0, lr=0.05, batch_size=16))
    run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k


def test_fedprox_with_mu_changes_the_result_and_pulls_towards_global():
    base = tiny_sim(FedAvg(lr=0.1, batch_size=16), rounds=1)
    prox = tiny_sim(FedProx(mu=10.0, lr=0.1, batch_size=16), rounds=1)
    start = global_copy(base)
    run(base), run(prox)
    dist = lambda s: sum((s[k] - start[k]).float().pow(2).sum() for k in start if k.endswith("weight"))  # noqa: E731
    assert dist(prox.global_state) < dist(base.global_state)


def test_fedavg_one_client_one_full_batch_step_equals_centralised_sgd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    data = FederatedDataset.from_tensors(x, y, x[:8], y[:8], [torch.arange(40)], num_classes=10)
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_features=64)
    reference = copy.deepcopy(model)
    sim = Simulator(None, data, model, FedAvg(lr=0.3, batch_size=40), rounds=1, clients_per_round=1).setup()
    sim.run_round(1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(sim.global_state[k], v, rtol=1e-5, atol=1e-6)


def test_fedavg_global_is_sample_weighted_mean_of_client_models():
    sim = tiny_sim(FedAvg(lr=0.05, batch_size=16), rounds=1, clients_per_round=3)
    cohort = sim.cohort_sampler(sim.seed, 1, sim.data.num_clients, 3)
    message = sim.reducer.broadcast(1)
    # Train each client alone and average by hand.
    models, weights = [], []
    for cid in cohort:
        sim.reducer.begin_round(1)
        sim.train_client(cid, message)
        models.append({k: v.detach().clone() for k, v in sim.method.shared_tensors.items()})
        weights.append(sim._sizes[cid])
    expected = {k: sum(w * m[k] for m, w in zip(models, weights)) / sum(weights) for k in models[0]}
    sim.run_round(1)
    for k, v in expected.items():
        torch.testing.assert_close(sim.global_state[k], v, rtol=1e-5, atol=1e-6)


def test_fedper_keeps_heads_on_clients_and_uses_them_for_pm():
    data = tiny_data()
    sim = tiny_sim(FedPer(lr=0.05, batch_size=16), rounds=2, clients_per_round=6, data=data)
    init_head = sim.model.head.weight.detach().clone()
    run(sim)
    assert not any(k.startswith("head.") for k in sim.global_state)  # never aggregated
    heads = [sim.store.get(c)["model.head.weight"] for c in range(data.num_clients)]
    assert all(not torch.equal(h, init_head) for h in heads)
    assert not torch.equal(heads[0], heads[1])  # personal, not shared
    metrics = sim.evaluate()
    assert "test/global/acc" not in metrics and 0.0 <= metrics["test/personal/acc_mean"] <= 1.0
    sim.load_client(1)
    assert torch.equal(sim.model.head.weight, heads[1])
