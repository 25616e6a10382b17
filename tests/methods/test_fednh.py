"""FedNH invariants: uniform unit prototypes, scaled cosine logits, the server's semantics-aware prototype update
by hand (rho smoothing, renormalisation, absent classes kept), FedAvg of the body with fixed prototypes, PM = the
client's locally trained model, and the released code's options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, personal_predictions, run, tiny_data, tiny_sim

from fedlt.methods.fednh import (
    PROTO_KEY,
    SCALE_KEY,
    FedNH,
    FedNHReducer,
    PrototypeHead,
    class_sums,
    local_prototypes,
    max_pairwise_cosine,
    orthogonal_prototypes,
    uniform_prototypes,
    update_prototypes,
)
from fedlt.types import ClientContext, ClientUpdate

NET, LAST = "model.fednh.net.", "model.fednh.last_round"


def _nh(**kwargs) -> FedNH:
    return FedNH(lr=0.05, batch_size=16, **kwargs)


@pytest.mark.parametrize(("classes", "dim"), [(10, 32), (10, 10), (12, 3), (6, 3), (10, 2), (2, 5)])
def test_uniform_prototypes_are_unit_and_spread(classes, dim):
    w = uniform_prototypes(classes, dim, torch.Generator().manual_seed(0))
    assert w.shape == (classes, dim) and w.dtype == torch.float32
    torch.testing.assert_close(w.norm(dim=1), torch.ones(classes), rtol=0, atol=1e-6)
    random = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    got = max_pairwise_cosine(w)
    assert got < max_pairwise_cosine(random) - 0.1
    simplex = -1.0 / (classes - 1)  # the optimum when C <= d + 1
    # the optimum: the simplex when C <= d + 1; on S^2 the octahedron (0) and the icosahedron (1 / sqrt(5)); on the
    # circle C evenly spaced points (the exact 2-d construction)
    best = {(6, 3): 0.0, (12, 3): 1 / 5 ** 0.5, (10, 2): math.cos(2 * math.pi / 10)}.get((classes, dim), simplex)
    assert got < best + 0.02
    assert torch.equal(w, uniform_prototypes(classes, dim, torch.Generator().manual_seed(0)))


def test_orthogonal_prototypes_are_orthonormal_rows():
    w = orthogonal_prototypes(10, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w @ w.T, torch.eye(10), rtol=0, atol=1e-6)
    assert abs(max_pairwise_cosine(w)) < 1e-6


def test_model_starts_with_uniform_prototypes_and_logits_are_scaled_cosines():
    sim = tiny_sim(_nh(scale=7.5), rounds=1)
    head = sim.model.head
    assert isinstance(head, PrototypeHead) and "head.weight" not in sim.global_state
    protos = sim.global_state[PROTO_KEY]
    assert protos.shape == (sim.data.num_classes, sim.model.num_features)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]), rtol=0, atol=1e-6)
    assert max_pairwise_cosine(protos) < -0.05
    assert SCALE_KEY in dict(head.named_buffers(prefix="head")) and not any(p is head.scale for p in
                                                                             sim.model.parameters())
    h = torch.randn(6, sim.model.num_features) * 3
    expected = 7.5 * F.cosine_similarity(h.unsqueeze(1), protos.unsqueeze(0), dim=2)
    torch.testing.assert_close(head(h), expected, rtol=1e-5, atol=1e-5)
    assert head(h).abs().max() <= 7.5 + 1e-5
    x = sim.data.get_batch(sim.data.test, torch.arange(4))[0]
    torch.testing.assert_close(sim.model(x), 7.5 * F.normalize(sim.model.forward_features(x), dim=1) @ protos.T)


def test_prototype_update_by_hand():
    mu = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    # two clients: client A has classes 0 (2 samples) and 1 (1 sample), client B class 0 (3 samples)
    a_means = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])  # un-normalised means of A's classes 0 and 1
    b_mean = torch.tensor([0.0, 0.0, 5.0])
    sums = torch.stack([2 * F.normalize(a_means[0], dim=0) + 3 * F.normalize(b_mean, dim=0),
                        1 * F.normalize(a_means[1], dim=0), torch.zeros(3)])
    counts = torch.tensor([5.0, 1.0, 0.0])
    rho = 0.9
    got = update_prototypes(mu, sums, counts, rho)
    bar0 = F.normalize(torch.tensor([0.0, 2.0, 3.0]) / 5, dim=0)  # (2 e1 + 3 e2) / 5, renormalised
    bar1 = torch.tensor([0.6, 0.0, 0.8])
    want0 = F.normalize(rho * mu[0] + (1 - rho) * bar0, dim=0)
    want1 = F.normalize(rho * mu[1] + (1 - rho) * bar1, dim=0)
    torch.testing.assert_close(got[0], want0, rtol=0, atol=1e-7)
    torch.testing.assert_close(got[1], want1, rtol=0, atol=1e-7)
    assert torch.equal(got[2], mu[2])  # no client holds class 2: unchanged
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), rtol=0, atol=1e-7)
    assert torch.equal(update_prototypes(mu, sums, counts, 1.0)[:2], mu[:2])  # rho = 1: FedUH
    torch.testing.assert_close(update_prototypes(mu, sums, counts, 0.0)[0], bar0, rtol=0, atol=1e-7)


def test_client_upload_is_count_times_normalised_class_mean_of_normalised_features():
    feats = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [-5.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])
    sums, counts = class_sums(feats, labels, 3)
    assert torch.equal(counts, torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sums[0], torch.tensor([0.6, 1.8], dtype=torch.float64))
    up = local_prototypes(sums, counts)
    torch.testing.assert_close(up[0], 2 * F.normalize(torch.tensor([0.6, 1.8], dtype=torch.float64), dim=0))
    assert torch.equal(up[1], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(up[2], torch.zeros(2, dtype=torch.float64))  # the unit features cancel: the zero mean stays 0


def test_reducer_averages_the_body_and_updates_prototypes_from_exact_sums():
    c, d = 4, 3
    protos = F.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(1)), dim=1)
    state = {"body": torch.zeros(2), PROTO_KEY: protos.clone(), SCALE_KEY: torch.tensor(5.0)}
    red = FedNHReducer(0.8, c, d, frozenset({PROTO_KEY, SCALE_KEY}))
    red.setup(state, torch.device("cpu"))
    red.begin_round(1)
    ups = [(2.0, torch.tensor([1.0, 2.0]), torch.randn(c, d), torch.tensor([2.0, 0.0, 1.0, 0.0])),
           (6.0, torch.tensor([3.0, -2.0]), torch.randn(c, d), torch.tensor([0.0, 0.0, 5.0, 0.0]))]
    for w, body, p, n in ups:
        p = p * (n > 0).unsqueeze(1)
        red.accumulate(ClientUpdate(0, w, {"body": body, PROTO_KEY: protos + 1, SCALE_KEY: torch.tensor(9.0)},
                                    extras={"proto": p, "count": n}))
    red.reduce(None)
    red.server_step(1)
    torch.testing.assert_close(red.global_state["body"], torch.tensor([2.5, -1.0]))
    assert torch.equal(red.global_state[SCALE_KEY], torch.tensor(5.0))  # a fixed scale is never averaged
    sums = sum(p * (n > 0).unsqueeze(1) for _, _, p, n in ups)
    want = update_prototypes(protos, sums, ups[0][3] + ups[1][3], 0.8)
    torch.testing.assert_close(red.global_state[PROTO_KEY], want, rtol=0, atol=1e-6)
    assert torch.equal(red.global_state[PROTO_KEY][1], protos[1]) and torch.equal(red.global_state[PROTO_KEY][3],
                                                                                  protos[3])


class _Uploads(FedNH):
    """Records every client's upload."""

    uploads: dict[int, ClientUpdate] = {}

    def on_client_end(self, ctx):
        update = super().on_client_end(ctx)
        self.uploads[ctx.client_id] = ClientUpdate(ctx.client_id, update.weight,
                                                   {k: v.detach().clone() for k, v in update.tensors.items()},
                                                   {k: v.clone() for k, v in update.extras.items()})
        return update


