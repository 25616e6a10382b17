"""RedGrape invariants (docs/reference.md 3.9): closed-form prototypes, detached balanced loss, norm matching, lambda
= 0 is FedAvg on (W + W^) h, the server prototype rule, full-balanced clients never read prototypes, inference without
W^;
plus one-step updates by hand for both update rules."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import METHODS
from fedlt.methods.redgrape import RedGrapeReducer, class_gradient_prototypes, norm_match
from fedlt.models import build_model
from fedlt.types import ClientContext, ClientUpdate, ServerMessage

RedGrape = METHODS.get("redgrape")
C, D_IN = 4, 6


def tensor_data(client_counts: list[list[int]], seed: int = 0) -> FederatedDataset:
    """Clients with exactly the given per-class counts (no augmentation); C = 4 classes."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, parts, start = [], [], [], 0
    for counts in client_counts:
        y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
        xs.append(torch.randn(y.numel(), D_IN, generator=g) + 0.7 * y[:, None].float())
        ys.append(y)
        parts.append(torch.arange(start, start + y.numel()))
        start += y.numel()
    x, y = torch.cat(xs), torch.cat(ys)
    return FederatedDataset.from_tensors(x, y, x[:8], y[:8], parts, num_classes=C)


def tensor_sim(method, client_counts, clients_per_round: int = 1, hidden: int = 5) -> Simulator:
    data = tensor_data(client_counts)
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=C, in_features=D_IN, hidden=hidden)
    return Simulator(None, data, model, method, rounds=2, clients_per_round=clients_per_round).setup()


def client_ctx(sim: Simulator, cid: int, round: int, extras: dict, seed: int = 123) -> ClientContext:
    """Loads the global state into the workspace and builds the client's context (as Simulator.train_client)."""
    sim.load_client(cid)
    sim.model.train()
    idx = sim.data.client_indices[cid]
    counts = torch.bincount(sim.data.train.y[idx], minlength=sim.data.num_classes).float()
    return ClientContext(client_id=cid, round=round, num_samples=int(idx.numel()), class_counts=counts,
                         generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                         message=ServerMessage(round=round, state=sim.global_state, extras=extras))


