"""MOON invariants (fedlt/methods/moon.py): mu = 0 without the projection head is exactly FedAvg; the
model-contrastive loss and the client's step equal hand computations (positive = the global model, negative = the
client's previous local model); the previous model is per client, the last local model of each client, and
survives a checkpoint round trip; a client's first participation has no negative (``skip``) or the released code's
own random network (``random_init``)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.methods import FedAvg
from fedlt.methods.moon import MOON, PREV, ProjectedHead, model_contrastive_loss
from fedlt.types import ClientContext

KW = {"lr": 0.05, "batch_size": 16}


def _ctx(sim, client_id: int, round: int) -> ClientContext:
    """The context the engine builds for ``client_id`` in ``round`` (the workspace is loaded with the global
    state)."""
    state = sim.load_client(client_id)
    return ClientContext(client_id=client_id, round=round, num_samples=int(sim.data.client_indices[client_id].numel()),
                         class_counts=sim._class_counts[client_id], generator=torch.Generator().manual_seed(0),
                         device=torch.device("cpu"), message=sim.reducer.broadcast(round), state=state)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _hand_con(z, z_glob, z_prev, tau):
    pos, neg = _cos(z, z_glob) / tau, _cos(z, z_prev) / tau
    return (-torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(neg)))).mean()


def _states(sim) -> dict[int, dict[str, torch.Tensor]]:
    return {c: dict(s) for c, s in sim.store.states().items()}


# -- the loss -------------------------------------------------------------------------------------------------
def test_model_contrastive_loss_equals_a_hand_computation():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z_glob = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    z_prev = torch.tensor([[0.0, 1.0], [-1.0, -1.0]])
    tau = 0.5
    # sample 1: sim(z, z_glob) = 1/sqrt(2), sim(z, z_prev) = 0; sample 2: 1/sqrt(2) and -1.
    s = 1 / math.sqrt(2)
    l1 = -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(0.0)))
    l2 = -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(-1 / tau)))
    got = model_contrastive_loss(z, z_glob, [z_prev], tau)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    # The positive is the global model: swapping the roles gives the other pair's value (and a larger loss here).
    swapped = model_contrastive_loss(z, z_prev, [z_glob], tau)
    l1s = -math.log(math.exp(0.0) / (math.exp(s / tau) + math.exp(0.0)))
    l2s = -math.log(math.exp(-1 / tau) / (math.exp(s / tau) + math.exp(-1 / tau)))
    assert swapped.item() == pytest.approx((l1s + l2s) / 2, rel=1e-6)
    assert swapped.item() > got.item()
    # Aligned with the positive and opposite to the negative: log(1 + exp(-2 / tau)); cosine ignores the norms.
    best = model_contrastive_loss(z, 3 * z, [-z], tau)
    assert best.item() == pytest.approx(math.log1p(math.exp(-2 / tau)), rel=1e-5)  # float32 cosines


def test_model_contrastive_loss_random_tensors_and_temperature():
    g = torch.Generator().manual_seed(0)
    z, zg, zp = (torch.randn(7, 5, generator=g) for _ in range(3))
    for tau in (0.1, 0.5, 1.0):
        torch.testing.assert_close(model_contrastive_loss(z, zg, [zp], tau), _hand_con(z, zg, zp, tau))


# -- FedAvg equivalence and the effect of mu ---------------------------------------------------------------
def test_mu_zero_without_projection_head_equals_fedavg_exactly():
    data = tiny_data()
    a = tiny_sim(FedAvg(**KW), rounds=3, data=data)
    b = tiny_sim(MOON(mu=0.0, proj_dim=None, **KW), rounds=3, data=data)
    run(a)
    metrics = run(b)
    assert metrics[0]["train/loss_con"] == 0.0  # round 1: nobody has a previous model
    assert any(m["train/loss_con"] > 0 for m in metrics[1:])  # the contrastive path ran (its weight is 0)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k


def test_mu_changes_the_result():
    data = tiny_data()
    a = tiny_sim(MOON(mu=0.0, **KW), rounds=3, data=data)
    b = tiny_sim(MOON(mu=5.0, **KW), rounds=3, data=data)
    run(a), run(b)
    assert any(not torch.allclose(v, b.global_state[k]) for k, v in a.global_state.items())


# -- the client step by hand ---------------------------------------------------------------------------------
def test_training_step_is_sup_plus_mu_times_the_contrastive_loss_by_hand():
    mu, tau = 2.0, 0.5
    method = MOON(mu=mu, tau=tau, proj_dim=12, **KW)
    sim = tiny_sim(method, rounds=2)
    run(sim, 1)
    cid = next(c for c in range(sim.data.num_clients) if c in sim.store)
    ctx = _ctx(sim, cid, round=2)
    method.on_client_start(ctx)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, sim.data.in_channels, sim.data.image_size, sim.data.image_size, generator=g)
    y = torch.randint(0, sim.data.num_classes, (6,), generator=g)
    out = method.training_step((x, y), ctx)

    local = sim.model  # the workspace: the global model, about to be trained
    glob = copy.deepcopy(local).eval()
    prev = copy.deepcopy(local)
    prev.load_state_dict({k: ctx.state[PREV + k] for k in local.state_dict()})
    prev.eval()
    assert any(not torch.equal(prev.state_dict()[k], v) for k, v in glob.state_dict().items())

    def rep(net):
        head = net.head
        return head.proj[2](F.relu(head.proj[0](net.forward_features(x))))

    with torch.no_grad():
        z, zg, zp = rep(local), rep(glob), rep(prev)
        logits = local.head.fc(z)
    sup = F.cross_entropy(logits, y)
    con = _hand_con(z, zg, zp, tau)
    torch.testing.assert_close(out.parts["sup"], sup)
    torch.testing.assert_close(out.parts["con"], con)
    torch.testing.assert_close(out.loss.detach(), sup + mu * con)
    assert out.loss.requires_grad


def test_projection_head_replaces_the_classifier_and_gives_the_logits():
    sim = tiny_sim(MOON(proj_dim=24, **KW), rounds=1)
    head = sim.model.head
    d, c = sim.model.num_features, sim.data.num_classes
    assert isinstance(head, ProjectedHead)
    assert head.proj[0].weight.shape == (d, d) and head.proj[2].weight.shape == (24, d)
    assert head.fc.weight.shape == (c, 24)
    assert {k for k in sim.global_state if k.startswith("head.")} == {
        "head.proj.0.weight", "head.proj.0.bias", "head.proj.2.weight", "head.proj.2.bias", "head.fc.weight",
        "head.fc.bias"}
    x = torch.randn(3, sim.data.in_channels, sim.data.image_size, sim.data.image_size)
    with torch.no_grad():
        want = head.fc(head.proj(sim.model.forward_features(x)))
        torch.testing.assert_close(sim.method.predict_global(x), want)
    # Seeded: the same experiment seed gives the same projection head.
    other = tiny_sim(MOON(proj_dim=24, **KW), rounds=1)
    for k, v in sim.global_state.items():
        assert torch.equal(other.global_state[k], v), k
    assert isinstance(tiny_sim(MOON(proj_dim=None, **KW), rounds=1).model.head, torch.nn.Linear)


# -- per-client previous models -------------------------------------------------------------------------------
class _Spy(MOON):
    """MOON recording every client's trained local model."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trained: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def on_client_end(self, ctx):
        self.trained[(ctx.round, ctx.client_id)] = {k: v.detach().clone() for k, v in self.shared_tensors.items()}
        return super().on_client_end(ctx)