def test_round_by_hand_class_means_of_the_trained_models_and_the_prototype_update():
    """One round: each client's upload is its trained model's normalised class means (eval mode, un-augmented)
    times the counts; the global prototypes are the hand update of those; the body is the FedAvg mean; the
    prototypes stay fixed during local training (the stored local models keep the broadcast ones)."""
    data = tiny_data()
    sim = tiny_sim(_Uploads(lr=0.05, batch_size=16, rho=0.7), rounds=1, clients_per_round=3, data=data)
    start = global_copy(sim)
    _Uploads.uploads = {}
    run(sim)
    ups = _Uploads.uploads
    assert len(ups) == 3
    sums = torch.zeros_like(start[PROTO_KEY], dtype=torch.float64)
    counts = torch.zeros(data.num_classes, dtype=torch.float64)
    for cid, up in ups.items():
        stored = sim.store.get(cid)
        assert torch.equal(stored[NET + PROTO_KEY], start[PROTO_KEY])  # fixed during local training
        net = sim.method.local.net
        net.load_state_dict({k[len(NET):]: v for k, v in stored.items() if k.startswith(NET)})
        net.eval()
        idx = data.client_indices[cid]
        with torch.no_grad():
            feats = net.forward_features(data.get_batch(data.train, idx)[0])
        s, n = class_sums(feats, data.train.y[idx], data.num_classes)
        assert torch.equal(up.extras["count"], n.float())
        assert torch.equal(n.float(), sim._class_counts[cid])
        torch.testing.assert_close(up.extras["proto"].double(), local_prototypes(s, n), rtol=0, atol=1e-5)
        assert up.weight == sim._sizes[cid]
        sums += local_prototypes(s, n)
        counts += n
    want = update_prototypes(start[PROTO_KEY].double(), sums, counts, 0.7).float()
    torch.testing.assert_close(sim.global_state[PROTO_KEY], want, rtol=0, atol=1e-5)
    absent = counts == 0
    assert torch.equal(sim.global_state[PROTO_KEY][absent], start[PROTO_KEY][absent])
    assert not torch.equal(sim.global_state[PROTO_KEY][~absent], start[PROTO_KEY][~absent])
    total = sum(up.weight for up in ups.values())
    for k in ("features.0.weight", "features.3.bias"):
        mean = sum(up.weight * up.tensors[k].double() for up in ups.values()) / total
        torch.testing.assert_close(sim.global_state[k].double(), mean, rtol=0, atol=1e-6)


