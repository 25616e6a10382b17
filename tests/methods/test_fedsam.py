"""Invariants of FedSAM / FedASAM (fedlt/methods/fedsam.py): rho = 0 is FedAvg (with and without BatchNorm), one SAM
step by hand on a linear model, ||eps|| = rho, the ASAM ascent step by hand, BN statistics of the clean pass only."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim
from torch import nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.methods import FedAvg
from fedlt.methods.fedsam import FedSAM
from fedlt.types import ClientContext, ServerMessage


def _ctx(num_classes: int) -> ClientContext:
    return ClientContext(client_id=0, round=1, num_samples=4, class_counts=torch.ones(num_classes),
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         message=ServerMessage(round=1, state={}))


def _wired(method: FedSAM, model: nn.Module, num_classes: int) -> ClientContext:
    """Sets the method up on ``model`` outside a simulator (plain float32 trainer) and starts a client."""
    method.setup(model, SimpleNamespace(num_classes=num_classes), LocalTrainer(None))
    ctx = _ctx(num_classes)
    method.on_client_start(ctx)
    method.trainer.open_fit(method)
    return ctx


@pytest.mark.parametrize("model", ["cnn", "resnet8"])
def test_rho_zero_is_fedavg(model):
    """eps = 0: the second pass sees the same weights (and, BN buffers restored, the same statistics)."""
    data = tiny_data()
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16), model=model, data=data)
    b = tiny_sim(FedSAM(rho=0.0, lr=0.05, batch_size=16), model=model, data=data)
    run(a), run(b)
    for k, v in global_copy(a).items():
        torch.testing.assert_close(b.global_state[k], v, msg=k)


def test_fedsam_differs_from_fedavg_and_logs_both_losses():
    data = tiny_data()
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16), data=data)
    b = tiny_sim(FedSAM(rho=0.05, lr=0.05, batch_size=16), data=data)
    run(a, 1)
    (metrics,) = run(b, 1)
    assert any(not torch.allclose(b.global_state[k], v) for k, v in a.global_state.items())
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/loss_sam"])
    assert metrics["train/loss_sam"] > metrics["train/loss"]  # the ascent step raises the loss (first order)


def _ce_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Closed-form gradients of the mean cross-entropy of the linear model z = x W^T + b."""
    err = torch.softmax(x @ w.t() + b, dim=1) - F.one_hot(y, w.shape[0]).double()
    return err.t() @ x / x.shape[0], err.mean(0)


def test_one_sam_step_by_hand():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    model = nn.Linear(3, 2).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    rho, lr = 0.3, 0.5
    method = FedSAM(rho=rho, lr=lr, batch_size=4)
    ctx = _wired(method, model, 2)
    out = method.training_step((x, y), ctx)
    # By hand: g = grad at w; eps = rho g / ||g||; w <- w - lr grad(w + eps).
    gw, gb = _ce_grads(w0, b0, x, y)
    norm = torch.cat([gw.flatten(), gb]).norm()
    ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = _ce_grads(w0 + ew, b0 + eb, x, y)
    torch.testing.assert_close(model.weight.detach(), w0 - lr * gw2)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * gb2)
    assert out.loss is None
    torch.testing.assert_close(out.parts["loss"], F.cross_entropy(x @ w0.t() + b0, y))
    torch.testing.assert_close(out.parts["sam"], F.cross_entropy(x @ (w0 + ew).t() + b0 + eb, y))
    assert all(p.grad is None for p in model.parameters())  # the step zeroed the gradients


def test_eps_norm_is_rho_and_parameters_without_gradient_are_skipped():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 4, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g)),
              torch.nn.Parameter(torch.randn(2, generator=g))]
    params[0].grad = torch.randn(5, 4, generator=g)
    params[1].grad = torch.randn(3, generator=g)
    method = FedSAM(rho=0.07)
    eps = method.perturb(params)
    assert eps[2] is None
    torch.testing.assert_close(torch.cat([eps[0].flatten(), eps[1]]).norm(), torch.tensor(0.07))
    torch.testing.assert_close(eps[0], 0.07 * params[0].grad / torch.cat([params[0].grad.flatten(),
                                                                          params[1].grad]).norm())


def test_asam_eps_by_hand():
    """eps = rho T^2 g / ||T g|| with T = |w| + eta, on every parameter; ||T^-1 eps|| = rho."""
    w1, w2 = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5]))
    w1.grad, w2.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0])
    rho, eta = 0.5, 0.1
    eps = FedSAM(rho=rho, adaptive=True, eta=eta).perturb([w1, w2])
    # T = (1.1, 2.1 | 0.6); T g = (3.3, 8.4 | 0.6); ||T g|| = sqrt(3.3^2 + 8.4^2 + 0.6^2) = sqrt(81.81).
    norm = math.sqrt(3.3**2 + 8.4**2 + 0.6**2)
    torch.testing.assert_close(eps[0], torch.tensor([rho * 1.21 * 3.0, rho * 4.41 * 4.0]) / norm)
    torch.testing.assert_close(eps[1], torch.tensor([rho * 0.36 * 1.0]) / norm)
    scaled = torch.cat([eps[0] / torch.tensor([1.1, 2.1]), eps[1] / 0.6])
    torch.testing.assert_close(scaled.norm(), torch.tensor(rho))


def test_batchnorm_statistics_are_those_of_the_clean_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    method = FedSAM(rho=0.5, lr=0.1, batch_size=8)
    ctx = _wired(method, model, 2)
    for _ in range(2):  # the second step reuses the buffer snapshot
        reference = copy.deepcopy(model)
        method.training_step((x, y), ctx)
        reference(x)  # one clean train-mode pass at the step's starting weights
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model[1], name), getattr(reference[1], name)), name
    assert int(model[1].num_batches_tracked) == 2


def test_overflowing_gradient_gives_zero_eps_under_a_scaler():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([float("inf"), 1.0])
    method = FedSAM(rho=0.1)
    method.trainer = SimpleNamespace(scaler=object())  # only its presence matters
    (eps,) = method.perturb([p])
    assert torch.equal(eps, torch.zeros(2))


@pytest.mark.parametrize("kwargs", [{"rho": -0.1}, {"eta": -1.0}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        FedSAM(**kwargs)
