"""Loss functions shared by methods. Every method takes a ``loss`` argument (a :class:`Loss`), so any of these
can be combined with any method; the long-tail losses need the class counts, which the engine passes (by
default the client's local training label histogram n_{k,c}).

Pure functions first (tested against hand-worked examples), then small config classes wrapping them, which
jsonargparse builds from YAML (``loss: {class_path: Focal, init_args: {gamma: 2.0}}``).

Zero-count classes. Under label skew most clients miss some classes (n_{k,c} = 0), where the papers' formulas
take log(0) or 0^{-1/4}. Every count-based quantity here clamps the counts to :data:`COUNT_EPS` (1e-8) instead of
to 1: a missing class then gets a log prior ~18.4 nats below that of a class with a single sample, i.e. it drops
out of the calibrated softmax. That is the limit n_c -> 0 of the papers' formulas (its prior is 0: the client
cannot be blamed for never predicting it) while every value stays finite, so no log(0), no -inf logits and no
NaN gradients appear under any precision. Clamping to 1 would instead treat a missing class like a rare
present one and keep pushing its logit down on every client that lacks it. LDAM is the exception: its margins
are rescaled by the largest margin, so it normalises over the present classes only (see :func:`ldam_margins`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlt.registry import Registry

LOSSES: Registry[type[Loss]] = Registry("loss")

COUNT_EPS = 1e-8
"""Lower clamp of the class counts wherever a count is logged or raised to a negative power."""


def _counts(class_counts: Tensor, like: Tensor) -> Tensor:
    """The counts as float32 on ``like``'s device, clamped to :data:`COUNT_EPS`."""
    return class_counts.to(device=like.device, dtype=torch.float32).clamp_min(COUNT_EPS)


def log_prior(class_counts: Tensor) -> Tensor:
    """log pi_c = log(n_c / sum_j n_j) with n_c clamped to :data:`COUNT_EPS` (module docstring)."""
    counts = _counts(class_counts, class_counts)
    return counts.log() - counts.sum().log()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean softmax cross-entropy."""
    return F.cross_entropy(logits, target)


def logit_adjusted(logits: Tensor, target: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """Logit-adjusted loss (Menon et al., ICLR 2021, Eq. 10): CE(z_c + tau log pi_c).

    Args:
        logits: (B, C) scores z.
        target: (B,) labels.
        class_counts: (C,) counts n_c defining the prior pi_c = n_c / sum_j n_j.
        tau: adjustment strength tau (1 recovers balanced softmax).
    """
    return F.cross_entropy(logits.float() + tau * log_prior(class_counts).to(logits.device), target)


def balanced_softmax(logits: Tensor, target: Tensor, class_counts: Tensor) -> Tensor:
    """Balanced softmax (Ren et al., NeurIPS 2020, Eq. 4): CE(z_c + log pi_c), i.e. the softmax of
    pi_c exp(z_c); identical to :func:`logit_adjusted` with tau = 1.
    """
    return logit_adjusted(logits, target, class_counts, tau=1.0)


def ldam_margins(class_counts: Tensor, max_margin: float = 0.5) -> Tensor:
    """LDAM's per-class margins Delta_c = C / n_c^{1/4} (Cao et al., NeurIPS 2019, Eq. 13), with C chosen so that
    the largest margin among the *present* classes (n_c > 0) is ``max_margin``.

    A class with n_c = 0 never occurs as a target of the client, so its margin is never used; it is set to
    ``max_margin`` rather than letting 0^{-1/4} = inf rescale every other margin to 0.
    """
    counts = class_counts.float()
    present = counts > 0
    inv = torch.where(present, counts.clamp_min(COUNT_EPS).pow(-0.25), torch.zeros_like(counts))
    margins = inv * (max_margin / inv.max().clamp_min(COUNT_EPS))
    return torch.where(present, margins, torch.full_like(margins, max_margin))


def drw_weights(class_counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Deferred re-weighting weights by effective number (Cui et al., CVPR 2019, used by LDAM-DRW):
    w_c proportional to (1 - beta) / (1 - beta^{n_c}), normalised so that the weights sum to C.

    Classes with n_c = 0 have no samples to weight and get weight 0 (their effective number is 0).
    """
    counts = class_counts.double()
    present = counts > 0
    effective = (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts)).clamp_min(1e-300)
    w = torch.where(present, (1.0 - beta) / effective, torch.zeros_like(counts))
    return (w * (counts.numel() / w.sum().clamp_min(1e-300))).to(class_counts.device, torch.float32)