def test_rho_one_keeps_the_prototypes_and_a_fixed_scale_bitwise():
    sim = tiny_sim(_nh(rho=1.0), rounds=2)
    start = global_copy(sim)
    run(sim)
    assert torch.equal(sim.global_state[PROTO_KEY], start[PROTO_KEY])
    assert torch.equal(sim.global_state[SCALE_KEY], start[SCALE_KEY])
    assert not torch.equal(sim.global_state["features.0.weight"], start["features.0.weight"])


def test_pm_is_the_clients_trained_model_and_gm_the_global_model():
    data = tiny_data()
    sim = tiny_sim(_nh(), rounds=2, clients_per_round=3, data=data)
    run(sim)
    trained, x, gm, clients = personal_predictions(sim, LAST)
    for cid, pm in clients:
        if cid in trained:
            assert torch.equal(pm, sim.method.local.net(x)) and not torch.equal(pm, gm)
        else:
            assert torch.equal(pm, gm)
    metrics = sim.evaluate()
    assert 0.0 <= metrics["test/global/acc"] <= 1.0 and 0.0 <= metrics["test/personal/acc_mean"] <= 1.0


def test_released_code_options():
    """Orthogonal prototypes, a learnable scale from 1 (trained and averaged), class means on augmented images,
    the uniform mean over the cohort, gradient clipping."""
    data = tiny_data()
    sim = tiny_sim(_Uploads(lr=0.05, batch_size=16, **FedNH.released_code), rounds=1, clients_per_round=3, data=data)
    start = global_copy(sim)
    assert abs(max_pairwise_cosine(start[PROTO_KEY])) < 1e-6 and float(start[SCALE_KEY]) == 1.0
    assert any(p is sim.model.head.scale for p in sim.model.parameters())
    _Uploads.uploads = {}
    run(sim)
    ups = _Uploads.uploads
    assert {up.weight for up in ups.values()} == {1.0}
    mean = sum(up.tensors[SCALE_KEY].double() for up in ups.values()) / len(ups)
    torch.testing.assert_close(sim.global_state[SCALE_KEY].double(), mean, rtol=0, atol=1e-6)
    assert not torch.equal(sim.global_state[SCALE_KEY], start[SCALE_KEY])
    cid = next(iter(ups))
    sim.load_client(cid)
    ctx = ClientContext(client_id=cid, round=1, num_samples=sim._sizes[cid], class_counts=sim._class_counts[cid],
                        generator=torch.Generator(), device=sim.device, message=sim.reducer.broadcast(1))
    augmented = sim.method.class_means(ctx)
    sim.method.prototype_augment = False
    plain = sim.method.class_means(ctx)
    assert torch.equal(augmented[1], plain[1]) and not torch.equal(augmented[0], plain[0])


def test_rejects_bad_arguments():
    for kwargs in ({"rho": 1.5}, {"scale": 0.0}, {"prototype_init": "random"}, {"init_steps": -1}):
        with pytest.raises(ValueError):
            FedNH(**kwargs)