def test_previous_model_is_each_clients_own_last_local_model():
    method = _Spy(**KW)
    sim = tiny_sim(method, rounds=3)
    run(sim)
    last = {}
    for (r, cid) in sorted(method.trained):
        last[cid] = method.trained[(r, cid)]
    assert len(last) >= 2
    for cid in range(sim.data.num_clients):
        stored = sim.store.get(cid)
        if cid not in last:
            assert stored == {}, cid  # never trained: no previous model
            continue
        assert set(stored) == {PREV + k for k in last[cid]}
        for k, v in last[cid].items():
            assert torch.equal(stored[PREV + k], v), (cid, k)
    a, b = list(last)[:2]
    assert any(not torch.equal(sim.store.get(a)[PREV + k], sim.store.get(b)[PREV + k]) for k in last[a])


def test_previous_models_survive_a_checkpoint_round_trip():
    data = tiny_data()
    a = tiny_sim(MOON(**KW), rounds=3, data=data)
    run(a, 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = tiny_sim(MOON(**KW), rounds=3, data=data)
    b.load_state_dict(torch.load(buf, weights_only=False))
    sa, sb = _states(a), _states(b)
    assert sa and sorted(sa) == sorted(sb)
    for cid, state in sa.items():
        assert all(k.startswith(PREV) for k in state)
        for k, v in state.items():
            assert torch.equal(sb[cid][k], v), (cid, k)
    ma, mb = run(a), run(b)
    assert ma[0]["train/loss_con"] == mb[0]["train/loss_con"] > 0
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k
    for cid, state in _states(a).items():
        for k, v in state.items():
            assert torch.equal(_states(b)[cid][k], v), (cid, k)


# -- first participation ---------------------------------------------------------------------------------------
def test_first_participation_has_no_contrastive_term_by_default():
    method = MOON(**KW)
    sim = tiny_sim(method, rounds=2)
    (m1,) = run(sim, 1)
    assert m1["train/loss_con"] == 0.0
    cid = next(c for c in range(sim.data.num_clients) if c not in sim.store)
    ctx = _ctx(sim, cid, round=2)
    method.on_client_start(ctx)
    x = torch.randn(4, sim.data.in_channels, sim.data.image_size, sim.data.image_size)
    out = method.training_step((x, torch.zeros(4, dtype=torch.long)), ctx)
    assert out.parts["con"].item() == 0.0
    torch.testing.assert_close(out.loss, out.parts["sup"])


def test_random_init_negative_is_the_clients_own_fixed_random_network():
    data = tiny_data()
    method = MOON(missing_prev="random_init", **KW)
    sim = tiny_sim(method, rounds=2, data=data)
    init = global_copy(sim)
    (m1,) = run(sim, 1)
    assert m1["train/loss_con"] == 0.0  # the code's pool is empty in round 1
    r0, r0_again, r1 = method.random_init(0), method.random_init(0), method.random_init(1)
    assert set(r0) == set(init)
    floats = [k for k in init if init[k].is_floating_point()]
    assert all(torch.equal(r0[k], r0_again[k]) for k in init)  # fixed per client
    assert any(not torch.equal(r0[k], r1[k]) for k in floats)  # independent across clients
    assert all(not torch.equal(r0[k], init[k]) for k in floats if k.endswith("weight"))  # not the initial model
    # A client first seen in round 2 contrasts against its random network.
    cid = next(c for c in range(sim.data.num_clients) if c not in sim.store)
    ctx = _ctx(sim, cid, round=2)
    method.on_client_start(ctx)
    assert method._has_prev
    x = torch.randn(4, sim.data.in_channels, sim.data.image_size, sim.data.image_size)
    assert method.training_step((x, torch.zeros(4, dtype=torch.long)), ctx).parts["con"].item() > 0
    # Different from skip from round 2 on.
    skip = tiny_sim(MOON(**KW), rounds=2, data=data)
    rand = tiny_sim(MOON(missing_prev="random_init", **KW), rounds=2, data=data)
    run(skip), run(rand)
    assert any(not torch.equal(v, rand.global_state[k]) for k, v in skip.global_state.items())


# -- arguments ----------------------------------------------------------------------------------------------
def test_arguments_are_checked_and_released_code_is_accepted():
    for bad in ({"mu": -1.0}, {"tau": 0.0}, {"proj_dim": 0}, {"missing_prev": "global"}):
        with pytest.raises(ValueError):
            MOON(**bad)
    m = MOON(**MOON.released_code)
    assert m.missing_prev == "random_init"
    assert (MOON().mu, MOON().tau, MOON().proj_dim, MOON().missing_prev) == (1.0, 0.5, 256, "skip")
