"""Sharpness-aware minimisation primitives shared by FedSAM and FedTAIL.

SAM (Foret et al., ICLR 2021, arXiv:2010.01412): with the gradient g at w, the ascent step
eps = rho * g / ||g|| (ASAM, Kwon et al. 2021: eps = rho * T^2 g / ||T g|| with T = |w| + eta) moves to the
locally worst weights; the gradient taken at w + eps (eps held constant) is the update direction at w.
These helpers apply and undo eps in place on a list of parameters, so no copy of the model is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["frozen_bn_stats", "perturbation", "restore_", "sam_grad_norm", "shift_"]


def sam_grad_norm(params: Sequence[Tensor], grads: Sequence[Tensor | None], adaptive: bool = False,
                  eta: float = 0.0) -> Tensor:
    """||g|| (SAM) or ||T g|| with T = |w| + eta (ASAM) over the parameters that have a gradient."""
    parts = [((p.detach().abs() + eta) * g if adaptive else g).norm(2) for p, g in zip(params, grads) if g is not None]
    if not parts:
        return torch.zeros(())
    return torch.stack(parts).norm(2)


@torch.no_grad()
def perturbation(params: Sequence[Tensor], grads: Sequence[Tensor | None], rho: float, adaptive: bool = False,
                 eta: float = 0.0, eps_floor: float = 1e-12) -> list[Tensor | None]:
    """The SAM (or ASAM) ascent step eps for every parameter (``None`` where the gradient is ``None``).

    Args:
        params: the parameters w.
        grads: their gradients g (same order).
        rho: the radius rho; ||eps|| = rho for SAM.
        adaptive: ASAM's element-wise scaling T = |w| + eta.
        eta: ASAM's eta.
        eps_floor: added to the norm against division by zero.
    """
    norm = sam_grad_norm(params, grads, adaptive, eta)
    scale = rho / (norm + eps_floor)
    out: list[Tensor | None] = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(None)
        elif adaptive:
            t = p.abs() + eta
            out.append(t * t * g * scale)
        else:
            out.append(g * scale)
    return out


@torch.no_grad()
def shift_(params: Sequence[Tensor], eps: Sequence[Tensor | None], alpha: float = 1.0) -> None:
    """w <- w + alpha * eps in place (skipping ``None`` entries)."""
    pairs = [(p, e) for p, e in zip(params, eps) if e is not None]
    if pairs:
        torch._foreach_add_([p for p, _ in pairs], [e for _, e in pairs], alpha=alpha)


def restore_(params: Sequence[Tensor], eps: Sequence[Tensor | None]) -> None:
    """Undoes :func:`shift_` (w <- w - eps)."""
    shift_(params, eps, alpha=-1.0)


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[None]:
    """Runs the block with BatchNorm running statistics restored afterwards.

    SAM's extra forward passes at perturbed weights must not count as extra observations of the data: the
    running mean/variance and the batch counter of every BatchNorm layer are put back as they were.
    """
    saved = [(m, m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None,
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:  # a saved value means the layer held that buffer (and still does)
                if mean is not None:
                    assert m.running_mean is not None
                    m.running_mean.copy_(mean)
                if var is not None:
                    assert m.running_var is not None
                    m.running_var.copy_(var)
                if count is not None:
                    assert m.num_batches_tracked is not None
                    m.num_batches_tracked.copy_(count)
