"""FedTAIL invariants (docs/reference.md 6.4) and its building blocks.

1. the coherence penalty's double backward on a toy quadratic (linear / hinge / cos);
2. power iteration against explicit Hessians, gamma_c monotone and normalised;
3. ||eps_c|| = rho; a single-class batch gives gamma = 1 and the class-wise step is a standard SAM step; rho = 0 is
   plain SGD on the summed losses; the class-wise step by hand on a multi-class batch;
4. leave-one-domain-out evaluation on the embedded digit_domains (the data side is tests/data/test_domains.py);
plus the per-domain head reducer, ``adversarial="auto"``, the GRL / coherence wiring by hand, the global-teacher KL
and a DGviaER smoke run.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fedlt.methods.fedtail as fedtail_module
from fedlt.cli import build, make_experiment
from fedlt.data import EmbeddedDigitDomains, FederatedDataset
from fedlt.data.domains import SPLIT_TRAIN
from fedlt.engine.simulator import Simulator
from fedlt.methods import METHODS
from fedlt.methods._dg import dann_coefficient, grad_reverse
from fedlt.methods._sam import perturbation
from fedlt.methods.dgviaer import DGviaER
from fedlt.methods.fedtail import FedTAIL, class_weights, coherence_loss, top_hessian_eigenvalue
from fedlt.models import build_model
from fedlt.types import ClientContext

ROOT = Path(__file__).resolve().parents[2]
C, D_IN = 3, 5
DG = {"image_size": 16, "per_class": 30, "val_per_class": 5}  # 4 domains x 10 classes x 30 images of 16x16
DOMAINS = ("plain", "textured", "inverted", "thick")


# -- builders -------------------------------------------------------------------------------------------------------
def tensor_sim(method: FedTAIL, counts: list[int], hidden: int = 6, seed: int = 0) -> Simulator:
    """One client holding ``counts[c]`` Gaussian points of class c (float64, no augmentation, MLP without BN or
    dropout)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    x = torch.randn(y.numel(), D_IN, generator=g, dtype=torch.float64) + y[:, None].double()
    data = FederatedDataset.from_tensors(x, y, x[:4], y[:4], [torch.arange(y.numel())], num_classes=C)
    torch.manual_seed(seed)
    net = build_model("mlp", num_classes=C, in_features=D_IN, hidden=hidden).double()
    return Simulator(None, data, net, method, rounds=1, clients_per_round=1, client_state="memory").setup()


def dg_data(target: str = "thick", layout: str = "per_domain", **kwargs) -> FederatedDataset:
    return FederatedDataset(EmbeddedDigitDomains(**DG), target_domain=target, domain_layout=layout, imbalance_factor=1,
                            augment=False, **kwargs)


def dg_sim(method: FedTAIL, hidden: int = 8, quiet: bool = True, **data_kwargs) -> Simulator:
    """A simulator on the tiny embedded digit_domains with an MLP (no BatchNorm, no dropout)."""
    data = dg_data(**data_kwargs)
    data.setup("cpu")
    torch.manual_seed(0)
    net = build_model("mlp", num_classes=10, in_channels=3, image_size=16, hidden=hidden)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", RuntimeWarning)
        return Simulator(None, data, net, method, rounds=2, clients_per_round=data.num_clients,
                         client_state="memory").setup()


def start_client(sim: Simulator, cid: int = 0, round: int = 1, seed: int = 7) -> ClientContext:
    """Loads the global model into the workspace and starts client ``cid`` as the local trainer would."""
    state = sim.load_client(cid)
    sim.model.train()
    idx = sim.data.client_indices[cid]
    ctx = ClientContext(client_id=cid, round=round, num_samples=int(idx.numel()),
                        class_counts=torch.bincount(sim.data.train.y[idx], minlength=sim.data.num_classes).float(),
                        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                        message=sim.reducer.broadcast(round), state=state)
    sim.method.on_client_start(ctx)
    sim.method._optimizers = sim.method.configure_optimizers()
    return ctx


def params_of(sim: Simulator) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sim.model.named_parameters()}


def ce_grads(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of CE(model(x), y) at the given parameters (functional, the model is untouched)."""
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = F.cross_entropy(functional_call(model, p, (x,)), y)
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def global_norm(t: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
    values = t.values() if isinstance(t, dict) else t
    return torch.sqrt(sum((v * v).sum() for v in values if v is not None))


def capture_grads(sim: Simulator) -> list[dict[int, torch.Tensor]]:
    """Wraps ``trainer.step`` to record every optimizer's gradients (by parameter id) before it steps."""
    seen: list[dict[int, torch.Tensor]] = []
    original = sim.trainer.step

    def step(opt, grad_clip=None, update_scaler=True):
        seen.append({id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None})
        return original(opt, grad_clip, update_scaler=update_scaler)

    sim.trainer.step = step
    return seen


def exact_top_eigenvalue(loss_fn, flat: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_fn, flat)).max())