def ldam(
    logits: Tensor,
    target: Tensor,
    class_counts: Tensor,
    max_margin: float = 0.5,
    scale: float = 30.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019, Eq. 13):
    CE(s * (z - Delta_y e_y), y), the target logit lowered by its class margin before scaling by s.

    Args:
        logits: (B, C) scores z (the paper uses a normalised linear head; any head works).
        target: (B,) labels y.
        class_counts: (C,) counts n_c defining the margins (:func:`ldam_margins`).
        max_margin: the largest margin (0.5 in the paper).
        scale: logit scale s (30 in the official code).
        weight: optional (C,) class weights (DRW); the mean is then weighted, sum_i w_{y_i} l_i / sum_i w_{y_i}.
    """
    margins = ldam_margins(class_counts, max_margin).to(logits.device)
    shift = F.one_hot(target, logits.shape[1]).to(torch.float32) * margins[target].unsqueeze(1)
    w = weight.to(logits.device, torch.float32) if weight is not None else None
    return F.cross_entropy(scale * (logits.float() - shift), target, weight=w)


def focal(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Tensor | None = None) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017, Eq. 5): mean_i -alpha_{y_i} (1 - p_{y_i})^gamma log p_{y_i}.

    Args:
        logits: (B, C) scores.
        target: (B,) labels.
        gamma: focusing parameter gamma >= 0 (0 is cross-entropy).
        alpha: optional (C,) per-class weights alpha_c (the multi-class form of the paper's alpha_t); the
            mean is a plain mean over samples, as in the paper's normalisation by the number of examples.
    """
    if gamma == 0 and alpha is None:
        return F.cross_entropy(logits, target)  # the same value, bit-identical to FedAvg's loss
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -logp
    if gamma != 0:
        # 1 - p = -expm1(log p) is exact near p = 1; the clamp keeps d/dp (1-p)^gamma finite for gamma < 1.
        loss = loss * (-torch.expm1(logp)).clamp_min(torch.finfo(torch.float32).tiny).pow(gamma)
    if alpha is not None:
        loss = loss * alpha.to(loss.device, torch.float32)[target]
    return loss.mean()


