"""CReFF invariants: FedAvg trajectory untouched, federated features and re-trained head used by GM, the
gradient-matching pieces (weight and bias rows, as the official ``match_loss``) against autograd and by hand, and
the released code's DSA on the real samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.engine.sharding import seeded_generator
from fedlt.methods import FedAvg
from fedlt.methods.clip2fl import CLIP2FL
from fedlt.methods.creff import (
    _REAL_TAG,
    CReFF,
    class_match_distances,
    gradient_match_distance,
    synthetic_class_gradients,
)

SMALL = {"num_of_feature": 10, "match_epoch": 5, "crt_epoch": 3, "real_repeats": 2, "batch_real": 8}


def test_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert gradient_match_distance(a, 3 * a).item() < 1e-5  # same direction: 0
    assert abs(gradient_match_distance(a, -a).item() - 4.0) < 1e-5  # opposite rows: 2 each
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert abs(gradient_match_distance(a, b).item() - 1.0) < 1e-5  # orthogonal row 1, equal row 2
    # A 1-D gradient (the bias) is one row: one cosine over the whole vector.
    v = torch.tensor([1.0, 0.0, 1.0])
    assert abs(gradient_match_distance(v, torch.tensor([0.0, 1.0, 0.0])).item() - 1.0) < 1e-5
    assert abs(gradient_match_distance(v, -v).item() - 2.0) < 1e-5


def _official_distance_reference(gw_syn, gb_syn, gw_real, gb_real) -> float:
    """The official ``match_loss`` (``dis_metric='ours'``) for one class, written out with Python floats: per
    parameter, the sum over rows of 1 - <a, b> / (|a| |b| + 1e-6); the (C, d) weight's rows, and the (C,) bias
    reshaped to a single (1, C) row (its ``return 0`` is commented out in the code)."""

    def rows(a, b):
        total = 0.0
        for ra, rb in zip(a.tolist(), b.tolist()):
            dot = sum(x * y for x, y in zip(ra, rb))
            na, nb = sum(x * x for x in ra) ** 0.5, sum(y * y for y in rb) ** 0.5
            total += 1.0 - dot / (na * nb + 1e-6)
        return total

    return rows(gw_real, gw_syn) + rows(gb_real.reshape(1, -1), gb_syn.reshape(1, -1))


def test_class_distance_includes_the_bias_row_like_the_official_match_loss():
    torch.manual_seed(0)
    c, d = 4, 5
    syn_w, real_w = torch.randn(c, c, d, dtype=torch.float64), torch.randn(c, c, d, dtype=torch.float64)
    syn_b, real_b = torch.randn(c, c, dtype=torch.float64), torch.randn(c, c, dtype=torch.float64)
    dist = class_match_distances(syn_w, syn_b, real_w, real_b)
    weight_only = class_match_distances(syn_w, syn_b, real_w, real_b, match_bias=False)
    for k in range(c):
        ref = _official_distance_reference(syn_w[k], syn_b[k], real_w[k], real_b[k])
        assert dist[k].item() == pytest.approx(ref, rel=1e-9, abs=1e-9)
        bias_term = 1.0 - F.cosine_similarity(syn_b[k], real_b[k], dim=0, eps=0.0).item()
        assert (dist[k] - weight_only[k]).item() == pytest.approx(bias_term, rel=1e-5, abs=1e-6)
    # The bias term matters: equal weight gradients, opposite bias gradients still cost 2 per class.
    same = class_match_distances(real_w, -real_b, real_w, real_b)
    torch.testing.assert_close(same, torch.full((c,), 2.0, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_synthetic_gradients_match_autograd_including_the_feature_gradient():
    c, m, d = 3, 4, 5
    feats = torch.randn(c * m, d, requires_grad=True)
    w, b = torch.randn(c, d, requires_grad=True), torch.randn(c)
    b = b.requires_grad_(True)
    syn_w, syn_b = synthetic_class_gradients(feats, w.detach(), b.detach(), c)
    real_w, real_b = torch.randn(c, c, d), torch.randn(c, c)
    loss = class_match_distances(syn_w, syn_b, real_w, real_b).sum()
    (g_closed,) = torch.autograd.grad(loss, feats)
    feats2 = feats.detach().clone().requires_grad_(True)
    ref = 0
    for k in range(c):
        ce = F.cross_entropy(F.linear(feats2[k * m:(k + 1) * m], w, b), torch.full((m,), k))
        gw, gb = torch.autograd.grad(ce, (w, b), create_graph=True)
        torch.testing.assert_close(gw, syn_w[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gb, syn_b[k], atol=1e-6, rtol=1e-5)
        ref = ref + gradient_match_distance(gw, real_w[k]) + gradient_match_distance(gb, real_b[k])
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
    real_w, real_b, owned = red.real_gradients()
    expected_owned = torch.as_tensor(sim.data.client_class_counts[[0, 1]].sum(0) > 0)
    assert torch.equal(owned.cpu(), expected_owned)

    def matching_loss() -> float:
        syn_w, syn_b = synthetic_class_gradients(red.features, red.head_w, red.head_b, red.num_classes)
        return sum(_official_distance_reference(syn_w[c], syn_b[c], real_w[c], real_b[c])
                   for c in range(red.num_classes) if owned[c])

    before = matching_loss()
    assert red.matching_loss(red.features, real_w, real_b, owned).item() == pytest.approx(before, rel=1e-5)
    with torch.enable_grad():
        red.match_features()
    assert matching_loss() < before


def _client_real_gradients(method: CReFF, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (grad, owners) one client uploads in round 1."""
    sim = tiny_sim(method, rounds=1, seed=seed)
    sim.reducer.begin_round(1)
    sim.train_client(0, sim.reducer.broadcast(1))
    grad, owners = sim.method._real
    return grad.clone(), owners.clone()


