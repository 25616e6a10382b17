"""Temperature-aligned KL divergence (TKL) of FedPuReL (docs/reference.md 4.2).

For one sample with fine-tuned logits f and zero-shot logits z, with ``H(p) = -sum_c p_c log p_c`` and
``sigma_tau(a) = softmax(a / tau)``:

1. ``H* = (H(sigma_1(f)) + H(sigma_1(z))) / 2``;
2. ``tau_f`` solves ``H(sigma_tau(f)) = H*`` and ``tau_z`` solves ``H(sigma_tau(z)) = H*`` (the entropy of a
   tempered softmax increases with tau, so the root is unique): per-sample bisection, 20 iterations on
   ``tau in [0.05, 20]``, without gradients (official code);
3. ``TKL = mean_batch KL(sigma_{tau_z}(z) || sigma_{tau_f}(f))`` (teacher first, the training loss of the code) or
   ``KL(sigma_{tau_f}(f) || sigma_{tau_z}(z))`` (reverse, as the paper summary writes the diagnostic), with the
   temperatures treated as constants and gradients flowing through f only; probabilities are clamped at 1e-12
   before the logarithms (official code).

Aligning the entropies removes a pure confidence change: ``TKL(a z, z) ~ 0`` for any a > 0 whose aligned
temperatures fall inside the bracket, whereas the plain KL of ``sigma(2 z)`` and ``sigma(z)`` is positive. When both
logit vectors of a sample are constant every temperature works (H* = log C) and the divergence is 0.
The clamp also stops the gradient of classes whose probability is below 1e-12 (as in the code), and float rounding
can leave values of order -1e-8 for (nearly) identical distributions; nothing is clamped at 0.

Also here: :func:`plain_kl` (the paper's plain-KL ablation) and :func:`soft_cross_entropy`, the alignment loss of the
official code's adapter variant (``-sum_c softmax(z)_c log softmax(f)_c`` at T = 1, no temperature alignment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIRECTIONS = ("teacher_first", "reverse")
PROB_FLOOR = 1e-12  # clamp of the probabilities before the logarithms (official code)


def softmax_entropy(logits: Tensor, tau: Tensor | float = 1.0) -> Tensor:
    """Per-row entropy ``H(softmax(logits / tau))`` (natural log).

    Args:
        logits: (B, C).
        tau: scalar or (B,) temperatures.
    """
    if isinstance(tau, Tensor) and tau.dim() == 1:
        tau = tau.unsqueeze(1)
    log_p = F.log_softmax(logits / tau, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@torch.no_grad()
def bisect_temperature(logits: Tensor, target: Tensor, iters: int = 20, tau_min: float = 0.05,
                       tau_max: float = 20.0) -> Tensor:
    """Per-row temperature tau with ``H(softmax(logits / tau)) = target`` by bisection (entropy increases with tau).

    A target outside the entropies reachable in ``[tau_min, tau_max]`` ends at the nearer bracket end.

    Args:
        logits: (B, C), any float dtype (computed in float32 or wider).
        target: (B,) target entropies.
        iters: bisection iterations (official code: 20).
        tau_min, tau_max: the bracket (official code: 0.05, 20).

    Returns:
        (B,) temperatures: the midpoints of the final brackets.
    """
    a = logits.detach()
    a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    lo = torch.full(a.shape[:1], float(tau_min), dtype=a.dtype, device=a.device)
    hi = torch.full_like(lo, float(tau_max))
    target = target.to(a.dtype)
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_cold = softmax_entropy(a, mid) < target  # entropy too low: the root is at a larger tau
        lo = torch.where(too_cold, mid, lo)
        hi = torch.where(too_cold, hi, mid)
    return (lo + hi) / 2


@torch.no_grad()
def aligned_temperatures(f: Tensor, z: Tensor, iters: int = 20, tau_min: float = 0.05,
                         tau_max: float = 20.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(tau_f, tau_z, H*)``: the per-sample temperatures giving both tempered softmaxes the mean entropy H*.

    Args:
        f: (B, C) fine-tuned (student) logits.
        z: (B, C) zero-shot (teacher) logits.
        iters, tau_min, tau_max: bisection settings (see :func:`bisect_temperature`).
    """
    f32, z32 = f.detach().float(), z.detach().float()
    h_star = (softmax_entropy(f32) + softmax_entropy(z32)) / 2
    tau_f = bisect_temperature(f32, h_star, iters, tau_min, tau_max)
    tau_z = bisect_temperature(z32, h_star, iters, tau_min, tau_max)
    return tau_f, tau_z, h_star