def calibrated_ce(logits: Tensor, target: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """FedLC's calibrated cross-entropy (Zhang et al., ICML 2022, Sec. 4): CE(z_c - tau n_c^{-1/4}), every
    logit lowered by its pairwise label margin computed from the local counts n_{k,c}.

    The margins are shifted by their minimum before use. Softmax cross-entropy is invariant to adding a
    constant to all logits, so this changes nothing mathematically, but it makes uniform counts an exact
    no-op (bit-identical to plain cross-entropy).

    Args:
        logits: (B, C) scores z.
        target: (B,) labels.
        class_counts: (C,) local counts n_{k,c} (clamped to :data:`COUNT_EPS`: a missing class gets margin
            ~100 tau and drops out of the softmax, the limit n -> 0 of the paper's formula).
        tau: calibration strength tau.
    """
    margins = tau * _counts(class_counts, logits).pow(-0.25)
    return F.cross_entropy(logits - (margins - margins.min()), target)


def _per_client_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of each client: logits (K, B, C), target (K, B) -> (K,)."""
    k, b = target.shape
    return F.cross_entropy(logits.reshape(k * b, -1), target.reshape(-1), reduction="none").view(k, b).mean(1)


class Loss:
    """A classification loss ``(logits, target, class_counts, round) -> scalar``.

    ``class_counts`` is the (C,) label histogram the loss should calibrate to (by default the client's local
    training histogram); ``round`` is the 1-based round (for schedules such as deferred re-weighting).
    """

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        raise TypeError(f"{type(self).__name__} must implement __call__")

    def per_client(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        """The loss of each of K clients at once (vectorized cohorts): ``logits`` (K, B, C), ``target`` (K, B),
        ``class_counts`` (K, C) -> (K,), entry k equal to ``self(logits[k], target[k], class_counts[k], round)`` up
        to float rounding. Default: one call per client; a loss with a batched form overrides it."""
        return torch.stack([self(z, t, n, round) for z, t, n in zip(logits, target, class_counts)])

    def describe(self) -> str:
        """Short description for logs: the class name and its hyperparameters."""
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})" if args else type(self).__name__


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Plain softmax cross-entropy (ignores the class counts)."""

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        return cross_entropy(logits, target)

    def per_client(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        return _per_client_ce(logits, target)


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(Loss):
    """Balanced softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020):
    cross-entropy on z_c + log pi_c with pi the class prior of ``class_counts``."""

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        return balanced_softmax(logits, target, class_counts)


@LOSSES.register("logit_adjusted")
class LogitAdjusted(Loss):
    """Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021):
    cross-entropy on z_c + tau log pi_c.

    Args:
        tau: adjustment strength tau (1 in the paper; 1 equals balanced softmax).
    """

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = tau

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        return logit_adjusted(logits, target, class_counts, self.tau)


@LOSSES.register("ldam")
class LDAM(Loss):
    """LDAM with optional deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019).

    Args:
        max_margin: the largest class margin (0.5 in the paper).
        scale: logit scale s (30 in the official code).
        drw_round: first round (1-based) with DRW class weights; ``None`` never re-weights (plain LDAM). The
            paper switches at epoch 160 of 200; choose the round matching your schedule.
        beta: effective-number beta of the DRW weights (0.9999 in the paper).
    """

    def __init__(self, max_margin: float = 0.5, scale: float = 30.0, drw_round: int | None = None,
                 beta: float = 0.9999) -> None:
        if max_margin <= 0 or scale <= 0:
            raise ValueError(f"LDAM needs max_margin > 0 and scale > 0, got {max_margin}, {scale}")
        if not 0 <= beta < 1:
            raise ValueError(f"LDAM beta must be in [0, 1), got {beta}")
        self.max_margin = max_margin
        self.scale = scale
        self.drw_round = drw_round
        self.beta = beta

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        deferred = self.drw_round is not None and round >= self.drw_round
        weight = drw_weights(class_counts, self.beta) if deferred else None
        return ldam(logits, target, class_counts, self.max_margin, self.scale, weight)


@LOSSES.register("focal")
class Focal(Loss):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017); ignores the class counts.

    Args:
        gamma: focusing parameter gamma >= 0 (2 in the paper; 0 is cross-entropy).
        alpha: optional per-class weights alpha_c, one per class (``None``: all 1).
    """

    def __init__(self, gamma: float = 2.0, alpha: list[float] | None = None) -> None:
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.alpha = list(alpha) if alpha is not None else None

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        alpha = None
        if self.alpha is not None:
            if len(self.alpha) != logits.shape[1]:
                raise ValueError(f"focal alpha has {len(self.alpha)} entries for {logits.shape[1]} classes")
            alpha = torch.tensor(self.alpha, device=logits.device)
        return focal(logits, target, self.gamma, alpha)


@LOSSES.register("calibrated_ce")
class CalibratedCE(Loss):
    """FedLC's calibrated cross-entropy (Zhang et al., "Federated Learning with Label Distribution Skew via
    Logits Calibration", ICML 2022): cross-entropy on z_c - tau n_c^{-1/4}.

    Args:
        tau: calibration strength tau.
    """

    def __init__(self, tau: float = 1.0) -> None:
        if tau < 0:
            raise ValueError(f"calibration tau must be >= 0, got {tau}")
        self.tau = tau

    def __call__(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        return calibrated_ce(logits, target, class_counts, self.tau)

    def per_client(self, logits: Tensor, target: Tensor, class_counts: Tensor, round: int = 1) -> Tensor:
        margins = self.tau * _counts(class_counts, logits).pow(-0.25)  # (K, C)
        shift = margins - margins.min(1, keepdim=True).values
        return _per_client_ce(logits - shift.unsqueeze(1), target)