def head_top_eigenvalue(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The exact top eigenvalue of the Hessian of CE(head(features(x)), y) w.r.t. the head (weight and bias)."""
    with torch.no_grad():
        h = model.forward_features(x)
    w, b = model.head.weight.detach(), model.head.bias.detach()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h @ flat[: w.numel()].view_as(w).T + flat[w.numel():], y)

    return exact_top_eigenvalue(loss, torch.cat([w.reshape(-1), b]))


def adversarial_reference(net, x, y, disc_in, disc_labels, kappa, adv_w, alpha):
    """By hand, without a gradient-reversal layer: the expected gradients of (fc, head, dg_disc) for one step of
    L_cls - kappa adv_w grad_theta L_D + L_coh, L_coh = -alpha <grad_theta L_cls, -kappa adv_w grad_theta L_D>, where
    the discriminator sees ``disc_in(h)`` with ``disc_labels``. Returns (expected, L_D, L_coh)."""
    theta = [net.fc.weight, net.fc.bias]
    phi = [net.head.weight, net.head.bias]
    psi = list(net.dg_disc.parameters())
    h = net.forward_features(x)
    l_cls = F.cross_entropy(net.head(h), y)
    l_d = F.cross_entropy(net.dg_disc(disc_in(h)), disc_labels)
    g_cls = torch.autograd.grad(l_cls, theta, create_graph=True)
    g_adv = [-kappa * adv_w * g for g in torch.autograd.grad(l_d, theta, create_graph=True)]
    l_coh = -alpha * sum((a * b).sum() for a, b in zip(g_cls, g_adv))
    g_coh = torch.autograd.grad(l_coh, theta + phi, retain_graph=True)
    g_clean = torch.autograd.grad(l_cls, theta + phi, retain_graph=True)
    g_psi = [adv_w * g for g in torch.autograd.grad(l_d, psi)]
    expected = [a + b + (g_adv[i] if i < 2 else 0) for i, (a, b) in enumerate(zip(g_clean, g_coh))] + g_psi
    return expected, l_d, l_coh


# -- invariant 1: coherence double backward ----------------------------------------------------------------------
def _quadratic_pair(seed: int = 0):
    """theta in two parts (2 + 3 entries), symmetric A, B and the gradients of L1, L2 with their graphs."""
    g = torch.Generator().manual_seed(seed)
    n = 5
    a_mat, b_mat = torch.randn(n, n, generator=g, dtype=torch.float64), torch.randn(n, n, generator=g,
                                                                                    dtype=torch.float64)
    a_mat, b_mat = a_mat + a_mat.T, b_mat + b_mat.T
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    return theta, a_mat, a, b_mat, b


def _coherence_and_grad(theta, m1, v1, m2, v2, alpha, mode, s1: float = 1.0, s2: float = 1.0):
    """coherence_loss of the gradients of s1 L1 and s2 L2 (with graphs) and its gradient w.r.t. theta (flat)."""
    parts = [theta[:2].clone().requires_grad_(), theta[2:].clone().view(3, 1).requires_grad_()]
    flat = torch.cat([p.reshape(-1) for p in parts])
    g1 = torch.autograd.grad(s1 * (0.5 * flat @ m1 @ flat + v1 @ flat), parts, create_graph=True)
    g2 = torch.autograd.grad(s2 * (0.5 * flat @ m2 @ flat + v2 @ flat), parts, create_graph=True)
    coh = coherence_loss(list(g1), list(g2), alpha, mode)
    grad = torch.autograd.grad(coh, parts)
    return coh.detach(), torch.cat([g.reshape(-1) for g in grad])


def test_linear_coherence_double_backward_on_a_quadratic():
    theta, a_mat, a, b_mat, b = _quadratic_pair()
    alpha = 0.37
    coh, grad = _coherence_and_grad(theta, a_mat, a, b_mat, b, alpha, "linear")
    g1, g2 = a_mat @ theta + a, b_mat @ theta + b
    torch.testing.assert_close(coh, -alpha * (g1 @ g2))
    torch.testing.assert_close(grad, -alpha * (a_mat @ g2 + b_mat @ g1), rtol=1e-12, atol=1e-12)


def test_hinge_coherence_is_zero_for_positive_and_linear_for_negative_inner_products():
    theta, a_mat, a, b_mat, b = _quadratic_pair(1)
    alpha = 0.5
    dot = (a_mat @ theta + a) @ (b_mat @ theta + b)
    assert abs(float(dot)) > 1e-3
    sign = 1.0 if dot > 0 else -1.0
    # L2 with a positive inner product, and -L2 with a negative one.
    pos = (sign * b_mat, sign * b)
    neg = (-sign * b_mat, -sign * b)
    coh, grad = _coherence_and_grad(theta, a_mat, a, *pos, alpha, "hinge")
    assert float(coh) == 0.0 and not grad.any()
    coh, grad = _coherence_and_grad(theta, a_mat, a, *neg, alpha, "hinge")
    lin_coh, lin_grad = _coherence_and_grad(theta, a_mat, a, *neg, alpha, "linear")
    assert float(coh) > 0
    torch.testing.assert_close(coh, lin_coh)
    torch.testing.assert_close(grad, lin_grad)
    g1, g2 = a_mat @ theta + a, neg[0] @ theta + neg[1]
    torch.testing.assert_close(grad, -alpha * (a_mat @ g2 + neg[0] @ g1))


def test_cos_coherence_is_scale_invariant():
    theta, a_mat, a, b_mat, b = _quadratic_pair(2)
    alpha = 0.8
    coh, grad = _coherence_and_grad(theta, a_mat, a, b_mat, b, alpha, "cos")
    g1, g2 = a_mat @ theta + a, b_mat @ theta + b
    torch.testing.assert_close(coh, -alpha * (g1 @ g2) / (g1.norm() * g2.norm()))
    assert -alpha <= float(coh) <= alpha
    # Scaling either loss by a positive factor changes neither the value nor its gradient w.r.t. theta.
    coh_s, grad_s = _coherence_and_grad(theta, a_mat, a, b_mat, b, alpha, "cos", s1=7.5, s2=0.03)
    torch.testing.assert_close(coh_s, coh)
    torch.testing.assert_close(grad_s, grad)
    lin, _ = _coherence_and_grad(theta, a_mat, a, b_mat, b, alpha, "linear", s1=7.5, s2=0.03)
    assert not math.isclose(float(lin), float(coh))  # the linear form does scale


def test_coherence_unknown_mode():
    with pytest.raises(ValueError, match="unknown coherence mode"):
        coherence_loss([torch.ones(2)], [torch.ones(2)], 1.0, "dot")


# -- invariant 2: power iteration and gamma ------------------------------------------------------------------------
def test_power_iteration_matches_a_random_psd_quadratic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64)
    m = x @ x.T
    theta = [torch.randn(2, generator=g, dtype=torch.float64).requires_grad_(),
             torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_()]
    flat = torch.cat([t.reshape(-1) for t in theta])
    loss = 0.5 * flat @ m @ flat
    lam = top_hessian_eigenvalue(loss, theta, iters=200, generator=torch.Generator().manual_seed(0))
    exact = float(torch.linalg.eigvalsh(m).max())
    assert lam == pytest.approx(exact, rel=1e-3)


def test_power_iteration_matches_the_hessian_of_a_linear_head_cross_entropy():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    loss = F.cross_entropy(h @ w.T + b, y)
    lam = top_hessian_eigenvalue(loss, [w, b], iters=300, generator=torch.Generator().manual_seed(1))

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h @ flat[:12].view(3, 4).T + flat[12:], y)

    exact = exact_top_eigenvalue(flat_loss, torch.cat([w.detach().reshape(-1), b.detach()]))
    assert exact > 0
    assert lam == pytest.approx(exact, rel=1e-3)


def test_class_weights_inverse_decreasing_direct_increasing_and_normalised():
    lam = torch.tensor([0.05, 0.3, 1.0, 2.5, 7.0])
    delta = 1e-3
    inv = class_weights(lam, "inverse", delta)
    direct = class_weights(lam, "direct", delta)
    for gam in (inv, direct):
        assert float(gam.sum()) == pytest.approx(lam.numel(), rel=1e-6)
        assert bool((gam > 0).all())
    assert bool((inv[1:] < inv[:-1]).all())
    assert bool((direct[1:] > direct[:-1]).all())
    raw = 1.0 / (lam + delta)
    torch.testing.assert_close(inv, raw * 5 / raw.sum())
    torch.testing.assert_close(direct, (lam + delta) * 5 / (lam + delta).sum())
    # A single class always weighs 1; equal curvatures weigh 1 each; negative estimates are clamped to 0.
    torch.testing.assert_close(class_weights(torch.tensor([3.7])), torch.ones(1))
    torch.testing.assert_close(class_weights(torch.full((4,), 0.2)), torch.ones(4))
    torch.testing.assert_close(class_weights(torch.tensor([-1.0, 0.0])), torch.ones(2))
    with pytest.raises(ValueError, match="gamma_mode"):
        class_weights(lam, "sqrt")


# -- invariant 3: class-wise SAM ------------------------------------------------------------------------------------
def _sam_method(**kwargs) -> FedTAIL:
    base = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "clean_loss_weight": 0.0, "er_weight": 0.0,
            "adversarial": "off", "hessian_iters": 200, "hessian_samples": 64, "hessian_ema": 0.0}
    base.update(kwargs)
    return FedTAIL(**base)


def test_perturbation_norm_is_rho_over_several_tensors():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g), torch.randn(2, generator=g)]
    grads = [torch.randn(3, 2, generator=g), None, torch.randn(2, generator=g)]
    eps = perturbation(params, grads, 0.07)
    assert eps[1] is None
    assert float(global_norm(eps)) == pytest.approx(0.07, rel=1e-6)
    torch.testing.assert_close(eps[0] / eps[0].norm(), grads[0] / grads[0].norm())  # the ascent direction


@pytest.mark.parametrize("gamma_target", ["loss", "perturbation"])
def test_class_perturbations_have_radius_rho_along_the_class_gradient(monkeypatch, gamma_target):
    """Every class of the batch gets eps_c = rho g_c / ||g_c|| with g_c the gradient of its own loss at w (times
    gamma_c when gamma scales the perturbation)."""
    rho = 0.2
    sim = tensor_sim(_sam_method(rho=rho, gamma_target=gamma_target), [6, 5, 4])
    method = sim.method
    calls = []

    def spy(params, grads, radius, *args, **kwargs):
        eps = perturbation(params, grads, radius, *args, **kwargs)
        calls.append((radius, [g.clone() for g in grads], eps))
        return eps

    monkeypatch.setattr(fedtail_module, "perturbation", spy)
    ctx = start_client(sim)
    x, y = sim.data.train.x, sim.data.train.y
    w0 = params_of(sim)
    method.training_step((x, y), ctx)
    gammas = class_weights(method._lambda[torch.arange(C)], "inverse", method.gamma_delta)
    assert len(calls) == C
    names = [k for k, _ in sim.model.named_parameters()]
    for c, (radius, grads, eps) in enumerate(calls):
        expected = rho * (float(gammas[c]) if gamma_target == "perturbation" else 1.0)
        assert radius == pytest.approx(expected, rel=1e-6)
        assert float(global_norm(eps)) == pytest.approx(expected, rel=1e-6)
        g_c = ce_grads(sim.model, w0, x[y == c], y[y == c])
        for name, g, e in zip(names, grads, eps):
            torch.testing.assert_close(g, g_c[name])
            torch.testing.assert_close(e, expected * g_c[name] / global_norm(g_c))


def test_single_class_batch_is_a_standard_sam_step():
    rho, lr = 0.3, 0.1
    sim = tensor_sim(_sam_method(rho=rho, lr=lr), [0, 12, 0])
    method = sim.method
    ctx = start_client(sim)
    x, y = sim.data.train.x, sim.data.train.y
    assert bool((y == 1).all())
    w0 = params_of(sim)
    out = method.training_step((x, y), ctx)
    # gamma of the only class is 1 whatever its (estimated, positive) curvature.
    assert float(method._lambda[1]) > 0
    torch.testing.assert_close(class_weights(method._lambda[torch.tensor([1])]), torch.ones(1))
    # Standard SAM by hand: g at w, eps = rho g / ||g||, gradient at w + eps, w <- w - lr g_sam.
    g = ce_grads(sim.model, w0, x, y)
    norm = global_norm(g)
    g_sam = ce_grads(sim.model, {k: w0[k] + rho * g[k] / (norm + 1e-12) for k in w0}, x, y)
    for k, v in sim.model.named_parameters():
        torch.testing.assert_close(v.detach(), w0[k] - lr * g_sam[k], rtol=1e-10, atol=1e-12, msg=k)
        assert not torch.equal(v.detach(), w0[k] - lr * g[k])  # ...which is not the plain SGD step
    adv_loss = F.cross_entropy(functional_call(sim.model, {k: w0[k] + rho * g[k] / norm for k in w0}, (x,)), y)
    torch.testing.assert_close(out.parts["csam"], adv_loss)


def _class_term_step(sim: Simulator, w0, x, y, rho, lr, clean_weight, class_weight, gamma_target, reduction):
    """The expected weights after one FedTAIL step: clean_weight grad L_cls(w) + class_weight / G sum_c
    gamma_c grad L_c(w + eps_c) (the reduction ``sum`` drops 1 / G)."""
    classes = torch.unique(y)
    gammas = class_weights(sim.method._lambda[classes], sim.method.gamma_mode, sim.method.gamma_delta)
    g_all = ce_grads(sim.model, w0, x, y)
    total = {k: clean_weight * g_all[k] for k in w0}
    norm = len(classes) if reduction == "mean" else 1
    for c, gamma in zip(classes.tolist(), gammas.tolist()):
        m = y == c
        g_c = ce_grads(sim.model, w0, x[m], y[m])
        radius = rho * (gamma if gamma_target == "perturbation" else 1.0)
        n_c = global_norm(g_c)
        at = ce_grads(sim.model, {k: w0[k] + radius * g_c[k] / (n_c + 1e-12) for k in w0}, x[m], y[m])
        weight = class_weight * (gamma if gamma_target == "loss" else 1.0) / norm
        for k in w0:
            total[k] = total[k] + weight * at[k]
    return {k: w0[k] - lr * total[k] for k in w0}


@pytest.mark.parametrize("gamma_target,reduction", [("loss", "mean"), ("loss", "sum"), ("perturbation", "mean")])
def test_multi_class_step_by_hand(gamma_target, reduction):
    rho, lr = 0.25, 0.2
    method = _sam_method(rho=rho, lr=lr, clean_loss_weight=0.6, class_sam_weight=0.8, gamma_target=gamma_target,
                         class_sam_reduction=reduction)
    sim = tensor_sim(method, [7, 4, 9])
    ctx = start_client(sim)
    x, y = sim.data.train.x, sim.data.train.y
    w0 = params_of(sim)
    method.training_step((x, y), ctx)
    expected = _class_term_step(sim, w0, x, y, rho, lr, 0.6, 0.8, gamma_target, reduction)
    for k, v in sim.model.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-10, atol=1e-12, msg=k)


def test_lambdas_are_the_top_head_hessian_eigenvalues_per_class():
    sim = tensor_sim(_sam_method(rho=0.1), [7, 4, 9])
    ctx = start_client(sim)
    x, y = sim.data.train.x, sim.data.train.y
    model = copy.deepcopy(sim.model)
    sim.method.training_step((x, y), ctx)
    for c in range(C):
        exact = head_top_eigenvalue(model, x[y == c], y[y == c])
        assert float(sim.method._lambda[c]) == pytest.approx(exact, rel=1e-3)
    # The client keeps its estimate for the next round's EMA only when hessian_ema > 0.
    assert sim.method.client_state_template() == {}


@pytest.mark.parametrize("counts", [[0, 10, 0], [6, 3, 8]])
def test_rho_zero_is_plain_sgd_on_the_summed_losses(counts):
    lr, clean, cls_w = 0.15, 0.7, 0.5
    sim = tensor_sim(_sam_method(rho=0.0, lr=lr, clean_loss_weight=clean, class_sam_weight=cls_w), counts)
    ctx = start_client(sim)
    x, y = sim.data.train.x, sim.data.train.y
    w0 = params_of(sim)
    sim.method.training_step((x, y), ctx)
    classes = torch.unique(y)
    gammas = class_weights(sim.method._lambda[classes])
    # One SGD step on clean * L_cls + cls_w / G * sum_c gamma_c L_c, all at w.
    p = {k: v.clone().requires_grad_() for k, v in w0.items()}
    logits = functional_call(sim.model, p, (x,))
    loss = clean * F.cross_entropy(logits, y)
    for c, gamma in zip(classes.tolist(), gammas.tolist()):
        loss = loss + cls_w * gamma / len(classes) * F.cross_entropy(logits[y == c], y[y == c])
    grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
    for k, v in sim.model.named_parameters():
        torch.testing.assert_close(v.detach(), w0[k] - lr * grads[k], rtol=1e-10, atol=1e-12)
    if len(classes) == 1:  # gamma = 1 (up to float32 rounding): plain SGD on (clean + cls_w) L_cls
        g = ce_grads(sim.model, w0, x, y)
        for k, v in sim.model.named_parameters():
            torch.testing.assert_close(v.detach(), w0[k] - lr * (clean + cls_w) * g[k], rtol=1e-6, atol=1e-9)


# -- invariant 4: leave-one-domain-out evaluation ---------------------------------------------------------------------
def _dg_yaml(tmp_path: Path, layout: str, target: str = "thick") -> str:
    path = tmp_path / "digit_domains_tiny.yaml"
    path.write_text(f"""
seed: 0
data:
  source:
    class_path: EmbeddedDigitDomains
    init_args: {{image_size: 16, per_class: 30, val_per_class: 5}}
  target_domain: {target}
  domain_layout: {layout}
  imbalance_factor: 1
model: {{name: mlp, kwargs: {{hidden: 16}}}}
trainer: {{rounds: 1, clients_per_round: 3, eval_every: 1, accelerator: cpu, devices: 1, client_state: memory}}
logging: {{wandb: false, progress_bar: false}}
""")
    return str(path)


def _config_sim(tmp_path: Path, method: str, layout: str, *extra: str, target: str = "thick") -> Simulator:
    parser, cfg, init = build("fit", ["--config", _dg_yaml(tmp_path, layout, target), "--config",
                                       str(ROOT / "configs" / "method" / f"{method}.yaml"),
                                       "--run_dir", str(tmp_path / "run"), *extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return make_experiment(parser, cfg, init).build_simulator()


def test_target_domain_metrics_cover_every_target_image(tmp_path):
    target = "inverted"
    sim = _config_sim(tmp_path, "fedtail", "per_domain", "--method.init_args.local_steps", "2",
                      "--method.init_args.hessian_iters", "3", target=target)
    assert isinstance(sim.method, FedTAIL) and sim.data.num_clients == 3
    sim.run_round(1)
    metrics = sim.evaluate()
    # Independently: the global model on every image of the target domain, normalised from the raw source.
    raw = EmbeddedDigitDomains(**DG).load()
    mean = torch.tensor(raw.mean).view(1, 3, 1, 1)
    std = torch.tensor(raw.std).view(1, 3, 1, 1)
    net = copy.deepcopy(sim.model)
    net.load_state_dict(sim.global_state)
    net.eval()
    with torch.no_grad():
        preds = net((raw.x.float() / 255.0 - mean) / std).argmax(1)
    hit = (preds == raw.y).float()
    tgt = raw.domain == DOMAINS.index(target)
    assert len(sim.data.test) == int(tgt.sum()) == 300
    assert torch.unique(preds[tgt]).numel() > 1  # not a constant predictor: the check below is informative
    acc = float(hit[tgt].mean())
    assert metrics[f"test/domain/{target}/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["test/global/acc"] == pytest.approx(acc, abs=1e-6)
    # Source-domain validation: the official val images of every source domain, never the target.
    official_val = raw.split != SPLIT_TRAIN
    sources = [name for name in DOMAINS if name != target]
    assert {k for k in metrics if k.startswith("test/domain/")} == {f"test/domain/{target}/acc"}
    assert {k for k in metrics if k.startswith("val/domain/")} == {f"val/domain/{n}/acc" for n in sources}
    for name in sources:
        m = official_val & (raw.domain == DOMAINS.index(name))
        assert metrics[f"val/domain/{name}/acc"] == pytest.approx(float(hit[m].mean()), abs=1e-6)
    val_mask = official_val & ~tgt
    assert len(sim.data.val) == int(val_mask.sum()) == 150
    assert metrics["val/acc"] == pytest.approx(float(hit[val_mask].mean()), abs=1e-6)


# -- per-domain head reducer -------------------------------------------------------------------------------------------
def _head_keys(domain: int) -> tuple[str, ...]:
    return (f"dg_aux.{domain}.", f"dg_adv.{domain}.")


def _manual_round(sim: Simulator, clients: list[int], round: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    message = sim.reducer.broadcast(round)
    sim.reducer.begin_round(round)
    sim.model.train()
    local = {}
    for cid in clients:
        sim.train_client(cid, message)
        local[cid] = {k: v.detach().clone() for k, v in sim.method.shared_tensors.items()}
    sim.reducer.reduce(None)
    sim.reducer.server_step(round)
    return local


def test_domain_head_reducer_keeps_each_head_of_its_domain_holder():
    method = FedTAIL(lr=0.2, local_steps=3, batch_size=32, class_sam=False, er_rho=0.0, aux_hidden=0,
                     aux_lr_scale=1.0)
    sim = dg_sim(method, layout="per_domain", target="thick")  # clients 0, 1, 2 hold plain, textured, inverted
    assert sim.data.client_domain_counts.tolist() == [[250, 0, 0, 0], [0, 250, 0, 0], [0, 0, 250, 0]]
    before = {k: v.clone() for k, v in sim.global_state.items()}
    local = _manual_round(sim, [0, 1])
    after = sim.global_state
    n0, n1 = int(sim.data.client_sizes[0]), int(sim.data.client_sizes[1])
    for k, v in after.items():
        fedavg = (n0 * local[0][k] + n1 * local[1][k]) / (n0 + n1)
        if k.startswith(_head_keys(0) + _head_keys(1)):
            holder = 0 if k.startswith(_head_keys(0)) else 1
            torch.testing.assert_close(v, local[holder][k], rtol=1e-6, atol=1e-7, msg=k)
            assert not torch.equal(local[holder][k], before[k]), k  # the holder trained it
            assert not torch.allclose(v, fedavg, rtol=1e-5, atol=1e-6), k  # not the FedAvg mix
            assert torch.equal(local[1 - holder][k], before[k]), k  # the other client left it alone
        elif k.startswith(("dg_aux.", "dg_adv.")):  # domain 2 (client not sampled) and 3 (the target)
            assert torch.equal(v, before[k]), k
        else:
            torch.testing.assert_close(v, fedavg, msg=k)


def test_domain_head_aggregation_fedavg_mixes_the_heads():
    method = FedTAIL(lr=0.2, local_steps=2, batch_size=32, class_sam=False, er_rho=0.0, aux_hidden=0,
                     aux_lr_scale=1.0, domain_head_aggregation="fedavg")
    sim = dg_sim(method, layout="per_domain", target="thick")
    local = _manual_round(sim, [0, 1])
    n0, n1 = int(sim.data.client_sizes[0]), int(sim.data.client_sizes[1])
    for k, v in sim.global_state.items():
        torch.testing.assert_close(v, (n0 * local[0][k] + n1 * local[1][k]) / (n0 + n1), msg=k)


# -- adversarial="auto", the GRL and the coherence term ---------------------------------------------------------------
def test_adversarial_auto_with_the_local_source_is_off_with_one_domain_per_client():
    with pytest.warns(RuntimeWarning, match="single domain"):
        sim = dg_sim(FedTAIL(adv_source="local"), quiet=False, layout="per_domain")
    assert not sim.method.adversarial_active
    assert not hasattr(sim.model, "dg_disc") and not any(k.startswith("dg_disc.") for k in sim.global_state)
    assert sim.method._psi == []
    # Pure domain clients of layout (ii) are the same situation; "on" forces the discriminator anyway.
    local = dg_sim(FedTAIL(adv_source="local"), layout="clients_per_domain", domain_alpha=0.0)
    assert not local.method.adversarial_active
    forced = dg_sim(FedTAIL(adversarial="on", adv_source="local"), layout="per_domain")
    assert forced.method.adversarial_active and hasattr(forced.model, "dg_disc")


def test_adversarial_auto_is_on_by_default_with_one_domain_per_client():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "term is off" warning
        sim = dg_sim(FedTAIL(aux_hidden=0), quiet=False, layout="per_domain")
    method = sim.method
    assert method.adversarial_active and method.shares_moments and method.coherence_alpha > 0
    assert isinstance(sim.reducer, fedtail_module.FedTAILReducer)
    assert sim.reducer.moments.shape == (4, 10, 2 * sim.model.num_features + 1)
    assert "dg_moments" not in sim.reducer.broadcast(1).extras  # nothing shared before round 1


def _hand_moments(num_features: int) -> torch.Tensor:
    """Moments (4 domains x 10 classes) with known means / variances: domain 1 holds classes 0-9 (50 features
    each, mean = class + 10 * domain, variance 4), domain 2 only class 3 (1 feature: below adv_min_count 2)."""
    m = torch.zeros(4, 10, 2 * num_features + 1)
    for c in range(10):
        mu, var, n = float(c + 10), 4.0, 50.0
        m[1, c, :num_features] = n * mu
        m[1, c, num_features:-1] = n * (var + mu * mu)
        m[1, c, -1] = n
    m[2, 3, :num_features], m[2, 3, num_features:-1], m[2, 3, -1] = 7.0, 49.0, 1.0
    return m


def test_shared_moments_sample_class_matched_features_of_other_domains():
    d = 3
    shared = fedtail_module._SharedMoments.of(_hand_moments(d), min_count=2)
    y = torch.tensor([0, 3, 3, 9] * 500)
    dom = torch.tensor([0, 0, 1, 0] * 500)
    g = torch.Generator().manual_seed(0)
    z, d_z = shared.sample(y, dom, gaussian=True, generator=g)
    # Rows of domain 1 have no other domain with enough features of class 3 (domain 2 holds one): no sample.
    keep = dom != 1
    assert z.shape == (int(keep.sum()), d) and torch.all(d_z == 1)
    for c in (0, 3, 9):
        zc = z[y[keep] == c]
        torch.testing.assert_close(zc.mean(0), torch.full((d,), c + 10.0), atol=0.25, rtol=0)
        torch.testing.assert_close(zc.std(0), torch.full((d,), 2.0), atol=0.2, rtol=0)
    means, _ = shared.sample(y, dom, gaussian=False, generator=g)
    torch.testing.assert_close(means, (y[keep].float() + 10.0)[:, None].expand(-1, d))
    assert fedtail_module._SharedMoments.of(torch.zeros(4, 10, 2 * d + 1), 2) is None


def test_federated_adversarial_step_by_hand_with_shared_moments():
    """One domain per client, moments of another domain broadcast: the discriminator sees the client's features
    (label: its domain) and one class-matched sample per image from domain 1's moments (label 1); the extractor gets
    -kappa adv_weight grad_theta L_D through its own features only, plus the coherence term."""
    lr, kappa, adv_w, alpha = 0.1, 0.7, 0.9, 0.3
    method = FedTAIL(lr=lr, class_sam=False, er_weight=0.0, adv_schedule="constant", adv_coeff=kappa,
                     adv_weight=adv_w, coherence_alpha=alpha, aux_hidden=0, adv_source="shared_means")
    sim = dg_sim(method, layout="per_domain")
    d = sim.model.num_features
    sim.reducer.moments.copy_(_hand_moments(d))
    seen = capture_grads(sim)
    ctx = start_client(sim, cid=0)  # client 0 holds domain 0 ("plain")
    x, y, dom = sim.data.get_batch(sim.data.train, sim.data.client_indices[0][::10])
    assert torch.all(dom == 0)
    net = copy.deepcopy(sim.model)
    out = method.training_step((x, y, dom), ctx)
    z = (y.float() + 10.0)[:, None].expand(-1, d)  # domain 1's class means, every class is available there
    expected, l_d, l_coh = adversarial_reference(net, x, y, lambda h: torch.cat([h, z]),
                                                 torch.cat([dom, torch.ones_like(dom)]), kappa, adv_w, alpha)
    torch.testing.assert_close(out.parts["adv"], l_d.detach())
    torch.testing.assert_close(out.parts["coh"], l_coh.detach())
    assert float(l_coh.abs()) > 0
    params = dict(sim.model.named_parameters())
    names = ["fc.weight", "fc.bias", "head.weight", "head.bias", "dg_disc.weight", "dg_disc.bias"]
    for name, g in zip(names, expected):
        torch.testing.assert_close(seen[0][id(params[name])], g.detach(), rtol=1e-4, atol=1e-6)


def test_round_one_skips_the_term_and_round_two_aligns_with_shared_moments():
    method = FedTAIL(lr=0.05, local_steps=2, batch_size=32, class_sam=False, er_weight=0.0, aux_hidden=0)
    sim = dg_sim(method, layout="per_domain")
    first = sim.run_round(1).metrics
    assert "train/loss_adv" not in first and "train/loss_coh" not in first
    # The server now holds each client's summed clean features per (domain, class) of the source domains.
    moments = sim.reducer.moments
    counts = moments[..., -1]
    assert float(counts[3].sum()) == 0  # the target domain
    assert torch.all(counts[:3].sum(1) == 2 * 32)  # two steps of 32 images per source domain
    for dom_id in range(3):
        seen_classes = counts[dom_id] > 0
        mean = moments[dom_id, seen_classes, :-1].view(int(seen_classes.sum()), 2, -1)
        assert torch.all(mean[:, 1] >= 0)  # sums of squares
    assert "dg_moments" in sim.reducer.broadcast(2).extras
    second = sim.run_round(2).metrics
    assert math.isfinite(second["train/loss_adv"]) and second["train/loss_adv"] > 0
    assert math.isfinite(second["train/loss_coh"])


def test_moment_accumulation_is_the_sum_over_the_clean_features():
    method = FedTAIL(lr=0.1, class_sam=False, er_weight=0.0, aux_hidden=0)
    sim = dg_sim(method, layout="per_domain")
    ctx = start_client(sim, cid=1)
    idx = sim.data.client_indices[1]
    batches = [idx[:40], idx[40:70]]
    feats, labels = [], []
    for b in batches:
        x, y, dom = sim.data.get_batch(sim.data.train, b)
        with torch.no_grad():
            feats.append(sim.model.forward_features(x))
        labels.append(y)
        method.training_step((x, y, dom), ctx)  # features of each step at the weights before it
    h, y = torch.cat(feats), torch.cat(labels)
    update = method.on_client_end(ctx)
    m = update.extras["dg_moments"]
    d = h.shape[1]
    for c in range(10):
        hc = h[y == c]
        torch.testing.assert_close(m[1, c, :d], hc.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m[1, c, d:-1], (hc * hc).sum(0), rtol=1e-5, atol=1e-5)
        assert float(m[1, c, -1]) == hc.shape[0]
    assert float(m[[0, 2, 3]].abs().sum()) == 0


def test_reducer_keeps_stale_cells_and_checkpoints_moments_and_teacher():
    method = FedTAIL(lr=0.05, local_steps=1, class_sam=False, er_weight=1.0, er_rho=0.0, qt="momentum_teacher",
                     teacher_momentum=0.8, aux_hidden=0)
    sim = dg_sim(method, layout="per_domain")
    reducer = sim.reducer
    init = {k: v.clone() for k, v in sim.global_state.items()}
    torch.testing.assert_close(reducer.broadcast(1).extras["teacher"], init)
    _manual_round(sim, [0, 1], round=1)
    g1 = {k: v.clone() for k, v in sim.global_state.items()}
    counts1 = reducer.moments[..., -1].clone()
    assert float(counts1[0].sum()) > 0 and float(counts1[2].sum()) == 0
    _manual_round(sim, [2], round=2)
    g2 = sim.global_state
    # Domain 0 and 1 cells keep round 1's moments; domain 2's are fresh.
    torch.testing.assert_close(reducer.moments[..., -1][:2], counts1[:2])
    assert float(reducer.moments[2, :, -1].sum()) > 0
    for k, v in reducer.teacher.items():
        if v.is_floating_point():
            ref = 0.8 * (0.8 * init[k] + 0.2 * g1[k]) + 0.2 * g2[k]
            torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6, msg=k)
    state = copy.deepcopy(reducer.state_dict())
    fresh = dg_sim(FedTAIL(lr=0.05, local_steps=1, class_sam=False, er_weight=1.0, er_rho=0.0,
                           qt="momentum_teacher", teacher_momentum=0.8, aux_hidden=0), layout="per_domain")
    fresh.reducer.load_state_dict(state)
    assert torch.equal(fresh.reducer.moments, reducer.moments)
    assert all(torch.equal(fresh.reducer.teacher[k], v) for k, v in reducer.teacher.items())


def test_momentum_teacher_kl_uses_the_ensemble_not_the_received_model():
    method = FedTAIL(lr=0.1, class_sam=False, er_rho=0.0, qt="momentum_teacher", adversarial="off")
    sim = dg_sim(method, layout="per_domain")
    ctx = start_client(sim)
    x, y, dom = sim.data.get_batch(sim.data.train, sim.data.client_indices[1][:40])
    # Round 1: the ensemble is the initial global model, so the KL vanishes at w.
    assert abs(float(method.training_step((x, y, dom), ctx).parts["er"])) < 1e-6
    teacher = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in sim.reducer.teacher.items()}
    sim.reducer.teacher = teacher
    ctx = start_client(sim)
    out = method.training_step((x, y, dom), ctx)
    with torch.no_grad():
        net = copy.deepcopy(sim.model).eval()
        q = F.softmax(functional_call(net, teacher, (x,)), 1)
    assert float(out.parts["er"]) > 1e-4
    with pytest.raises(ValueError, match="teacher_momentum"):
        FedTAIL(teacher_momentum=1.0)
    with pytest.raises(ValueError, match="adv_source"):
        FedTAIL(adv_source="images")
    assert q.shape == (40, 10)


@pytest.mark.parametrize("layout", ["clients_per_domain", "centralized"])
def test_adversarial_auto_is_on_when_a_client_holds_several_domains(layout):
    sim = dg_sim(FedTAIL(aux_hidden=0), quiet=False, layout=layout)
    assert bool(((sim.data.client_domain_counts > 0).sum(1) >= 2).any())
    assert sim.method.adversarial_active
    assert isinstance(sim.model.dg_disc, torch.nn.Linear) and sim.model.dg_disc.out_features == 4
    assert {"dg_disc.weight", "dg_disc.bias"} <= set(sim.global_state)
    off = dg_sim(FedTAIL(adversarial="off"), layout=layout)
    assert not off.method.adversarial_active and not hasattr(off.model, "dg_disc")


def test_adversarial_step_by_hand_with_reversal_and_coherence():
    """Centralised client, class-wise SAM and entropy term off: the step equals, by hand, grad L_cls - kappa
    adv_weight grad_theta L_D + grad L_coh with L_coh = -alpha <grad_theta L_cls, -kappa adv_weight grad_theta L_D>
    for (theta, phi), and adv_weight grad_psi L_D for the discriminator."""
    lr, kappa, adv_w, alpha = 0.1, 0.7, 0.9, 0.3
    method = FedTAIL(lr=lr, class_sam=False, er_weight=0.0, adv_schedule="constant", adv_coeff=kappa,
                     adv_weight=adv_w, coherence_alpha=alpha, aux_hidden=0)
    sim = dg_sim(method, layout="centralized")
    seen = capture_grads(sim)
    ctx = start_client(sim)
    x, y, dom = sim.data.get_batch(sim.data.train, sim.data.client_indices[0][::15])
    assert torch.unique(dom).numel() == 3
    net = copy.deepcopy(sim.model)
    out = method.training_step((x, y, dom), ctx)
    assert method._kappa() == kappa
    # Reference without the gradient-reversal layer.
    theta = [net.fc.weight, net.fc.bias]
    phi = [net.head.weight, net.head.bias]
    psi = list(net.dg_disc.parameters())
    expected, l_d, l_coh = adversarial_reference(net, x, y, lambda h: h, dom, kappa, adv_w, alpha)
    assert float(l_coh.abs()) > 0
    torch.testing.assert_close(out.parts["coh"], l_coh.detach())
    torch.testing.assert_close(out.parts["adv"], l_d.detach())
    live = theta + phi + psi
    names = ["fc.weight", "fc.bias", "head.weight", "head.bias", "dg_disc.weight", "dg_disc.bias"]
    params = dict(sim.model.named_parameters())
    grads = seen[0]
    for name, ref, g in zip(names, live, expected):
        got = grads[id(params[name])]
        torch.testing.assert_close(got, g.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(params[name].detach(), ref.detach() - lr * g.detach(), rtol=1e-4, atol=1e-6)
    assert float(grads[id(params["dg_disc.weight"])].abs().sum()) > 0  # the discriminator learns


def test_gradient_reversal_and_dann_schedule():
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad((grad_reverse(x, 0.25) * torch.arange(3.0)).sum(), x)
    torch.testing.assert_close(grad, -0.25 * torch.arange(3.0).expand(4, 3))
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_coefficient(5.0) == dann_coefficient(1.0)  # progress clamped to [0, 1]
    method = FedTAIL(adversarial="on", adv_coeff=0.5, class_sam=False, er_weight=0.0, local_steps=4, aux_hidden=0)
    sim = dg_sim(method, layout="centralized")
    ctx = start_client(sim, round=2)
    x, y, dom = sim.data.get_batch(sim.data.train, sim.data.client_indices[0][::25])
    method.training_step((x, y, dom), ctx)
    # Round 2 of 2, one of 4 steps done: progress (1 + 1/4) / 2.
    assert method._kappa() == pytest.approx(0.5 * dann_coefficient(1.25 / 2))


# -- the global-teacher variant --------------------------------------------------------------------------------------
def test_global_teacher_kl_vanishes_when_the_local_model_is_the_global_one():
    lr = 0.1
    method = FedTAIL(lr=lr, class_sam=False, er_rho=0.0, er_weight=1.0, qt="global_teacher", adversarial="off")
    sim = dg_sim(method, layout="per_domain")
    assert not hasattr(sim.model, "dg_aux")
    ctx = start_client(sim)
    x, y, dom = sim.data.get_batch(sim.data.train, sim.data.client_indices[1][:40])
    w0 = params_of(sim)
    out = method.training_step((x, y, dom), ctx)
    assert abs(float(out.parts["er"])) < 1e-6
    g = ce_grads(sim.model, w0, x, y)
    for k, v in sim.model.named_parameters():  # the KL adds no gradient: plain SGD on L_cls
        torch.testing.assert_close(v.detach(), w0[k] - lr * g[k], msg=k)
    # At the SAM-perturbed weights the prediction moves away from the teacher's.
    method = FedTAIL(lr=lr, class_sam=False, er_rho=0.5, qt="global_teacher", adversarial="off")
    sim = dg_sim(method, layout="per_domain")
    out = method.training_step((x, y, dom), start_client(sim))
    assert float(out.parts["er"]) > 1e-6


# -- DGviaER ---------------------------------------------------------------------------------------------------------
def test_dgviaer_centralised_round_from_its_config(tmp_path):
    sim = _config_sim(tmp_path, "dgviaer", "centralized", "--method.init_args.local_steps", "3",
                      "--method.init_args.aux_hidden", "16")
    method = sim.method
    assert isinstance(method, DGviaER) and METHODS.get("dgviaer") is DGviaER
    assert sim.data.num_clients == 1 and sim.data.summary()["source_domains"] == ["plain", "textured", "inverted"]
    assert method.adversarial_active and not method.class_sam and method.er_rho == 0.0
    assert method.coherence_alpha == 0.0 and method._kappa() == pytest.approx(0.1)
    assert hasattr(sim.model, "dg_disc") and hasattr(sim.model, "dg_aux") and hasattr(sim.model, "dg_adv")
    before = {k: v.clone() for k, v in sim.global_state.items()}
    metrics = sim.run_round(1).metrics
    for part in ("train/loss", "train/loss_adv", "train/loss_er", "train/loss_aux"):
        assert math.isfinite(metrics[part]) and metrics[part] > 0, part
    assert "train/loss_csam" not in metrics and "train/loss_coh" not in metrics
    for prefix in ("fc.", "head.", "dg_disc.", "dg_aux.0.", "dg_adv.1."):
        assert any(not torch.equal(v, before[k]) for k, v in sim.global_state.items() if k.startswith(prefix)), prefix
    # The target domain's heads are trained by nobody.
    assert all(torch.equal(v, before[k]) for k, v in sim.global_state.items() if k.startswith(_head_keys(3)))
    evaluation = sim.evaluate()
    assert 0.0 <= evaluation["test/domain/thick/acc"] == evaluation["test/global/acc"] <= 1.0
