"""Batched PM evaluation: a personal head on the shared body is evaluated on features computed once, with the
same metrics as running every client's whole model on its own test images."""

from __future__ import annotations

import pytest
import torch
from helpers import run, tiny_sim

from fedlt.data.federated import FederatedDataset
from fedlt.data.partition import Dirichlet
from fedlt.data.sources import EmbeddedDigits
from fedlt.methods.ditto import Ditto
from fedlt.methods.fedbn import FedBN
from fedlt.methods.fedper import FedPer
from fedlt.methods.fedrep import FedRep
from fedlt.methods.fedrod import FedRoD
from fedlt.methods.lgfedavg import LGFedAvg


def _data(mask: bool) -> FederatedDataset:
    source = EmbeddedDigits(image_size=16, train_per_class=120, test_per_class=30, holdout_per_class=30)
    return FederatedDataset(source, num_clients=8, imbalance_factor=10, partition=Dirichlet(0.5, min_size=5), seed=0,
                            mask_absent_classes=mask)


def _per_client(monkeypatch, sim) -> dict[str, float]:
    """The evaluation with the batched path switched off (every client's model on its own batches)."""
    with monkeypatch.context() as m:
        m.setattr(type(sim.method), "pm_shares_features", property(lambda self: False))
        return sim.evaluate()


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("make", [lambda: FedPer(lr=0.05), lambda: FedRep(lr=0.05), lambda: FedRoD(lr=0.05)],
                         ids=["fedper", "fedrep", "fedrod"])
def test_batched_pm_equals_the_per_client_evaluation(monkeypatch, make, mask):
    sim = tiny_sim(make(), rounds=2, clients_per_round=4, data=_data(mask))
    assert sim.method.pm_shares_features
    run(sim)
    calls, personal_loads = [], []
    real, real_personal = sim.load_client, sim.load_personal
    sim.load_client = lambda k: (calls.append(k), real(k))[1]
    sim.load_personal = lambda k: (personal_loads.append(k), real_personal(k))[1]
    batched = sim.evaluate()
    assert calls == []  # no whole-model load per client: the personal tensors only
    # a plain head (FedPer, FedRep) runs stacked over clients; FedRoD's own pm_logits gets each client's head loaded
    assert (personal_loads == []) == (not isinstance(sim.method, FedRoD))
    sim.load_client, sim.load_personal = real, real_personal
    trained = [k for k in range(8) if sim.store.get(k) and sim.data.client_test_indices[k].numel()]
    assert 0 < len(trained) < sum(1 for i in sim.data.client_test_indices if i.numel())  # own heads and the default
    reference = _per_client(monkeypatch, sim)
    personal = {k: v for k, v in reference.items() if k.startswith("test/personal/")}
    assert personal and {k: batched[k] for k in personal} == personal
    assert 0.0 < batched["test/personal/acc_mean"] < 1.0
    heads = [sim.store.get(k) for k in range(sim.data.num_clients)]
    trained = [h for h in heads if h]
    assert len(trained) >= 2 and any(not torch.equal(a[key], trained[0][key]) for a in trained[1:] for key in a)


@pytest.mark.parametrize("make", [lambda: LGFedAvg(lr=0.05), lambda: FedBN(lr=0.05), lambda: Ditto(lr=0.05)],
                         ids=["lgfedavg", "fedbn", "ditto"])
def test_methods_with_a_personal_body_are_not_batched(make):
    method = make()
    sim = tiny_sim(method, rounds=1, clients_per_round=2, model="resnet8" if isinstance(method, FedBN) else "cnn")
    assert not sim.method.pm_shares_features


def test_the_default_property_needs_head_only_personal_keys():
    method = FedPer(lr=0.05, personal_layers=("features.", "head."))
    sim = tiny_sim(method, rounds=1, clients_per_round=2)
    assert any(not k.startswith("head.") for k in sim.method.personal_keys)
    assert not sim.method.pm_shares_features


def test_per_client_metric_updates_are_one_call(monkeypatch):
    """The PM metric is updated once per evaluation, not once per client (each update costs O(K x C))."""
    sim = tiny_sim(FedPer(lr=0.05), rounds=1, clients_per_round=2, data=_data(False))
    run(sim)
    updates = []
    real = sim.evaluator.pm.update
    monkeypatch.setattr(sim.evaluator.pm, "update", lambda *a: (updates.append(a[2]), real(*a))[1])
    sim.evaluate()
    assert len(updates) == 1 and isinstance(updates[0], torch.Tensor)
    assert sorted(torch.unique(updates[0]).tolist()) == [k for k in range(8) if sim.data.client_test_indices[k].numel()]
