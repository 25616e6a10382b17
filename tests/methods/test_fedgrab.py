"""Fed-GraB invariants: DPA prior by hand, one PID step by hand, neutral balancer = plain per-class BCE,
rank-independent broadcast, controller state kept per client; the released code's four differences
(``FedGraB.released_code``) against small hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run, tiny_sim

from fedlt.engine.sharding import client_seed, sample_cohort, seeded_generator
from fedlt.methods.fedgrab import (
    FedGraB,
    balance_map,
    dpa_prior,
    dpa_tail_mask,
    permuted_cohort_weights,
    pid_delta_step,
    released_tail_skips,
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


# -- released code (github ZackZikaiXiao/FedGraB) -------------------------------------------------------------------


def _copy(tensors):
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_released_code_values_and_validation():
    assert FedGraB.released_code == {"train_classifier": False, "aggregation_weights": "permuted",
                                     "tail_selection": "random_per_batch", "dpa": False,
                                     "error": "raw"}
    m = FedGraB()
    assert (m.train_classifier, m.aggregation_weights, m.tail_selection, m.dpa) == (True, "matched", "all", True)
    with pytest.raises(ValueError, match="aggregation_weights"):
        FedGraB(aggregation_weights="shuffled")
    with pytest.raises(ValueError, match="tail_selection"):
        FedGraB(tail_selection="random")
    with pytest.raises(ValueError, match="train_classifier"):
        FedGraB(train_classifier="no")
    with pytest.raises(ValueError, match="dpa"):
        FedGraB(dpa=0)


def test_frozen_classifier_stays_bit_identical_while_the_body_trains():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16, train_classifier=False), rounds=2, clients_per_round=3)
    start = _copy(sim.global_state)
    heads = [k for k in start if k.startswith("head.")]
    assert heads == ["head.weight", "head.bias"]
    message = sim.reducer.broadcast(1)
    sim.reducer.begin_round(1)
    sim.train_client(0, message)
    local = sim.method.shared_tensors
    for k in heads:  # one local round: the head is untouched (no gradient at all), the body moved
        assert torch.equal(local[k], start[k])
    assert all(p.grad is None for p in sim.model.head.parameters())
    assert any(not torch.equal(local[k], start[k]) for k in start if k not in heads)
    prior = sim.reducer.broadcast(1).extras["prior"]
    run(sim)
    for k in heads:  # the aggregated head is held bit for bit (not re-averaged)
        assert torch.equal(sim.global_state[k], start[k])
    assert any(not torch.equal(sim.global_state[k], start[k]) for k in start if k not in heads)
    # Documented consequence: the DPA prior (and tail set) is the constant one of the initial classifier.
    assert torch.equal(sim.reducer.broadcast(3).extras["prior"], prior)
    torch.testing.assert_close(prior, dpa_prior(start["head.weight"]))


def test_paper_mode_trains_the_classifier():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16), rounds=1, clients_per_round=3)
    start = _copy(sim.global_state)
    message = sim.reducer.broadcast(1)
    sim.reducer.begin_round(1)
    sim.train_client(0, message)
    assert not torch.equal(sim.method.shared_tensors["head.weight"], start["head.weight"])
    prior = sim.reducer.broadcast(1).extras["prior"]
    run(sim)
    assert not torch.equal(sim.global_state["head.weight"], start["head.weight"])
    assert not torch.equal(sim.reducer.broadcast(2).extras["prior"], prior)


def test_permuted_weights_are_a_seeded_permutation_of_the_cohort_counts():
    sizes = [10, 20, 30, 40, 50, 60]
    weights = permuted_cohort_weights(7, 3, [5, 1, 3], sizes)
    # Hand rule: sorted cohort (1, 3, 5); pi = randperm(3) from the (seed, tag, round) generator.
    pi = torch.randperm(3, generator=seeded_generator(7, "fedgrab/aggregation_weights", 3)).tolist()
    ids = [1, 3, 5]
    assert weights == {ids[i]: float(sizes[ids[pi[i]]]) for i in range(3)}
    assert sorted(weights.values()) == [20.0, 40.0, 60.0]  # the total weight is unchanged
    assert permuted_cohort_weights(7, 3, [3, 5, 1], sizes) == weights  # only the cohort as a set matters


def test_permuted_aggregation_pairs_each_model_with_another_clients_count():
    kwargs = {"lr": 0.05, "batch_size": 16, "persist_state": False}  # fresh controllers: a solo rerun is identical
    sim = tiny_sim(FedGraB(aggregation_weights="permuted", **kwargs), rounds=1, clients_per_round=3, seed=1)
    n = sim.data.num_clients
    cohort = sample_cohort(sim.seed, 1, n, 3)
    sizes = [int(i.numel()) for i in sim.data.client_indices]
    pi = torch.randperm(3, generator=seeded_generator(sim.seed, "fedgrab/aggregation_weights", 1)).tolist()
    assert pi != [0, 1, 2] and len({sizes[c] for c in cohort}) == 3  # the pairing matters in this example
    message = sim.reducer.broadcast(1)
    models = []
    for cid in cohort:  # each client trained alone from the broadcast (local training ignores the weights)
        ctx_seed = client_seed(sim.seed, 1, cid)
        sim.client_pass(cid, message, ctx_seed, lambda ctx: (sim.method.on_client_start(ctx),
                                                             sim.trainer.fit(sim.method, ctx,
                                                                             sim.data.client_indices[ctx.client_id])))
        models.append(_copy(sim.method.shared_tensors))
    permuted = [float(sizes[cohort[pi[i]]]) for i in range(3)]  # model i <-> count of client pi(i)
    matched = [float(sizes[c]) for c in cohort]

    def mean(ws):
        return {k: sum(w * m[k].double() for w, m in zip(ws, models)) / sum(ws) for k in models[0]}

    expected, paper = mean(permuted), mean(matched)
    sim.run_round(1)
    for k, v in expected.items():
        if v.is_floating_point() and sim.global_state[k].is_floating_point():
            torch.testing.assert_close(sim.global_state[k].double(), v, rtol=1e-5, atol=1e-6)
    gap = max(float((expected[k] - paper[k]).abs().max()) for k in expected if expected[k].is_floating_point())
    assert gap > 1e-4  # the paper's matched weights give another global model

    # Paper default: the same clients averaged with their own counts.
    sim = tiny_sim(FedGraB(**kwargs), rounds=1, clients_per_round=3, seed=1)
    sim.run_round(1)
    for k, v in paper.items():
        if v.is_floating_point() and sim.global_state[k].is_floating_point():
            torch.testing.assert_close(sim.global_state[k].double(), v, rtol=1e-5, atol=1e-6)


def test_permuted_weights_need_the_rounds_cohort():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16, aggregation_weights="permuted"), rounds=1)
    sim.reducer.begin_round(1)
    with pytest.raises(RuntimeError, match="no cohort was sampled"):
        sim.train_client(0, sim.reducer.broadcast(1))


def test_released_tail_draw_by_hand():
    u = torch.rand(4, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    torch.testing.assert_close(u, torch.tensor([0.368896, 0.013366, 0.591780, 0.092639], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # Five tail classes, p = 0.1^(s / 4) with s = classes skipped so far: class 0 p = 1 (no draw) -> skip, s = 1;
    # class 1: 0.3689 < 0.5623 -> skip, s = 2; class 2: 0.0134 < 0.3162 -> skip, s = 3;
    # class 3: 0.5918 >= 0.1778 -> re-weighted; class 4: 0.0926 < 0.1778 -> skip.
    skip = released_tail_skips(torch.ones(5), torch.Generator().manual_seed(123))
    assert skip.tolist() == [True, True, True, False, True]
    # Tail classes 1, 2, 4, 5 (T = 4, p = 0.1^(s / 3)): class 1 first -> skip; class 2: 0.3689 < 0.4642 -> skip;
    # class 4: 0.0134 < 0.2154 -> skip; class 5: 0.5918 >= 0.1 -> re-weighted. Closed classes are never skipped.
    skip = released_tail_skips(torch.tensor([0.0, 1, 1, 0, 1, 1]), torch.Generator().manual_seed(123))
    assert skip.tolist() == [False, True, True, False, True, False]
    # One tail class: probability 1, no draw consumed.
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    assert released_tail_skips(torch.tensor([0.0, 1.0, 0.0]), g).tolist() == [False, True, False]
    assert torch.equal(g.get_state(), before)
    assert released_tail_skips(torch.zeros(3), g).tolist() == [False, False, False]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # class 0 (the first tail class) is never re-weighted
        assert bool(released_tail_skips(torch.ones(10), g)[0])


def _one_step(method_kwargs, acc, pid):
    """One training step of client 0 in round 1 from the given controller state; returns (method, ctx, batch)."""
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=8, **method_kwargs), rounds=1)
    message = sim.reducer.broadcast(1)
    out = {}

    def body(ctx):
        ctx.state.update({"sgb_acc": acc.clone(), "sgb_pid": pid.clone()})
        sim.method.on_client_start(ctx)
        idx = sim.data.client_indices[0][:8]
        batch = sim.data.get_batch(sim.data.train, idx, ctx.generator, train=False)
        with torch.no_grad():
            logits = sim.model(batch[0])
        step = sim.method.training_step(batch, ctx)
        out.update(ctx=ctx, logits=logits, y=batch[1], loss=step.loss.detach())
        return out

    sim.client_pass(0, message, client_seed(sim.seed, 1, 0), body)
    return sim, out


def test_random_per_batch_step_matches_a_hand_computed_reweighting():
    c = 10
    acc = torch.stack([torch.linspace(0.1, 1.0, c), torch.full((c,), 0.5)])
    pid = torch.zeros(4, c)
    kwargs = {"tail_selection": "random_per_batch", "dpa": False}
    sim, out = _one_step(kwargs, acc, pid)
    ctx = out["ctx"]
    ones = torch.ones(c)
    new_pid = pid_delta_step(pid, sgb_measure(acc), ones, (10.0, 0.01, 0.1), 100.0)
    pos_w, neg_w = sgb_weights(new_pid[0], ones)
    skip = released_tail_skips(ones, seeded_generator(sim.seed, "fedgrab/tail_selection", 1, 0))
    assert bool(skip[0]) and not bool(skip.all())
    pos_w, neg_w = torch.where(skip, 1.0, pos_w), torch.where(skip, 1.0, neg_w)
    loss, grads = sgb_loss(out["logits"], out["y"], pos_w, neg_w)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ctx.state["sgb_pid"], new_pid)
    expected_acc = acc + torch.where(skip, 0.0, grads)
    torch.testing.assert_close(ctx.state["sgb_acc"], expected_acc, rtol=1e-5, atol=1e-7)
    assert torch.equal(ctx.state["sgb_acc"][:, skip], acc[:, skip])  # skipped classes accumulate nothing
    # Paper default ("all"): every open class is re-weighted and accumulates.
    _, paper = _one_step({"dpa": False}, acc, pid)
    all_w = sgb_weights(new_pid[0], ones)
    loss_all, grads_all = sgb_loss(paper["logits"], paper["y"], *all_w)
    torch.testing.assert_close(paper["loss"], loss_all, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(paper["ctx"].state["sgb_acc"], acc + grads_all, rtol=1e-5, atol=1e-7)
    assert float((paper["loss"] - out["loss"]).abs()) > 1e-4


def test_released_selection_never_reweights_class_zero_over_a_round():
    for selection, touched in (("random_per_batch", False), ("all", True)):
        sim = tiny_sim(FedGraB(lr=0.05, batch_size=16, dpa=False, tail_selection=selection), rounds=1,
                       clients_per_round=6)
        run(sim)
        for cid in range(6):
            state = sim.store.get(cid)
            assert bool((state["sgb_acc"][:, 0] > 0).any()) == touched  # (class 0's negatives, at least)
            assert float(state["sgb_acc"][:, 1:].sum()) > 0  # the later classes are re-weighted in some batches


def test_without_dpa_every_controller_is_open():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16, dpa=False), rounds=1, clients_per_round=6)
    extras = sim.reducer.broadcast(1).extras
    assert set(extras) == {"tail_mask"}  # no prior is estimated
    torch.testing.assert_close(extras["tail_mask"], torch.ones(sim.data.num_classes))
    run(sim)
    for cid in range(6):
        assert bool((sim.store.get(cid)["sgb_pid"][0] != 0).all())  # every class's controller reacted
    # Paper default: the DPA closes the controllers of the classes at or above the uniform prior.
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16), rounds=1, clients_per_round=6)
    tail = sim.reducer.broadcast(1).extras["tail_mask"].bool()
    assert bool((~tail).any()) and bool(tail.any())
    run(sim)
    for cid in range(6):
        assert bool((sim.store.get(cid)["sgb_pid"][0][~tail] == 0).all())


def test_all_released_code_settings_together_train():
    sim = tiny_sim(FedGraB(lr=0.05, batch_size=16, **FedGraB.released_code), rounds=2, clients_per_round=3)
    start = _copy(sim.global_state)
    for metrics in run(sim):
        assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert torch.equal(sim.global_state["head.weight"], start["head.weight"])
    assert any(not torch.equal(sim.global_state[k], start[k]) for k in start if not k.startswith("head."))