def train_client(sim: Simulator, ctx: ClientContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """on_client_start -> fit -> on_client_end; returns the trained parameters and the generator state that the
    fit started from (so a reference loop can replay the same batches)."""
    sim.method.on_client_start(ctx)
    gen_state = ctx.generator.get_state()
    sim.trainer.fit(sim.method, ctx, sim.data.client_indices[ctx.client_id])
    sim.method.on_client_end(ctx)
    return {k: v.detach().clone() for k, v in sim.model.named_parameters()}, gen_state


def random_prototypes(seed: int, d: int, has: list[bool] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"proto_w": torch.randn(C, C, d, generator=g), "proto_b": torch.randn(C, C, generator=g),
            "has_proto": torch.tensor(has if has is not None else [True] * C)}


# -- invariant 1 ----------------------------------------------------------------------------------------------
def test_closed_form_prototypes_equal_autograd_per_class():
    g = torch.Generator().manual_seed(0)
    n, d, c = 60, 7, 5
    h = torch.randn(n, d, generator=g)
    y = torch.randint(0, c - 1, (n,), generator=g)  # class 4 absent
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    proto_w, proto_b, counts = class_gradient_prototypes(h, y, w, b, c)
    for k in range(c - 1):
        wk, bk = w.clone().requires_grad_(), b.clone().requires_grad_()
        F.cross_entropy(h[y == k] @ wk.t() + bk, y[y == k]).backward()
        torch.testing.assert_close(proto_w[k], wk.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(proto_b[k], bk.grad, rtol=0, atol=1e-6)
        assert counts[k] == (y == k).sum()
    assert counts[c - 1] == 0 and not proto_w[c - 1].any() and not proto_b[c - 1].any()


def test_local_prototypes_stream_over_chunks_use_w_only_and_eval_mode():
    """The client's prototypes (more samples than one chunk) equal autograd on W h + b of the received model."""
    sim = tensor_sim(RedGrape(), [[300, 120, 2, 0]])
    model, method = sim.model, sim.method
    with torch.no_grad():
        model.sup_head.weight.normal_()  # W^ must not enter the prototypes
    idx = sim.data.client_indices[0]
    model.train()
    proto_w, proto_b, counts = method.local_prototypes(idx, torch.Generator().manual_seed(0))
    assert model.training  # train mode restored
    x, y = sim.data.train.x[idx], sim.data.train.y[idx]
    torch.testing.assert_close(counts, torch.tensor([300.0, 120.0, 2.0, 0.0]))
    for k in range(3):
        loss = F.cross_entropy(model.head(model.forward_features(x[y == k]).detach()), y[y == k])
        gw, gb = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
        torch.testing.assert_close(proto_w[k], gw, rtol=0, atol=1e-6)
        torch.testing.assert_close(proto_b[k], gb, rtol=0, atol=1e-6)
    assert not proto_w[3].any()


# -- invariant 2 ----------------------------------------------------------------------------------------------
def test_balanced_gradient_never_reaches_the_encoder_or_supplementary_head():
    sim = tiny_sim(RedGrape(threshold=2, lr=0.05, batch_size=16), model="resnet8", rounds=2)
    run(sim, 1)
    method, model = sim.method, sim.model
    ctx = client_ctx(sim, 0, 2, sim.reducer.broadcast(2).extras)
    method.on_client_start(ctx)
    assert method._n_bal > 0
    # Fill every .grad with a known value, as after the local backward.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    bn_key = next(k for k in model.state_dict() if k.endswith("running_mean"))
    bn_before = model.state_dict()[bn_key].clone()
    g_w, g_b = method.balanced_gradient()
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k  # P, W and W^ unchanged
        assert torch.equal(p.grad, torch.full_like(p, 0.25)), k  # nothing back-propagated (grad_P of L^bal = 0)
    assert g_w.shape == model.head.weight.shape and torch.isfinite(g_w).all() and g_w.abs().sum() > 0
    assert g_b.shape == model.head.bias.shape
    assert not torch.equal(model.state_dict()[bn_key], bn_before)  # train-mode forward updates BN statistics


def test_prototypes_use_eval_mode_and_leave_batchnorm_statistics_alone():
    sim = tiny_sim(RedGrape(threshold=2, lr=0.05, batch_size=16), model="resnet8", rounds=1)
    model, method = sim.model, sim.method
    idx = sim.data.client_indices[0]
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    proto_w, proto_b, counts = method.local_prototypes(idx, None)  # no generator: no augmentation
    assert model.training
    for k, v in bn_before.items():
        assert torch.equal(model.state_dict()[k], v), k
    x, y = sim.data.get_batch(sim.data.train, idx)
    model.eval()
    c = int(y[0])
    loss = F.cross_entropy(model.head(model.forward_features(x[y == c])), y[y == c])
    gw, gb = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
    torch.testing.assert_close(proto_w[c], gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(proto_b[c], gb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(counts, torch.bincount(y, minlength=sim.data.num_classes).float())


# -- invariant 3 ----------------------------------------------------------------------------------------------
def test_norm_matching_per_tensor_and_global():
    g = torch.Generator().manual_seed(1)
    bal_w, bal_b = torch.randn(4, 6, generator=g) * 7, torch.randn(4, generator=g) * 0.01
    loc_w, loc_b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g) * 3
    hat_w, hat_b = norm_match(bal_w, bal_b, loc_w, loc_b, "per_tensor")
    torch.testing.assert_close(hat_w.norm(), loc_w.norm())
    torch.testing.assert_close(hat_b.norm(), loc_b.norm())
    torch.testing.assert_close(F.cosine_similarity(hat_w.flatten(), bal_w.flatten(), dim=0), torch.tensor(1.0))
    torch.testing.assert_close(F.cosine_similarity(hat_b, bal_b, dim=0), torch.tensor(1.0))
    glob_w, glob_b = norm_match(bal_w, bal_b, loc_w, loc_b, "global")
    joint = torch.cat([loc_w.flatten(), loc_b]).norm()
    torch.testing.assert_close(torch.cat([glob_w.flatten(), glob_b]).norm(), joint)
    torch.testing.assert_close(glob_w / bal_w, torch.full_like(bal_w, (glob_w / bal_w)[0, 0].item()))
    assert abs(glob_b.norm() - loc_b.norm()) > 1.0  # one joint scale: the bias is not matched on its own
    zero_w, zero_b = norm_match(torch.zeros(4, 6), torch.zeros(4), loc_w, loc_b)
    assert not zero_w.any() and not zero_b.any()
    with pytest.raises(ValueError, match="norm_match"):
        norm_match(bal_w, bal_b, loc_w, loc_b, "layerwise")


def _hand_rebalancing_gradient(ref, x_bal, y_bal, proto, n_bal, loc_w, loc_b):
    """g^ by hand: autograd real part on detached features, Eq. 12 combination, per-tensor norm matching."""
    parts = []
    if n_bal:
        h_bal = ref.forward_features(x_bal).detach()
        parts.append(torch.autograd.grad(F.cross_entropy(ref.head(h_bal), y_bal), [ref.head.weight, ref.head.bias]))
    if proto is not None:
        parts.append(proto)
    bal = [(n_bal * r + (C - n_bal) * q) / C for r, q in zip(*parts)] if len(parts) == 2 else list(parts[0])
    return bal[0] * (loc_w.norm() / bal[0].norm()), bal[1] * (loc_b.norm() / bal[1].norm())


class HandReference:
    """Momentum SGD written out by hand on a copy of the received model, with RedGrape's W update."""

    def __init__(self, model, lam, lr, momentum, clip, update):
        self.ref, self.lam, self.lr, self.mom, self.clip, self.update = model, lam, lr, momentum, clip, update
        self.params = dict(model.named_parameters())
        self.bufs: dict[str, torch.Tensor] = {}

    def step(self, x, y, x_bal, y_bal, proto, n_bal):
        """One step; returns (W after the momentum step, ||g_W^loc|| unclipped)."""
        ref, names = self.ref, list(self.params)
        h = ref.forward_features(x)
        loss = F.cross_entropy(ref.head(h) + ref.sup_head(h), y)
        grads = dict(zip(names, torch.autograd.grad(loss, list(self.params.values()))))
        hat_w, hat_b = _hand_rebalancing_gradient(ref, x_bal, y_bal, proto, n_bal, grads["head.weight"],
                                                  grads["head.bias"])
        coef = 1.0
        if self.update == "paper":
            grads["head.weight"] = grads["head.weight"] + self.lam * hat_w
            grads["head.bias"] = grads["head.bias"] + self.lam * hat_b
        elif self.clip:
            total = float(torch.stack([g.norm() for g in grads.values()]).norm())
            coef = min(1.0, self.clip / (total + 1e-6))
        with torch.no_grad():
            for k, p in self.params.items():
                g = coef * grads[k]
                self.bufs[k] = g if k not in self.bufs else self.mom * self.bufs[k] + g
                p.sub_(self.lr * self.bufs[k])
            after_momentum = self.params["head.weight"].detach().clone()
            if self.update == "code":
                self.params["head.weight"].sub_(self.lr * self.lam * hat_w)
                self.params["head.bias"].sub_(self.lr * self.lam * hat_b)
        return after_momentum, grads["head.weight"].norm() if self.update == "code" else None


CASES = {  # local counts (T = 8), and the classes whose G_c enters g_bal (class 3 never has a prototype)
    "mixed": ([10, 3, 2, 0], 1, [1, 2]),  # L^bal = {0}; (1 * real + 3 * mean(G_1, G_2)) / 4
    "no_balanced_class": ([3, 2, 1, 0], 0, [0, 1, 2]),  # L^bal empty: the prototype mean alone
    "all_balanced": ([10, 9, 8, 12], 4, None),  # real part alone
}


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("update", ["code", "paper"])
@pytest.mark.parametrize("case", list(CASES))
def test_local_steps_by_hand(update, case, scaled):
    """Three mini-batch steps against a hand-written reference: P and W^ take the plain momentum step (clipped for
    "code"); W also moves by lr * lam * g^ (a separate, unclipped, momentum-free step for "code"; inside the
    momentum gradient for "paper"). g^ has the norm of the UNCLIPPED local gradient of W (invariant 3) and g_bal
    averages only the missing classes that have a prototype. ``scaled``: a gradient scaler (as with 16-bit mixed
    precision) must not change anything: true gradients are read after unscaling."""
    counts, n_bal, proto_classes = CASES[case]
    lam, lr, mom, clip = 0.5, 0.1, 0.9, 1e-3
    method = RedGrape(lam=lam, threshold=8, update=update, lr=lr, momentum=mom, grad_clip=clip, batch_size=8,
                      norm_match="per_tensor")
    sim = tensor_sim(method, [counts])
    extras = random_prototypes(5, sim.model.num_features, has=[True, True, True, False])
    extras["proto_w"][3] = 1e3  # class 3 has no prototype: must never be used
    if scaled:
        sim.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ctx = client_ctx(sim, 0, 2, extras)
    method.on_client_start(ctx)
    assert torch.equal(torch.bincount(method._y_bal, minlength=C) if n_bal else torch.zeros(C, dtype=torch.int64),
                       torch.tensor([8 if n >= 8 else 0 for n in counts]))
    proto = None
    if proto_classes is not None:
        proto = (extras["proto_w"][proto_classes].mean(0), extras["proto_b"][proto_classes].mean(0))
    hand = HandReference(copy.deepcopy(sim.model), lam, lr, mom, clip, update)
    method._optimizers = method.configure_optimizers()
    idx = sim.data.client_indices[0]
    for step, b in enumerate(idx.split(5)[:3]):
        x, y = sim.data.train.x[b], sim.data.train.y[b]
        after_momentum, loc_norm = hand.step(x, y, method._x_bal, method._y_bal, proto, n_bal)
        method.training_step((x, y), ctx)
        for k, p in sim.model.named_parameters():
            torch.testing.assert_close(p.detach(), hand.params[k].detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"step {step} {k}")
        if update == "code":  # the extra step's norm is lr * lam * ||g_W^loc||, unclipped
            extra = sim.model.head.weight.detach() - after_momentum
            torch.testing.assert_close(extra.norm(), lr * lam * loc_norm, rtol=1e-4, atol=1e-7)
            assert extra.norm() > 10 * lr * clip


# -- released code: the official loop's gradient accumulation --------------------------------------------------
def _official_loop(model, batches, x_bal, y_bal, proto, lam, lr, mom, clip, rebalancing):
    """The official decoupled trainer's local loop written out on ``model``: the gradients are zeroed once before
    the loop and, on a client with a real balanced set, right after the balanced backward; never after a step.
    Per step: forward (summed logits; detached features for the balanced set), re-balancing branch, local
    backward, per-tensor norm matching, clip of all gradients, momentum step, extra W step. Returns the
    parameters after every step."""
    head = model.head
    n_bal = 0 if y_bal is None else int(y_bal.unique().numel())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)
    model.zero_grad()
    after = []
    for x, y in batches:
        h = model.forward_features(x)
        logits = head(h) + model.sup_head(h)
        if rebalancing and n_bal:
            bal_logits = head(model.forward_features(x_bal).detach())
        loss = F.cross_entropy(logits, y)
        bal = None
        if rebalancing and n_bal:  # adds onto whatever .grad still holds from the previous step
            F.cross_entropy(bal_logits, y_bal).backward()
            if proto is not None:
                for prm, q in zip((head.weight, head.bias), proto):
                    prm.grad = (prm.grad * n_bal + q * (C - n_bal)) / C
            bal = [head.weight.grad.clone(), head.bias.grad.clone()]
            model.zero_grad()
        elif rebalancing and proto is not None:
            bal = [proto[0].clone(), proto[1].clone()]
        loss.backward()  # accumulates unless the branch above zeroed the gradients
        if bal is not None:
            bal = [b * (prm.grad.norm() / b.norm()) for b, prm in zip(bal, (head.weight, head.bias))]
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if bal is not None:
            with torch.no_grad():
                head.weight.sub_(lr * lam * bal[0])
                head.bias.sub_(lr * lam * bal[1])
        after.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return after


ACCUMULATION_CASES = {  # (local counts with T = 8, round, classes whose G_c enters g_bal)
    "round_one": ([10, 3, 2, 0], 1, None),  # no re-balancing: the whole model accumulates
    "no_balanced_class": ([5, 4, 3, 0], 2, [0, 1, 2]),  # prototypes only: accumulates, norm of the running sum
    "mixed": ([10, 3, 2, 0], 2, [1, 2]),  # restarts every step; the carried head gradient enters g_bal
    "all_balanced": ([10, 9, 8, 12], 2, None),  # restarts; real part (plus the carried head gradient) alone
}


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("case", list(ACCUMULATION_CASES))
def test_grad_accumulation_reproduces_the_official_loop(case, scaled):
    """grad_accumulation=True: four steps agree with the hand-written official loop to float rounding (also under
    a gradient scaler); grad_accumulation=False (fresh gradients every step) does not."""
    counts, rnd, proto_classes = ACCUMULATION_CASES[case]
    lam, lr, mom, clip = 0.5, 0.1, 0.9, 0.3
    results = {}
    for acc in (True, False):
        method = RedGrape(lam=lam, threshold=8, lr=lr, momentum=mom, grad_clip=clip, batch_size=8,
                          **{**RedGrape.released_code, "grad_accumulation": acc})
        sim = tensor_sim(method, [counts])
        extras = random_prototypes(5, sim.model.num_features, has=[True, True, True, False])
        if scaled:
            sim.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        ctx = client_ctx(sim, 0, rnd, extras)
        method.on_client_start(ctx)
        ref = copy.deepcopy(sim.model)
        rebalancing = rnd > 1
        proto = None
        if proto_classes is not None:
            proto = (extras["proto_w"][proto_classes].mean(0), extras["proto_b"][proto_classes].mean(0))
        idx = sim.data.client_indices[0]
        batches = [(sim.data.train.x[b], sim.data.train.y[b]) for b in idx[torch.randperm(idx.numel(),
                   generator=torch.Generator().manual_seed(1))].split(3)[:4]]
        assert len(batches) == 4
        expected = _official_loop(ref, batches, method._x_bal, method._y_bal, proto, lam, lr, mom, clip,
                                  rebalancing)
        method._optimizers = method.configure_optimizers()
        got = []
        for batch in batches:
            method.training_step(batch, ctx)
            got.append({k: v.detach().clone() for k, v in sim.model.named_parameters()})
        results[acc] = (got, expected)
    got, expected = results[True]
    for step, (g, e) in enumerate(zip(got, expected)):
        for k in e:
            torch.testing.assert_close(g[k], e[k], rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")
    fresh, expected = results[False]
    assert torch.allclose(fresh[0]["head.weight"], expected[0]["head.weight"], rtol=1e-5, atol=1e-6)  # step 1
    assert not torch.allclose(fresh[-1]["head.weight"], expected[-1]["head.weight"], rtol=1e-4, atol=1e-5)


def test_grad_accumulation_over_a_whole_local_round():
    """Through the local loop (fit, two epochs, round 1): the running gradient sum of the official loop."""
    lr, mom, clip = 0.05, 0.9, 0.5
    method = RedGrape(threshold=8, lr=lr, momentum=mom, grad_clip=clip, batch_size=8, local_epochs=2,
                      **RedGrape.released_code)
    sim = tensor_sim(method, [[10, 6, 3, 1]])
    ctx = client_ctx(sim, 0, 1, {})
    ref = copy.deepcopy(sim.model)
    got, gen_state = train_client(sim, ctx)
    gen = torch.Generator()
    gen.set_state(gen_state)
    order = sim.trainer.batch_indices(sim.data.client_indices[0], SimpleNamespace(generator=gen), 8, 2)
    assert len(order) >= 4
    batches = [sim.data.get_batch(sim.data.train, b, gen, train=True) for b in order]
    expected = _official_loop(ref, batches, None, None, None, 0.1, lr, mom, clip, rebalancing=False)[-1]
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # Fresh gradients every step (the default) end elsewhere.
    sim.method.grad_accumulation = False
    fresh, _ = train_client(sim, client_ctx(sim, 0, 1, {}))
    assert not torch.allclose(fresh["fc.weight"], expected["fc.weight"], rtol=1e-4, atol=1e-5)


# -- invariant 4 ----------------------------------------------------------------------------------------------
def _reference_fit(model, data, idx, gen_state, lr, momentum, batch_size, epochs, trainer):
    """Plain momentum SGD on CE((W + W^) h) over the same batches and augmentations as the client's fit."""
    gen = torch.Generator()
    gen.set_state(gen_state)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = trainer.batch_indices(idx, SimpleNamespace(generator=gen), batch_size, epochs)
    for b in order:
        x, y = data.get_batch(data.train, b, gen, train=True)
        h = model.forward_features(x)
        F.cross_entropy(model.head(h) + model.sup_head(h), y).backward()
        opt.step()
        opt.zero_grad()
    return dict(model.named_parameters())


def test_lambda_zero_is_plain_sgd_on_summed_logits():
    method = RedGrape(lam=0.0, threshold=2, lr=0.05, momentum=0.9, batch_size=16, local_epochs=2, grad_clip=None)
    sim = tiny_sim(method, rounds=2)
    run(sim, 1)  # round 2 has global prototypes, so with lam > 0 re-balancing would be active
    extras = sim.reducer.broadcast(2).extras
    assert bool(extras["has_proto"].any())
    cid = max(range(sim.data.num_clients), key=lambda k: int(sim.data.client_indices[k].numel()))
    ctx = client_ctx(sim, cid, 2, extras)
    ref = copy.deepcopy(sim.model)
    got, gen_state = train_client(sim, ctx)
    expected = _reference_fit(ref, sim.data, sim.data.client_indices[cid], gen_state, 0.05, 0.9, 16, 2, sim.trainer)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v.detach(), rtol=1e-5, atol=1e-6, msg=k)
    # The same client with lam > 0 does re-balance (so the comparison above can fail).
    method.lam = 0.1
    other, _ = train_client(sim, client_ctx(sim, cid, 2, extras))
    assert not torch.allclose(other["head.weight"], got["head.weight"], atol=1e-4)


def test_defaults_follow_the_paper_and_released_code_holds_the_codes_rules():
    m = RedGrape()
    assert (m.update, m.rebalance_first_round, m.norm_match, m.grad_accumulation) == ("paper", True, "global", False)
    code = RedGrape(**RedGrape.released_code)
    assert (code.update, code.rebalance_first_round, code.norm_match, code.grad_accumulation) == (
        "code", False, "per_tensor", True)


def test_no_rebalancing_in_round_one_with_the_codes_setting():
    a = tiny_sim(RedGrape(lam=0.1, threshold=2, lr=0.05, batch_size=16, rebalance_first_round=False), rounds=1)
    b = tiny_sim(RedGrape(lam=0.0, threshold=2, lr=0.05, batch_size=16, rebalance_first_round=False), rounds=1)
    c = tiny_sim(RedGrape(lam=0.1, threshold=2, lr=0.05, batch_size=16), rounds=1)  # default: the paper's
    run(a), run(b), run(c)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k
    assert not torch.equal(c.global_state["head.weight"], a.global_state["head.weight"])


# -- invariant 5 ----------------------------------------------------------------------------------------------
def _fake_update(cid: int, weight: float, owned: list[int], d: int, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    proto_w, proto_b = torch.zeros(C, C, d), torch.zeros(C, C)
    owner = torch.zeros(C)
    for c in owned:
        proto_w[c], proto_b[c], owner[c] = torch.randn(C, d, generator=g), torch.randn(C, generator=g), 1.0
    return ClientUpdate(cid, weight, {"theta": torch.full((3,), float(cid))},
                        {"proto_w": proto_w, "proto_b": proto_b, "proto_owner": owner})


def _reducer(d: int) -> RedGrapeReducer:
    reducer = RedGrapeReducer(C, d)
    reducer.setup({"theta": torch.zeros(3)}, torch.device("cpu"))
    return reducer


def test_server_prototype_rule_unweighted_mean_and_keep_unowned():
    d = 3
    reducer = _reducer(d)
    ups = [_fake_update(0, 10.0, [0, 1], d, 1), _fake_update(1, 90.0, [1, 2], d, 2)]
    reducer.begin_round(1)
    for u in ups:
        reducer.accumulate(u)
    reducer.reduce(None)
    reducer.server_step(1)
    torch.testing.assert_close(reducer.global_state["theta"], torch.full((3,), 0.9))  # weighted FedAvg
    pw, pb = reducer.proto_w, reducer.proto_b
    torch.testing.assert_close(pw[0], ups[0].extras["proto_w"][0])
    torch.testing.assert_close(pw[1], (ups[0].extras["proto_w"][1] + ups[1].extras["proto_w"][1]) / 2)  # unweighted
    torch.testing.assert_close(pb[1], (ups[0].extras["proto_b"][1] + ups[1].extras["proto_b"][1]) / 2)
    torch.testing.assert_close(pw[2], ups[1].extras["proto_w"][2])
    assert not pw[3].any() and reducer.has_proto.tolist() == [True, True, True, False]
    extras = reducer.broadcast_extras(2)
    assert extras["proto_w"] is reducer.proto_w and extras["has_proto"].tolist() == [True, True, True, False]
    old_w, old_b = pw.clone(), pb.clone()
    # Round 2: only class 0 is owned -> classes 1, 2 keep their prototypes bit for bit.
    new = _fake_update(3, 5.0, [0], d, 3)
    reducer.begin_round(2)
    reducer.accumulate(new)
    reducer.reduce(None)
    reducer.server_step(2)
    assert torch.equal(reducer.proto_w[0], new.extras["proto_w"][0])
    for c in (1, 2, 3):
        assert torch.equal(reducer.proto_w[c], old_w[c]) and torch.equal(reducer.proto_b[c], old_b[c]), c
    assert torch.equal(extras["proto_w"], old_w)  # the previous broadcast is not modified in place
    assert reducer.has_proto.tolist() == [True, True, True, False]


def test_reducer_checkpoint_round_trip():
    d = 3
    reducer = _reducer(d)
    reducer.begin_round(1)
    reducer.accumulate(_fake_update(0, 2.0, [0, 3], d, 7))
    reducer.reduce(None)
    reducer.server_step(1)
    state = reducer.state_dict()
    fresh = _reducer(d)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.proto_w, reducer.proto_w) and torch.equal(fresh.proto_b, reducer.proto_b)
    assert torch.equal(fresh.has_proto, reducer.has_proto) and fresh.has_proto.dtype == torch.bool
    assert torch.equal(fresh.global_state["theta"], reducer.global_state["theta"])


def test_server_prototypes_come_from_the_received_model_through_the_pipeline():
    """After round 1, G_c is the unweighted mean over the owners of class c of grad_W CE on the initial model
    (computed before any local step), whatever the client sizes."""
    counts = [[10, 9, 3, 0], [12, 12, 12, 12], [0, 4, 8, 20]]
    sim = tensor_sim(RedGrape(threshold=8, lr=0.1, momentum=0.9, batch_size=8), counts, clients_per_round=3)
    init = copy.deepcopy(sim.model).eval()
    sim.run_round(1)
    data = sim.data
    for c in range(C):
        grads = []
        for k in range(3):
            idx = data.client_indices[k]
            x, y = data.train.x[idx], data.train.y[idx]
            if (y == c).any():
                loss = F.cross_entropy(init(x[y == c]), y[y == c])
                grads.append(torch.autograd.grad(loss, [init.head.weight, init.head.bias]))
        torch.testing.assert_close(sim.reducer.proto_w[c], torch.stack([g[0] for g in grads]).mean(0),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sim.reducer.proto_b[c], torch.stack([g[1] for g in grads]).mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert bool(sim.reducer.has_proto.all())


# -- invariant 6 ----------------------------------------------------------------------------------------------
def test_fully_balanced_client_never_reads_a_prototype():
    sim = tensor_sim(RedGrape(threshold=8, lr=0.1, momentum=0.9, batch_size=8, local_epochs=2),
                     [[12, 9, 8, 10], [12, 9, 3, 10]])
    d = sim.model.num_features
    results = {}
    for cid in (0, 1):
        for seed in (1, 2):
            got, _ = train_client(sim, client_ctx(sim, cid, 3, random_prototypes(seed, d)))
            results[cid, seed] = got
    for k, v in results[0, 1].items():
        assert torch.equal(v, results[0, 2][k]), k
    # A client below T for a class does read G_c, so its result depends on G.
    assert not torch.equal(results[1, 1]["head.weight"], results[1, 2]["head.weight"])
    # Sanity: the fully balanced client does re-balance, with its real balanced set only.
    sim.method.on_client_start(client_ctx(sim, 0, 3, random_prototypes(1, d)))
    assert sim.method._active and sim.method._n_bal == C and sim.method._proto_part is None


# -- invariant 7 ----------------------------------------------------------------------------------------------
def test_inference_ignores_the_supplementary_head():
    sim = tiny_sim(RedGrape(threshold=2, lr=0.05, batch_size=16), rounds=1)
    run(sim)
    model, method = sim.model, sim.method
    model.eval()
    x = sim.data.get_batch(sim.data.test, torch.arange(8))[0]
    with torch.no_grad():
        out = method.predict_global(x)
        torch.testing.assert_close(out, model.head(model.forward_features(x)))
        model.sup_head.weight.add_(torch.randn_like(model.sup_head.weight))
        model.sup_head.bias.add_(5.0)
        assert torch.equal(method.predict_global(x), out)


# -- end to end and arguments ---------------------------------------------------------------------------------
def test_two_rounds_train_everything_and_keep_prototypes():
    sim = tiny_sim(RedGrape(threshold=2, lr=0.05, momentum=0.9, batch_size=16), rounds=2)
    before = global_copy(sim)
    assert {"sup_head.weight", "sup_head.bias", "head.weight"} <= set(before)
    metrics = run(sim)
    assert all(m["train/loss"] > 0 and torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)
    for k in ("head.weight", "sup_head.weight", "features.0.weight"):
        assert not torch.equal(before[k], sim.global_state[k]), k
    assert bool(sim.reducer.has_proto.any()) and torch.isfinite(sim.reducer.proto_w).all()
    assert 0.0 <= sim.evaluate()["test/global/acc"] <= 1.0


def test_supplementary_head_init_is_seeded_and_independent_of_the_global_rng():
    def build(global_seed: int, seed: int = 0) -> Simulator:
        data = tensor_data([[5, 5, 5, 5]])
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=C, in_features=D_IN, hidden=5)
        torch.manual_seed(global_seed)
        return Simulator(None, data, model, RedGrape(), rounds=1, clients_per_round=1, seed=seed).setup()

    a, b, c = build(1), build(99), build(1, seed=3)
    assert torch.equal(a.model.sup_head.weight, b.model.sup_head.weight)
    assert torch.equal(a.model.sup_head.bias, b.model.sup_head.bias)
    assert not torch.equal(a.model.sup_head.weight, c.model.sup_head.weight)  # drawn from the experiment seed
    bound = 1.0 / a.model.num_features ** 0.5
    assert a.model.sup_head.weight.abs().max() <= bound and a.model.sup_head.bias.abs().max() <= bound
    assert not torch.equal(a.model.sup_head.weight, a.model.head.weight)


@pytest.mark.parametrize("kwargs, match", [
    ({"lam": -0.1}, "lam"),
    ({"lam": float("nan")}, "lam"),
    ({"threshold": 0}, "threshold"),
    ({"threshold": 2.5}, "threshold"),
    ({"update": "fused"}, "update"),
    ({"norm_match": "layerwise"}, "norm_match"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"grad_accumulation": 1}, "grad_accumulation"),
    ({"grad_accumulation": True, "update": "paper"}, "grad_accumulation"),
])
def test_invalid_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RedGrape(**kwargs)
