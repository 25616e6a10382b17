"""Domain-generalization building blocks shared by FedTAIL and DGviaER.

* gradient reversal (DANN, Ganin et al. 2016) and gradient scaling layers;
* the DANN coefficient schedule kappa_p = 2 / (1 + exp(-10 p)) - 1;
* the domain discriminator D_psi and DGviaER's per-domain auxiliary classifiers (Zhao et al., NeurIPS 2020,
  "Domain Generalization via Entropy Regularization"), added to the model as ``dg_disc``, ``dg_aux`` and ``dg_adv``;
* DGviaER's entropy-regularisation term as implemented in its code (docs/reference.md Appendix R 2.1): auxiliary
  heads T_i
  trained on detached features of domain i; features of domains j != i classified by the *frozen* T_i with the
  cross-entropy gradient into the extractor scaled by 0.05; heads T'_i trained on domain i through a reversal of
  0.001; every auxiliary cross-entropy weighted by per-batch inverse class frequencies;
* a reducer that averages each per-domain head over the clients holding that domain (weights = their images of
  the domain), so a head trained by one client is not diluted by the untouched copies of the others.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedlt.engine.params import copy_tensors_
from fedlt.methods.base import Reducer

__all__ = [
    "DomainHeadReducer",
    "aux_head_loss",
    "batch_domains",
    "dann_coefficient",
    "entropy_regularization",
    "grad_reverse",
    "grad_scale",
    "inverse_frequency_weights",
    "make_discriminator",
    "make_domain_heads",
]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``coeff`` (negative: gradient reversal)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.coeff, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Gradient reversal layer GRL_kappa: identity forward, gradient times -kappa backward."""
    return _ScaleGrad.apply(x, -coeff)


def grad_scale(x: Tensor, coeff: float) -> Tensor:
    """Identity forward, gradient times ``coeff`` backward (not reversed)."""
    return _ScaleGrad.apply(x, coeff)


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule kappa_p = 2 / (1 + exp(-gamma p)) - 1 for training progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


def _mlp(d: int, hidden: int, out: int, dropout: float) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(d, out)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


def make_discriminator(d: int, num_domains: int, hidden: int = 256, dropout: float = 0.5) -> nn.Module:
    """D_psi: features (B, d) -> domain logits (B, M), a DANN-style MLP."""
    return _mlp(d, hidden, num_domains, dropout)


def make_domain_heads(d: int, num_classes: int, num_domains: int, hidden: int = 256,
                      dropout: float = 0.5) -> nn.ModuleList:
    """One auxiliary classifier per domain (DGviaER's T_i or T'_i): features (B, d) -> logits (B, C)."""
    return nn.ModuleList([_mlp(d, hidden, num_classes, dropout) for _ in range(num_domains)])


def batch_domains(batch: tuple[Tensor, ...]) -> Tensor:
    """The batch's domain ids (zeros for single-domain data, whose batches carry none)."""
    if len(batch) > 2:
        return batch[2]
    return torch.zeros_like(batch[1])


def inverse_frequency_weights(y: Tensor, num_classes: int) -> Tensor:
    """Per-sample weights 1 / n_c(batch), normalised to mean 1 (DGviaER's class-balanced auxiliary losses)."""
    counts = torch.bincount(y, minlength=num_classes).float()
    w = 1.0 / counts[y]
    return w * (w.numel() / w.sum())


def _weighted_ce(logits: Tensor, y: Tensor, num_classes: int) -> Tensor:
    w = inverse_frequency_weights(y, num_classes)
    return (F.cross_entropy(logits, y, reduction="none") * w).mean()


