"""CReFF invariants: FedAvg trajectory untouched, federated features and re-trained head used by GM, the
gradient-matching pieces against autograd and by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.methods import FedAvg
from fedlt.methods.creff import CReFF, gradient_match_distance, synthetic_class_gradients

SMALL = {"num_of_feature": 10, "match_epoch": 5, "crt_epoch": 3, "real_repeats": 2, "batch_real": 8}


def test_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert gradient_match_distance(a, 3 * a).item() < 1e-5  # same direction: 0
    assert abs(gradient_match_distance(a, -a).item() - 4.0) < 1e-5  # opposite rows: 2 each
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert abs(gradient_match_distance(a, b).item() - 1.0) < 1e-5  # orthogonal row 1, equal row 2


def test_synthetic_gradients_match_autograd_including_the_feature_gradient():
    c, m, d = 3, 4, 5
    feats = torch.randn(c * m, d, requires_grad=True)
    w, b = torch.randn(c, d, requires_grad=True), torch.randn(c)
    syn = synthetic_class_gradients(feats, w.detach(), b, c)
    real = torch.randn(c, c, d)
    loss = sum(gradient_match_distance(syn[k], real[k]) for k in range(c))
    (g_closed,) = torch.autograd.grad(loss, feats)
    feats2 = feats.detach().clone().requires_grad_(True)
    ref = 0
    for k in range(c):
        ce = F.cross_entropy(F.linear(feats2[k * m:(k + 1) * m], w, b), torch.full((m,), k))
        (gw,) = torch.autograd.grad(ce, w, create_graph=True)
        torch.testing.assert_close(gw, syn[k], atol=1e-6, rtol=1e-5)
        ref = ref + gradient_match_distance(gw, real[k])
    (g_ref,) = torch.autograd.grad(ref, feats2)
    torch.testing.assert_close(g_closed, g_ref, atol=1e-5, rtol=1e-4)


def test_fedavg_model_is_untouched_and_gm_uses_the_retrained_head():
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16), rounds=2)
    b = tiny_sim(CReFF(lr=0.05, batch_size=16, **SMALL), rounds=2)
    init_features = b.reducer.features.clone()
    init_head = b.reducer.head_w.clone()
    run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k
    red = b.reducer
    assert not torch.equal(red.features, init_features)
    assert not torch.equal(red.head_w, init_head)
    assert not torch.allclose(red.head_w, b.global_state["head.weight"])
    b.evaluator._load_global()
    b.model.eval()
    x, _ = b.data.get_batch(b.data.test, torch.arange(20), None, train=False)
    with torch.no_grad():
        expected = F.linear(b.model.forward_features(x), red.head_w, red.head_b)
        torch.testing.assert_close(b.method.predict_global(x), expected)
        assert not torch.allclose(b.method.predict_global(x), b.model(x))


def test_matching_lowers_the_matching_loss_and_only_owned_classes_count():
    sim = tiny_sim(CReFF(lr=0.05, batch_size=16, **{**SMALL, "match_epoch": 20}), rounds=1)
    red = sim.reducer
    sim.reducer.begin_round(1)
    message = red.broadcast(1)
    for cid in (0, 1):
        sim.train_client(cid, message)
    red.reduce(None)  # the sums are exact and reach the buffer in the (here single-process) reduction
    real_w, _, owned = red.real_gradients()
    expected_owned = torch.as_tensor(sim.data.client_class_counts[[0, 1]].sum(0) > 0)
    assert torch.equal(owned.cpu(), expected_owned)

    def matching_loss() -> float:
        syn = synthetic_class_gradients(red.features, red.head_w, red.head_b, red.num_classes)
        return sum(gradient_match_distance(syn[c], real_w[c]).item() for c in range(red.num_classes) if owned[c])

    before = matching_loss()
    with torch.enable_grad():
        red.match_features()
    assert matching_loss() < before
