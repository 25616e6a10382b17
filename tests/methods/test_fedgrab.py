"""Fed-GraB invariants: DPA prior by hand, one PID step by hand, neutral balancer = plain per-class BCE,
rank-independent broadcast, controller state kept per client."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run, tiny_sim

from fedlt.methods.fedgrab import (
    FedGraB,
    balance_map,
    dpa_prior,
    dpa_tail_mask,
    pid_delta_step,
    sgb_loss,
    sgb_measure,
    sgb_weights,
)

GAINS = (10.0, 0.01, 0.1)


def test_dpa_prior_from_a_hand_built_classifier():
    w = torch.tensor([[3.0, 4.0], [3.0, 0.0], [0.0, -2.0]])  # row norms 5, 3, 2
    prior = dpa_prior(w)
    torch.testing.assert_close(prior, torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(dpa_tail_mask(prior), torch.tensor([0.0, 1.0, 1.0]))  # below 1/3
    torch.testing.assert_close(dpa_tail_mask(prior, tail_threshold=0.5), torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(dpa_prior(w, norm_power=2.0), torch.tensor([25.0, 9.0, 4.0]) / 38.0)
    torch.testing.assert_close(dpa_prior(torch.zeros(4, 3)), torch.full((4,), 0.25))


def test_uniform_prior_and_zero_error_give_unit_weights_and_plain_bce():
    c, n = 4, 6
    uniform = torch.full((c,), 1.0 / c)
    closed = dpa_tail_mask(uniform)
    assert not bool(closed.any())
    pid = torch.zeros(4, c)
    # Closed controllers: nothing moves even with a large error; open controllers with zero error stay at u = 0.
    assert torch.equal(pid_delta_step(pid, torch.full((c,), 7.0), closed, GAINS, 100.0), pid)
    stepped = pid_delta_step(pid, torch.zeros(c), torch.ones(c), GAINS, 100.0)
    assert torch.equal(stepped, pid)
    for mask in (closed, torch.ones(c)):
        pos_w, neg_w = sgb_weights(stepped[0], mask)
        torch.testing.assert_close(pos_w, torch.ones(c))
        torch.testing.assert_close(neg_w, torch.ones(c))
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]] * 3 + [[-0.3, 0.7, 0.1, -2.0]] * 3)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, grads = sgb_loss(logits, y, torch.ones(c), torch.ones(c))
    # Hand formula: -(1/n) sum_i sum_c [y_ic log s(z_ic) + (1 - y_ic) log(1 - s(z_ic))].
    total = 0.0
    for i in range(n):
        for k in range(c):
            s = 1.0 / (1.0 + math.exp(-float(logits[i, k])))
            total -= math.log(s) if int(y[i]) == k else math.log(1.0 - s)
    torch.testing.assert_close(loss, torch.tensor(total / n))
    onehot = F.one_hot(y, c).float()
    g = (torch.sigmoid(logits) - onehot).abs() / n
    torch.testing.assert_close(grads, torch.stack([(g * onehot).sum(0), (g * (1 - onehot)).sum(0)]))


def test_one_pid_step_and_weights_by_hand():
    # Class 0 open with state u = 0.5, e_t = -1, e_{t-1} = 2; class 1 closed with the same state.
    pid = torch.tensor([[0.5, 0.5], [-1.0, -1.0], [2.0, 2.0], [4.0, 4.0]])
    current = torch.tensor([0.2, 3.0])  # pos - neg
    new = pid_delta_step(pid, current, torch.tensor([1.0, 0.0]), GAINS, 100.0)
    # e = -0.2 ; du = 10 (-0.2 + 1) + 0.01 (-0.2) + 0.1 (-0.2 + 2 + 2) = 8 - 0.002 + 0.38 = 8.378
    torch.testing.assert_close(new[:, 0], torch.tensor([8.878, -0.2, -1.0, 2.0]))
    torch.testing.assert_close(new[:, 1], pid[:, 1])
    # Output limit.
    clamped = pid_delta_step(pid, torch.tensor([-50.0, 0.0]), torch.tensor([1.0, 0.0]), GAINS, 100.0)
    assert float(clamped[0, 0]) == 100.0
    # Released-code mapping (10/9) / (1/9 + exp(-0.5 x)): positives up-weighted, negatives down-weighted.
    pos_w, neg_w = sgb_weights(new[0], torch.tensor([1.0, 0.0]))
    ref = (10 / 9) / (1 / 9 + math.exp(-0.5 * 8.878))
    ref_neg = (10 / 9) / (1 / 9 + math.exp(0.5 * 8.878))
    torch.testing.assert_close(pos_w, torch.tensor([ref, 1.0]))
    torch.testing.assert_close(neg_w, torch.tensor([ref_neg, 1.0]))
    torch.testing.assert_close(balance_map(torch.tensor(0.0)), torch.tensor(1.0))


def test_weighted_loss_gradient_is_the_reweighted_bce_gradient():
    logits = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    pos_w, neg_w = torch.rand(5) + 0.5, torch.rand(5) + 0.5
    loss, grads = sgb_loss(logits, y, pos_w, neg_w)
    (g,) = torch.autograd.grad(loss, logits)
    onehot = F.one_hot(y, 5).float()
    w = pos_w * onehot + neg_w * (1 - onehot)
    torch.testing.assert_close(g, (torch.sigmoid(logits.detach()) - onehot) / 8 * w)  # hook-style re-weighting
    torch.testing.assert_close(grads, torch.stack([(g.abs() * onehot).sum(0), (g.abs() * (1 - onehot)).sum(0)]))


def test_broadcast_is_deterministic_and_follows_the_global_classifier():
    sims = []
    for global_seed in (1, 2):
        sim = tiny_sim(FedGraB(lr=0.05, batch_size=16))
        torch.manual_seed(global_seed)  # the server step must ignore the global RNG
        sims.append(sim)
    a, b = (s.reducer.broadcast(1).extras for s in sims)
    assert torch.equal(a["prior"], b["prior"]) and torch.equal(a["tail_mask"], b["tail_mask"])
    sim = sims[0]
    run(sim)
    extras = sim.reducer.broadcast(3).extras
    prior = dpa_prior(sim.reducer.global_state["head.weight"])
    torch.testing.assert_close(extras["prior"], prior)
    torch.testing.assert_close(extras["tail_mask"], (prior < 1.0 / prior.numel()).float())


def test_controller_state_is_kept_per_client_and_training_is_balanced():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16), rounds=2, clients_per_round=6)
    run(sim, rounds=1)
    first = {cid: {k: v.clone() for k, v in sim.store.get(cid).items()} for cid in range(6)}
    for state in first.values():
        assert set(state) == {"sgb_acc", "sgb_pid"}
        assert bool((state["sgb_acc"] >= 0).all()) and float(state["sgb_acc"][1].sum()) > 0
        tail = sim.reducer.broadcast(1).extras["tail_mask"].bool()
        assert bool((state["sgb_pid"][0][~tail] == 0).all())  # closed (head) controllers never move
        assert bool(tail.any()) and bool((state["sgb_pid"][0][tail] != 0).any())  # open (tail) ones react
    run(sim)
    for cid in range(6):
        after = sim.store.get(cid)["sgb_acc"]
        assert bool((after >= first[cid]["sgb_acc"] - 1e-6).all()) and not torch.equal(after, first[cid]["sgb_acc"])


def test_normalized_error_is_scale_free_and_bounded():
    acc = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    torch.testing.assert_close(sgb_measure(acc), torch.tensor([-0.5, 0.0, 0.0]))
    torch.testing.assert_close(sgb_measure(1000.0 * acc), sgb_measure(acc))
    torch.testing.assert_close(sgb_measure(acc, "raw"), torch.tensor([-2.0, 0.0, 0.0]))
    # The raw error grows with the accumulation; the normalized one stays in [-1, 1].
    assert float(sgb_measure(1000.0 * acc, "raw").abs().max()) == 2000.0
    assert float(sgb_measure(torch.tensor([[0.0], [5.0]])).abs().max()) == 1.0
    with pytest.raises(ValueError, match="error"):
        FedGraB(error="ratio")