def _kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """Per-row ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` with both probabilities clamped at 1e-12 in the logs."""
    return (p * (p.clamp_min(PROB_FLOOR).log() - q.clamp_min(PROB_FLOOR).log())).sum(-1)


def tkl(f: Tensor, z: Tensor, direction: str = "teacher_first", iters: int = 20, tau_min: float = 0.05,
        tau_max: float = 20.0, temperatures: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Batch-mean temperature-aligned KL divergence between student logits ``f`` and teacher logits ``z``.

    Gradients flow through ``f`` only (``z`` and both temperatures are constants).

    Args:
        f: (B, C) student (fine-tuned) logits.
        z: (B, C) teacher (zero-shot) logits.
        direction: ``teacher_first`` = ``KL(sigma_{tau_z}(z) || sigma_{tau_f}(f))`` (the training loss of the
            official code) or ``reverse`` = ``KL(sigma_{tau_f}(f) || sigma_{tau_z}(z))`` (the summary's diagnostic).
        iters, tau_min, tau_max: bisection settings.
        temperatures: precomputed ``(tau_f, tau_z)`` from :func:`aligned_temperatures` (to share one bisection
            between both directions).

    Returns:
        Scalar: the mean over the batch of the per-sample divergence (0 for a sample whose two logit vectors are
        both constant).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown TKL direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if f.shape != z.shape or f.dim() != 2:
        raise ValueError(f"f and z must both be (B, C); got {tuple(f.shape)} and {tuple(z.shape)}")
    if temperatures is None:
        tau_f, tau_z, _ = aligned_temperatures(f, z, iters, tau_min, tau_max)
    else:
        tau_f, tau_z = temperatures
    f32 = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    z32 = z.detach().to(f32.dtype)
    p_f = F.softmax(f32 / tau_f.to(f32.dtype).unsqueeze(1), dim=-1)
    p_z = F.softmax(z32 / tau_z.to(f32.dtype).unsqueeze(1), dim=-1)
    rows = _kl_rows(p_z, p_f) if direction == "teacher_first" else _kl_rows(p_f, p_z)
    constant = (f32.detach().amax(-1) == f32.detach().amin(-1)) & (z32.amax(-1) == z32.amin(-1))
    rows = torch.where(constant, torch.zeros_like(rows), rows)
    return rows.mean()


def plain_kl(f: Tensor, z: Tensor, direction: str = "teacher_first") -> Tensor:
    """Batch-mean KL at temperature 1 (no alignment), with the same clamping: the ablation baseline of TKL."""
    p_f, p_z = F.softmax(f.float(), dim=-1), F.softmax(z.detach().float(), dim=-1)
    return (_kl_rows(p_z, p_f) if direction == "teacher_first" else _kl_rows(p_f, p_z)).mean()


def soft_cross_entropy(f: Tensor, z: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean soft cross-entropy ``-T^2 sum_c sigma_T(z)_c log sigma_T(f)_c`` of student logits ``f`` against
    the teacher's softened distribution (no temperature alignment, no clamping: ``log_softmax``).

    The alignment loss that FedPuReL's released code uses for its adapter variant (at T = 1). It exceeds the
    teacher-first KL by the teacher's entropy, a constant: the gradient in ``f`` is the KL's,
    ``(sigma_T(f) - sigma_T(z)) T / B`` per row. Gradients flow through ``f`` only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    f32 = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    p_z = F.softmax(z.detach().to(f32.dtype) / t, dim=-1)
    return -(p_z * F.log_softmax(f32 / t, dim=-1)).sum(-1).mean() * (t * t)