def test_dsa_real_gradients_differ_from_the_plain_ones_and_are_reproducible():
    args = {"lr": 0.05, "batch_size": 16, **SMALL}
    plain, owned = _client_real_gradients(CReFF(**args))
    dsa, owned_dsa = _client_real_gradients(CReFF(real_augment="dsa", **args))
    dsa_again, _ = _client_real_gradients(CReFF(real_augment="dsa", **args))
    assert torch.equal(owned, owned_dsa) and owned.sum() > 0
    assert torch.equal(dsa, dsa_again)  # seeded from (seed, round, client)
    assert not torch.allclose(dsa, plain)
    # Absent classes stay zero either way.
    c = owned.numel()
    assert torch.equal(dsa.view(c, -1)[owned < 0.5], torch.zeros_like(dsa.view(c, -1)[owned < 0.5]))


@pytest.mark.parametrize("augment", ["none", "dsa"])
def test_real_gradient_matches_a_hand_built_per_draw_gradient(augment):
    """``none`` (paper): the closed-form classifier gradient (weight and bias) of the drawn normalised images.
    ``dsa`` with a flip-only strategy: that of the drawn images or of their mirror (one flip for the batch)."""
    args = {"lr": 0.05, "batch_size": 16, **SMALL, "real_repeats": 1, "batch_real": 4}
    sim = tiny_sim(CReFF(real_augment=augment, dsa_strategy="flip", **args), rounds=1)
    sim.reducer.begin_round(1)
    message = sim.reducer.broadcast(1)
    sim.train_client(0, message)
    grad, owners = sim.method._real
    m = sim.method
    c, d = m.num_classes, m.dim
    w, b = message.extras["crt_weight"], message.extras["crt_bias"]
    idx = sim.data.client_indices[0]
    labels = sim.data.train.y[idx]
    gen = seeded_generator(m.seed_value, _REAL_TAG, 1, 0)
    m.model.load_state_dict(sim.global_state, strict=False)
    m.model.eval()
    for cls in labels.unique().tolist():
        pool = (labels == cls).nonzero().flatten()
        pick = pool[torch.randperm(int(pool.numel()), generator=gen)[:4]]
        x, _ = sim.data.get_batch(sim.data.train, idx[pick], None, train=False)
        got = grad.view(c, c, d + 1)[cls]
        options = []
        for img in (x, x.flip(-1)):
            with torch.no_grad():
                h = m.model.forward_features(img).float()
            p = torch.softmax(h @ w.t() + b, dim=1)
            p[torch.arange(p.shape[0]), labels[pick]] -= 1.0
            options.append(torch.cat([p.t() @ h / p.shape[0], p.mean(0, keepdim=True).t()], dim=1))
        if augment == "none":
            torch.testing.assert_close(got, options[0], rtol=1e-4, atol=1e-6)
        else:
            assert any(torch.allclose(got, o, rtol=1e-4, atol=1e-6) for o in options), cls


def test_fedavg_trajectory_is_untouched_with_dsa():
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16), rounds=2)
    b = tiny_sim(CReFF(lr=0.05, batch_size=16, real_augment="dsa", **SMALL), rounds=2)
    run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k


def test_released_code_and_argument_validation():
    assert CReFF.released_code == {"real_augment": "dsa"}
    assert CLIP2FL.released_code == {"real_augment": "dsa"}
    m = CReFF()
    assert (m.real_augment, m.dsa_strategy, m.match_bias) == ("none", "color_crop_cutout_flip_scale_rotate", True)
    for bad in ({"real_augment": "DSA"}, {"real_augment": "flip"}, {"dsa_strategy": "color_noise"},
                {"dsa_strategy": ""}, {"match_bias": 1}):
        with pytest.raises(ValueError):
            CReFF(**bad)


def test_weight_only_matching_is_reachable_and_differs():
    args = {"lr": 0.05, "batch_size": 16, **SMALL}
    a = tiny_sim(CReFF(**args), rounds=1)
    b = tiny_sim(CReFF(match_bias=False, **args), rounds=1)
    run(a), run(b)
    assert not torch.allclose(a.reducer.features, b.reducer.features)