def _frozen(module: nn.Module, h: Tensor) -> Tensor:
    """module(h) with the module's parameters detached: gradients reach ``h`` but not the module."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, (h,))


def aux_head_loss(heads: nn.ModuleList, h: Tensor, y: Tensor, dom: Tensor, num_classes: int) -> Tensor:
    """Trains each T_i on the *detached* features of its own domain (class-balanced cross-entropy), summed over
    the domains present in the batch."""
    h = h.detach()
    losses = [_weighted_ce(heads[i](h[dom == i]), y[dom == i], num_classes) for i in torch.unique(dom).tolist()]
    return torch.stack(losses).sum()


def entropy_regularization(aux: nn.ModuleList, adv: nn.ModuleList, h: Tensor, y: Tensor, dom: Tensor,
                           trained_domains: list[int], num_classes: int, cross_scale: float = 0.05,
                           adv_coeff: float = 0.001) -> tuple[Tensor, Tensor]:
    """DGviaER's entropy-regularisation terms on features ``h`` (which carry the extractor's graph).

    Returns:
        (cross, adversarial): ``cross`` is the class-balanced cross-entropy of every sample of domain j under each
        frozen head T_i of another trained domain i (mean over the (i, j) pairs present), with the gradient into
        the extractor scaled by ``cross_scale``; ``adversarial`` trains T'_j on domain j through a gradient
        reversal of ``adv_coeff`` (summed over the domains present). Zeros when no pair exists.
    """
    cross_terms, adv_terms = [], []
    present = torch.unique(dom).tolist()
    scaled = grad_scale(h, cross_scale)
    for j in present:
        mask = dom == j
        for i in trained_domains:
            if i != j:
                cross_terms.append(_weighted_ce(_frozen(aux[i], scaled[mask]), y[mask], num_classes))
        adv_terms.append(_weighted_ce(adv[j](grad_reverse(h[mask], adv_coeff)), y[mask], num_classes))
    zero = h.sum() * 0.0
    cross = torch.stack(cross_terms).mean() if cross_terms else zero
    adversarial = torch.stack(adv_terms).sum() if adv_terms else zero
    return cross, adversarial


class DomainHeadReducer(Reducer):
    """FedAvg for the shared model, but each per-domain head ``<prefix>.<i>.*`` is averaged only over the clients
    holding domain i, weighted by their images of domain i (a head nobody trained keeps its value).

    Clients upload, per domain i, ``n_{k,i} * theta_{k,i}`` (flattened) and ``n_{k,i}`` as extras.

    Args:
        head_keys: per domain i, the state-dict keys of its heads (``dg_aux.i.*``, ``dg_adv.i.*``).
        numel: per domain, the number of head elements.
    """

    def __init__(self, head_keys: list[list[str]], numel: int) -> None:
        m = len(head_keys)
        super().__init__({"domain_heads": (m, numel), "domain_weight": (m,)})
        self.head_keys = head_keys

    def server_step(self, round: int) -> None:
        before = {k: self.global_state[k].clone() for keys in self.head_keys for k in keys}
        super().server_step(round)
        sums, weights = self.extras_sum["domain_heads"], self.extras_sum["domain_weight"]
        with torch.no_grad():
            for i, keys in enumerate(self.head_keys):
                if float(weights[i]) <= 0:
                    copy_tensors_([self.global_state[k] for k in keys], [before[k] for k in keys])
                    continue
                flat = sums[i] / weights[i]
                offset = 0
                for k in keys:
                    t = self.global_state[k]
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


def domain_head_extras(model: nn.Module, head_keys: list[list[str]], numel: int,
                       domain_counts: Tensor) -> dict[str, Tensor]:
    """The extras of :class:`DomainHeadReducer` for one client: ``n_{k,i} * flat(theta_i)`` and ``n_{k,i}``."""
    state = model.state_dict()
    rows = []
    for i, keys in enumerate(head_keys):
        flat = torch.cat([state[k].detach().reshape(-1).float() for k in keys])
        rows.append(flat * domain_counts[i])
    return {"domain_heads": torch.stack(rows) if rows else torch.zeros(0, numel), "domain_weight": domain_counts}


def domain_head_keys(model: nn.Module, prefixes: tuple[str, ...], num_domains: int) -> tuple[list[list[str]], int]:
    """Per domain i, the float state keys under ``<prefix>.<i>.`` for every prefix, and the per-domain numel."""
    state = model.state_dict()
    keys = [[k for p in prefixes for k in state if k.startswith(f"{p}.{i}.") and state[k].is_floating_point()]
            for i in range(num_domains)]
    numel = sum(state[k].numel() for k in keys[0]) if keys else 0
    return keys, numel
