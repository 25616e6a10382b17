"""FedTAIL: federated long-tailed domain generalization with sharpness-guided gradient matching.

Paper: "FedTAIL: Federated Long-Tailed Domain Generalization with Sharpness-Guided Gradient Matching", ICML 2025
Workshop on Collaborative and Federated Agentic Workflows (CFAgentic), arXiv:2506.08518. Spec: docs/reference.md
section 6 and Appendix R section 2. The official repository holds only a README, so everything below is a
**reconstruction** [R] from the paper summary, third-party notes and the lineage FedTAIL builds on (DGviaER,
SAMALTDG, SAGM); each open choice is a constructor argument.

Model: feature extractor F_theta (the backbone), label classifier T_phi (``head``), and when active a domain
discriminator D_psi (``dg_disc``) behind a gradient-reversal layer, plus DGviaER's per-domain auxiliary heads
(``dg_aux`` T_i and ``dg_adv`` T'_i) for the entropy term.

Client (one local step on a batch (x, y, d), docs/reference.md 6.2), total gradient on w = (theta, phi):
  1. clean pass: L_cls = CE(T(F(x)), y) at w; adversarial term L_D = CE(D(GRL_kappa(F(x))), d) with the DANN
     schedule kappa_p = 2/(1+exp(-10p)) - 1 (psi descends L_D, theta receives -kappa grad L_D);
  2. coherence L_coh = -alpha <g_cls, g_adv> on theta (double backward), g_adv = grad_theta of the reversed
     adversarial loss; ``coherence`` = linear (default, Appendix R T1) | hinge | cos;
  3. class-wise SAM: per class c of the batch, eps_c = rho g_c/||g_c|| from L_cls(B_c), and gamma_c grad L_c at
     w + eps_c, with gamma_c = 1/(lambda_c + delta) normalised to sum to the number of batch classes;
     lambda_c is the top Hessian eigenvalue of the class loss w.r.t. the head (power iteration on
     Hessian-vector products, ``hessian_iters``), estimated on up to ``hessian_samples`` local images of each
     class at the start of every local epoch (``hessian_refresh_steps``) and smoothed across rounds
     (``hessian_ema``, kept per client). ``gamma_target`` = loss (literal formula) | perturbation (gamma_c
     scales eps_c); ``gamma_mode`` = inverse | direct (ambiguity A-T1);
  4. sharpness-aware entropy regularisation at the global SAM point w + eps, eps = er_rho g/||g||:
     ``qt="domain_heads"`` (default, Appendix R T3): DGviaER's term -- frozen auxiliary heads of the other source
     domains classify this client's features with the gradient into F scaled by 0.05, and T'_d is trained through
     a reversal of 0.001 -- while T_d learns on detached clean features; ``qt="global_teacher"``:
     KL(Q_T || softmax(T(F(x)) at w + eps)) with Q_T the received global model's prediction;
     ``qt="momentum_teacher"``: the paper's target distribution from a momentum-updated ensemble -- Q_T is the
     prediction of the server's exponential moving average of the global models, theta_T <- m theta_T + (1 - m)
     theta_global after every round (m = ``teacher_momentum``; theta_T starts at the initial global model);
  5. one SGD step on the sum (the auxiliary heads with ``aux_lr_scale`` times the learning rate).
Server: FedAvg over (theta, phi, psi); each per-domain head is averaged over the clients holding its domain
(``domain_head_aggregation``); the per-(domain, class) feature moments and the momentum teacher are server state
(checkpointed with it) sent with the global model. Inference: argmax T(F(x)); the discriminator and auxiliary
heads are unused.

Hyperparameters (symbol, default): rho (class-wise SAM radius, 0.05), delta (``gamma_delta``, 1e-3), alpha
(``coherence_alpha``, 0.1 [R]; unknown in the paper), loss weights of L_adv / L_sharp-er / the class-wise term
(``adv_weight``, ``er_weight``, ``class_sam_weight``, 1.0 [R], A-T4), kappa max (``adv_coeff``, 1.0),
power-iteration steps (10), auxiliary-head weights 0.05 / 0.001 (DGviaER code).

Deliberate choices and deviations (all arguments):
* ``class_sam_reduction="mean"``: the class-wise term is (1/G) sum_g gamma_g L_g over the G class groups of the
  batch. The literal sum (``sum``) multiplies the effective learning rate by G: on digit_domains it diverged to a
  constant predictor at every learning rate that trains FedAvg.
* The federated adversarial term (``adv_source="shared_stats"``, the default; ambiguity A-T3). With one source
  domain per client (layout (i), the paper's setting) a discriminator trained on local features alone sees a
  single label, so there is nothing to align and the coherence term is undefined. FedTAIL therefore shares, per
  (source domain, class), the first two moments of the extractor's features: every client accumulates sum h,
  sum h^2 and the count of the clean features of its local steps (detached) and uploads them as reducer extras;
  the server sums them (exactly, so the result does not depend on the number of ranks) and broadcasts the latest
  moments of every cell with the global model. In a local step the discriminator D_psi then classifies the
  client's own features (label: their domain) together with one class-matched sample per image drawn from
  another source domain's moments, z ~ N(mu_{d',y}, diag sigma^2_{d',y}) (d' != d chosen uniformly among the
  domains with at least ``adv_min_count`` features of class y). psi descends the whole L_D; the extractor receives
  the reversed gradient through its own features only (the shared samples are constants), so it learns features
  the discriminator cannot tell from the other domains' class-conditional feature distributions -- the
  multi-domain alignment a centralised DANN performs, from statistics rather than images. The coherence term
  couples this reversed gradient with g_cls as in the centralised case. Why moments: they are what
  feature-statistics sharing methods for federated DG already exchange (a d-dimensional mean and variance per
  class and domain, far less than images or per-sample features), class matching keeps the discriminator from
  separating domains by their label mix (the source domains are long-tailed differently), and a Gaussian sample
  carries the spread that a prototype alone lacks. Alternatives: ``shared_means`` uses the class means
  (prototypes) mu_{d',y} themselves; ``local`` is the centralised discriminator on the client's own features
  only (active only when a client holds two or more domains: layout (ii) with mixed domains, or centralised).
  The moments are one round old (the previous round's features) and absent in round 1, where a single-domain
  batch skips L_D and L_coh.
* ``adversarial="auto"``: on whenever the adversarial term is defined (``shared_*`` with two or more source domains;
  ``local`` when some client holds two or more domains), else off with a warning. ``on`` builds the discriminator
  in any case (a step whose discriminator batch holds a single domain skips the term), ``off`` disables it.
* ``qt`` default ``domain_heads`` per Appendix R section 5; the teacher variant of docs/reference.md 6.2 is an option.
* In federated layout (i) the cross-domain term works through federation: client d trains T_d on its own
  domain; the other clients receive it with the global model and use it frozen.
* The Hessian is taken w.r.t. the classifier head by default (``hessian_params="all"`` uses every trainable
  parameter); the eigenvalue cache per client and its EMA across rounds are [R].
* ``class_sam_max_classes`` groups the batch classes (mini-DomainNet, 126 classes) into at most that many
  SAM closures; a group's gamma is the mean of its classes' gammas.
* FedTAIL computes its gradients with ``torch.autograd.grad`` (double backward, HVPs), so ``16-mixed``
  precision (gradient scaler) is refused; use ``32-true`` or ``bf16-mixed``.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedlt.methods._dg import (
    DomainHeadReducer,
    aux_head_loss,
    batch_domains,
    dann_coefficient,
    domain_head_extras,
    domain_head_keys,
    entropy_regularization,
    make_discriminator,
    make_domain_heads,
)
from fedlt.methods._sam import frozen_bn_stats, perturbation, restore_, shift_
from fedlt.methods.base import METHODS, Reducer, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

__all__ = ["FedTAIL", "FedTAILReducer", "class_weights", "coherence_loss", "top_hessian_eigenvalue"]

_LAMBDA = "fedtail.lambda"
_QT = ("domain_heads", "global_teacher", "momentum_teacher")
_ADV_SOURCES = ("shared_stats", "shared_means", "local")
_MOMENTS = "dg_moments"  # (M, C, 2d + 1): per (domain, class) sum h, sum h^2 and the count
_COHERENCE = ("linear", "hinge", "cos")


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of tensors (at least one), left to right: the built-in ``sum`` without its ``0`` start."""
    return functools.reduce(operator.add, terms)


def coherence_loss(g_cls: list[Tensor], g_adv: list[Tensor], alpha: float, mode: str = "linear") -> Tensor:
    """Gradient-coherence penalty on the shared extractor (docs/reference.md 6.2 step 2).

    ``linear``: -alpha <g_cls, g_adv>; ``hinge``: alpha max(0, -<g_cls, g_adv>); ``cos``: -alpha cos(g_cls, g_adv).
    The gradients must carry their graphs (``create_graph=True``) for the penalty to be differentiable.
    """
    dot = _sum((a * b).sum() for a, b in zip(g_cls, g_adv))
    if mode == "linear":
        return -alpha * dot
    if mode == "hinge":
        return alpha * torch.relu(-dot)
    if mode == "cos":
        na = torch.sqrt(_sum((a * a).sum() for a in g_cls))
        nb = torch.sqrt(_sum((b * b).sum() for b in g_adv))
        return -alpha * dot / (na * nb + 1e-12)
    raise ValueError(f"unknown coherence mode {mode!r}; valid: {', '.join(_COHERENCE)}")


def top_hessian_eigenvalue(loss: Tensor, params: list[Tensor], iters: int = 10,
                           generator: torch.Generator | None = None) -> float:
    """Largest Hessian eigenvalue of ``loss`` w.r.t. ``params`` by power iteration on Hessian-vector products.

    Args:
        loss: a scalar with its graph.
        params: the parameters (all requiring gradients).
        iters: power-iteration steps.
        generator: CPU generator of the start vector.

    Returns:
        The Rayleigh quotient v^T H v of the last normalised iterate (the top eigenvalue for a PSD Hessian).
    """
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    norm = torch.sqrt(_sum((t * t).sum() for t in v))
    v = [t / norm for t in v]
    lam = 0.0
    for _ in range(max(1, iters)):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        lam = float(sum((h * t).sum() for h, t in zip(hv, v)))
        norm = torch.sqrt(_sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h.detach() / norm for h in hv]
    return lam


def class_weights(lambdas: Tensor, mode: str = "inverse", delta: float = 1e-3) -> Tensor:
    """gamma_c from the classes' top eigenvalues, normalised so that sum_c gamma_c = number of classes.

    ``inverse``: gamma_c ~ 1 / (lambda_c + delta) (flat classes weigh more); ``direct``: gamma_c ~ lambda_c + delta.
    """
    lam = lambdas.clamp_min(0.0)
    raw = 1.0 / (lam + delta) if mode == "inverse" else lam + delta
    if mode not in ("inverse", "direct"):
        raise ValueError(f"unknown gamma_mode {mode!r}; valid: inverse, direct")
    return raw * (raw.numel() / raw.sum())


class _GradSum(dict):
    """Parameter -> sum of the gradient contributions of one step (written to ``.grad`` before the step)."""

    def add(self, params: list[Tensor], grads, scale: float = 1.0) -> None:
        for p, g in zip(params, grads):
            if g is not None:
                g = g.detach() * scale
                self[p] = self[p] + g if p in self else g

    def to_grad(self) -> None:
        for p, g in self.items():
            p.grad = g


class _SharedMoments:
    """The broadcast per-(domain, class) feature moments, ready to sample class-matched features of other domains.

    Args:
        moments: (M, C, 2d + 1) sums of h, h^2 and the counts.
        min_count: cells with fewer features are unavailable.
    """

    def __init__(self, moments: Tensor, min_count: int) -> None:
        d = (moments.shape[-1] - 1) // 2
        count = moments[..., -1:]
        self.available = (count[..., 0] >= min_count).cpu()  # (M, C)
        safe = count.clamp_min(1.0)
        self.mean = moments[..., :d] / safe
        self.std = (moments[..., d : 2 * d] / safe - self.mean.square()).clamp_min(0.0).sqrt()

    @classmethod
    def of(cls, moments: Tensor | None, min_count: int) -> _SharedMoments | None:
        if moments is None or not bool((moments[..., -1] >= min_count).any()):
            return None
        return cls(moments, min_count)

    def sample(self, y: Tensor, dom: Tensor, gaussian: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """For every image with another source domain that has features of its class: one such domain d' (uniform)
        and a feature z ~ N(mu_{d',y}, diag sigma^2_{d',y}) (``gaussian``) or mu_{d',y}. Returns (z, d')."""
        y_cpu, dom_cpu = y.cpu(), dom.cpu()
        cand = self.available[:, y_cpu].t().clone()  # (B, M)
        cand[torch.arange(y_cpu.numel()), dom_cpu] = False
        rows = cand.any(1)
        if not bool(rows.any()):
            return self.mean.new_zeros(0, self.mean.shape[-1]), dom.new_zeros(0)
        pick = torch.multinomial(cand[rows].float(), 1, generator=generator).squeeze(1)
        cls = y_cpu[rows]
        mean = self.mean[pick.to(self.mean.device), cls.to(self.mean.device)]
        if gaussian:
            noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
            mean = mean + noise * self.std[pick.to(self.mean.device), cls.to(self.mean.device)]
        return mean, pick.to(dom.device)


class FedTAILReducer(DomainHeadReducer):
    """FedAvg (with per-domain head averaging when ``head_keys`` is given) plus FedTAIL's server state: the latest
    per-(domain, class) feature moments (a cell keeps its last value until a client of that domain and class
    uploads again) and the momentum teacher theta_T <- m theta_T + (1 - m) theta_global.

    Args:
        head_keys: per-domain head keys for :class:`~fedlt.methods._dg.DomainHeadReducer`'s averaging, or None.
        numel: elements of one domain's heads.
        moments: shape (M, C, 2d + 1) of the shared moments, or None.
        teacher_momentum: m of the momentum teacher, or None for none.
    """

    def __init__(self, head_keys: list[list[str]] | None, numel: int, moments: tuple[int, ...] | None,
                 teacher_momentum: float | None) -> None:
        extras: dict[str, tuple[int, ...]] = {}
        if head_keys:
            extras.update({"domain_heads": (len(head_keys), numel), "domain_weight": (len(head_keys),)})
        if moments is not None:
            extras[_MOMENTS] = tuple(moments)
        Reducer.__init__(self, extras)  # DomainHeadReducer's extras only when the heads are domain-weighted
        self.head_keys = head_keys or []
        self.moment_shape = moments
        self.teacher_momentum = teacher_momentum
        self.moments: Tensor | None = None
        self.teacher: dict[str, Tensor] = {}

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        if self.moment_shape is not None:
            self.moments = torch.zeros(self.moment_shape, device=device)
        if self.teacher_momentum is not None:
            self.teacher = {k: v.detach().clone() for k, v in global_state.items()}

    def server_step(self, round: int) -> None:
        if self.head_keys:
            super().server_step(round)
        else:
            Reducer.server_step(self, round)
        with torch.no_grad():
            if self.moments is not None:
                new = self.extras_sum[_MOMENTS].view(self.moments.shape)  # of shape moment_shape
                fresh = new[..., -1:] > 0
                self.moments.copy_(torch.where(fresh, new, self.moments))
            if self.teacher:
                m = self.teacher_momentum
                assert m is not None  # the teacher exists only with a momentum (setup)
                for k, v in self.teacher.items():
                    g = self.global_state[k]
                    if v.is_floating_point():
                        v.mul_(m).add_(g.to(v.dtype), alpha=1 - m)
                    else:
                        v.copy_(g)

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.moments is not None and bool((self.moments[..., -1] > 0).any()):
            out[_MOMENTS] = self.moments
        if self.teacher:
            out["teacher"] = self.teacher
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.moments is not None:
            out["moments"] = self.moments.detach().cpu().clone()
        if self.teacher:
            out["teacher"] = {k: v.detach().cpu().clone() for k, v in self.teacher.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            if self.moments is not None:
                self.moments.copy_(state["moments"])
            for k, v in state.get("teacher", {}).items():
                self.teacher[k].copy_(v)


@METHODS.register("fedtail")
class FedTAIL(FedAvg):
    """FedTAIL (reconstruction): class-wise SAM with curvature weights, sharpness-aware entropy regularisation,
    adversarial alignment with gradient coherence.

    Args:
        rho: class-wise SAM radius rho (docs/reference.md 6.2 step 3).
        class_sam: use the class-wise SAM term sum_c gamma_c L_c(w + eps_c).
        class_sam_weight: weight of the class-wise term (A-T4).
        class_sam_max_classes: at most this many class groups (SAM closures) per batch; ``None``: one per class.
        class_sam_reduction: ``mean`` (default) divides sum_c gamma_c L_c by the number of class groups, so the term
            is a class-balanced loss on the scale of L_cls; ``sum`` is the literal formula, whose gradient grows
            with the number of classes in the batch (x10 on a 10-class batch, which diverges at usual learning
            rates).
        gamma_target: ``loss`` (gamma_c weights the class loss, the literal formula) or ``perturbation``
            (gamma_c scales eps_c) -- ambiguity A-T1.
        gamma_mode: ``inverse`` (gamma_c ~ 1/(lambda_c + delta)) or ``direct`` (~ lambda_c + delta).
        gamma_delta: delta in gamma_c.
        hessian_params: ``head`` (lambda_c w.r.t. the classifier, default) or ``all`` trainable parameters.
        hessian_iters: power-iteration steps for lambda_c.
        hessian_samples: local images per class used to estimate lambda_c.
        hessian_refresh_steps: re-estimate lambda_c every this many local steps; ``None``: once per local epoch.
        hessian_ema: lambda_c <- ema * previous + (1 - ema) * new across rounds (per client); 0 disables.
        clean_loss_weight: weight of L_cls at the unperturbed weights.
        er_weight: weight of the sharpness-aware entropy term L_sharp-er (0 disables it).
        er_rho: SAM radius of the entropy term's global perturbation (``None``: ``rho``; 0: unperturbed).
        qt: ``domain_heads`` (DGviaER-style auxiliary heads, default) or ``global_teacher`` (KL to the received
            global model's prediction).
        er_cross_scale: DGviaER's scale of the cross-domain gradient into the extractor (0.05).
        er_adv_coeff: DGviaER's reversal coefficient of the per-domain adversarial heads T'_i (0.001).
        teacher_temperature: softmax temperature of Q_T in the ``global_teacher`` and ``momentum_teacher`` variants.
        teacher_momentum: m of the ``momentum_teacher`` EMA of the global models.
        aux_hidden: hidden width of the auxiliary heads and the discriminator (0: linear).
        aux_dropout: dropout of the auxiliary heads and the discriminator.
        aux_lr_scale: learning rate of the auxiliary heads relative to ``lr`` (DGviaER: 1e-4 / 1e-3).
        domain_head_aggregation: ``domain_weighted`` (average T_i over the holders of domain i) or ``fedavg``.
        warmup_rounds: rounds during which the adversarial and entropy weights are multiplied by 0.01 (DGviaER).
        adversarial: ``auto`` (on when the adversarial term is defined, see ``adv_source``), ``on`` (always built;
            a step without two domains to separate skips it) or ``off``.
        adv_source: what the discriminator sees besides the client's own features: ``shared_stats`` (default:
            class-matched Gaussian samples from the server-shared feature moments of the other source domains),
            ``shared_means`` (their class means) or ``local`` (nothing: own features only, which needs a client
            holding two or more domains).
        adv_min_count: a (domain, class) cell of the shared moments is used once it holds this many features.
        adv_weight: weight of L_adv.
        adv_coeff: maximum reversal coefficient kappa.
        adv_schedule: ``dann`` (kappa_p = kappa (2/(1+exp(-10p)) - 1)) or ``constant``.
        coherence: L_coh form: ``linear``, ``hinge`` or ``cos`` (A-T2).
        coherence_alpha: alpha (0 disables L_coh).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="FedTAIL: Federated Long-Tailed Domain Generalization with Sharpness-Guided Gradient Matching",
        venue="ICML 2025 Workshop (CFAgentic)",
        arxiv="2506.08518",
    )
    automatic_optimization = False

    def __init__(
        self,
        rho: float = 0.05,
        class_sam: bool = True,
        class_sam_weight: float = 1.0,
        class_sam_max_classes: int | None = None,
        class_sam_reduction: str = "mean",
        gamma_target: str = "loss",
        gamma_mode: str = "inverse",
        gamma_delta: float = 1e-3,
        hessian_params: str = "head",
        hessian_iters: int = 10,
        hessian_samples: int = 64,
        hessian_refresh_steps: int | None = None,
        hessian_ema: float = 0.5,
        clean_loss_weight: float = 1.0,
        er_weight: float = 1.0,
        er_rho: float | None = None,
        qt: str = "domain_heads",
        er_cross_scale: float = 0.05,
        er_adv_coeff: float = 0.001,
        teacher_temperature: float = 1.0,
        teacher_momentum: float = 0.9,
        aux_hidden: int = 256,
        aux_dropout: float = 0.5,
        aux_lr_scale: float = 0.1,
        domain_head_aggregation: str = "domain_weighted",
        warmup_rounds: int = 0,
        adversarial: str = "auto",
        adv_source: str = "shared_stats",
        adv_min_count: int = 2,
        adv_weight: float = 1.0,
        adv_coeff: float = 1.0,
        adv_schedule: str = "dann",
        coherence: str = "linear",
        coherence_alpha: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        checks = {
            "gamma_target": (gamma_target, ("loss", "perturbation")),
            "class_sam_reduction": (class_sam_reduction, ("mean", "sum")),
            "gamma_mode": (gamma_mode, ("inverse", "direct")),
            "hessian_params": (hessian_params, ("head", "all")),
            "qt": (qt, _QT),
            "domain_head_aggregation": (domain_head_aggregation, ("domain_weighted", "fedavg")),
            "adversarial": (adversarial, ("auto", "on", "off")),
            "adv_source": (adv_source, _ADV_SOURCES),
            "adv_schedule": (adv_schedule, ("dann", "constant")),
            "coherence": (coherence, _COHERENCE),
        }
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if rho < 0 or (er_rho is not None and er_rho < 0):
            raise ValueError("rho and er_rho must be >= 0")
        if not 0.0 <= teacher_momentum < 1.0:
            raise ValueError(f"teacher_momentum must be in [0, 1), got {teacher_momentum}")
        if adv_min_count < 1:
            raise ValueError(f"adv_min_count must be >= 1, got {adv_min_count}")
        if not 0.0 <= hessian_ema < 1.0:
            raise ValueError(f"hessian_ema must be in [0, 1), got {hessian_ema}")
        self.rho = rho
        self.class_sam = class_sam
        self.class_sam_weight = class_sam_weight
        self.class_sam_max_classes = class_sam_max_classes
        self.class_sam_reduction = class_sam_reduction
        self.gamma_target = gamma_target
        self.gamma_mode = gamma_mode
        self.gamma_delta = gamma_delta
        self.hessian_params = hessian_params
        self.hessian_iters = hessian_iters
        self.hessian_samples = hessian_samples
        self.hessian_refresh_steps = hessian_refresh_steps
        self.hessian_ema = hessian_ema
        self.clean_loss_weight = clean_loss_weight
        self.er_weight = er_weight
        self.er_rho = rho if er_rho is None else er_rho
        self.qt = qt
        self.er_cross_scale = er_cross_scale
        self.er_adv_coeff = er_adv_coeff
        self.teacher_temperature = teacher_temperature
        self.teacher_momentum = teacher_momentum
        self.aux_hidden = aux_hidden
        self.aux_dropout = aux_dropout
        self.aux_lr_scale = aux_lr_scale
        self.domain_head_aggregation = domain_head_aggregation
        self.warmup_rounds = warmup_rounds
        self.adversarial = adversarial
        self.adv_source = adv_source
        self.adv_min_count = adv_min_count
        self.adv_weight = adv_weight
        self.adv_coeff = adv_coeff
        self.adv_schedule = adv_schedule
        self.coherence = coherence
        self.coherence_alpha = coherence_alpha

    # -- wiring ----------------------------------------------------------------------------------------------
    @property
    def uses_domain_heads(self) -> bool:
        return self.er_weight > 0 and self.qt == "domain_heads"

    def setup(self, model, data, trainer) -> None:
        super().setup(model, data, trainer)
        if getattr(trainer, "scaler", None) is not None:
            raise ValueError("FedTAIL computes gradients with torch.autograd.grad (double backward, Hessian-vector "
                             "products); 16-mixed precision is not supported: use 32-true or bf16-mixed")
        self.num_domains = int(getattr(data, "num_domains", 1))
        counts = getattr(data, "client_domain_counts", None)
        if counts is None:
            counts = [[int(n)] for n in data.client_sizes]
        self._domain_counts = torch.as_tensor(counts, dtype=torch.float32)
        multi = bool(((self._domain_counts > 0).sum(1) >= 2).any())
        self.trained_domains = list(getattr(data, "source_domain_ids", [0]))
        shared = self.adv_source != "local"
        defined = (shared and len(self.trained_domains) >= 2) or multi
        self.adversarial_active = self.adversarial == "on" or (self.adversarial == "auto" and defined)
        if self.adversarial != "off" and not defined and (self.adv_weight > 0 or self.coherence_alpha > 0):
            reason = ("there is a single source domain" if shared else
                      "every client holds a single domain, so a local domain discriminator would see one label "
                      "(adv_source='shared_stats' aligns with the other domains' shared feature moments)")
            effect = ("the adversarial and coherence terms are off" if self.adversarial == "auto" else
                      "the discriminator is built but every step skips the adversarial and coherence terms")
            warnings.warn(f"{type(self).__name__}: {reason}; {effect} (docs/reference.md section 6, A-T3)",
                          RuntimeWarning, stacklevel=2)
        self.shares_moments = self.adversarial_active and shared
        d = model.num_features
        self._moment_shape = (self.num_domains, data.num_classes, 2 * d + 1)
        if self.adversarial_active:
            model.dg_disc = make_discriminator(d, self.num_domains, self.aux_hidden, self.aux_dropout)
        if self.uses_domain_heads:
            model.dg_aux = make_domain_heads(d, data.num_classes, self.num_domains, self.aux_hidden, self.aux_dropout)
            model.dg_adv = make_domain_heads(d, data.num_classes, self.num_domains, self.aux_hidden, self.aux_dropout)
        model.to(next(model.parameters()).device)
        named = dict(model.named_parameters())
        self._theta = [p for k, p in named.items() if not k.startswith(("head.", "dg_"))]
        self._phi = [p for k, p in named.items() if k.startswith("head.")]
        self._w = self._theta + self._phi
        self._psi = [p for k, p in named.items() if k.startswith("dg_disc.")]
        self._aux = [p for k, p in named.items() if k.startswith(("dg_aux.", "dg_adv."))]
        self._adv_heads = [p for k, p in named.items() if k.startswith("dg_adv.")]
        self._head_keys, self._head_numel = domain_head_keys(model, ("dg_aux", "dg_adv"), self.num_domains)
        self._has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    @property
    def _dg_disc(self) -> nn.Module:
        """The domain discriminator D_psi (``model.dg_disc``, added in :meth:`setup` when adversarial)."""
        return submodule(self.model, "dg_disc", nn.Module)

    @property
    def _dg_aux(self) -> nn.ModuleList:
        """The auxiliary domain heads T_d (``model.dg_aux``, added in :meth:`setup` with domain heads)."""
        return submodule(self.model, "dg_aux", nn.ModuleList)

    @property
    def _dg_adv(self) -> nn.ModuleList:
        """The adversarial domain heads T'_d (``model.dg_adv``, added in :meth:`setup` with domain heads)."""
        return submodule(self.model, "dg_adv", nn.ModuleList)

    def client_state_template(self) -> dict[str, Tensor]:
        return {_LAMBDA: torch.zeros(self.num_classes)} if self.class_sam and self.hessian_ema > 0 else {}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        main = torch.optim.SGD(self._w + self._psi, lr=self.current_lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)
        if not self._aux:
            return [main]
        aux = torch.optim.SGD(self._aux, lr=self.current_lr * self.aux_lr_scale, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        return [main, aux]

    @property
    def _domain_weighted(self) -> bool:
        return self.uses_domain_heads and self.domain_head_aggregation == "domain_weighted"

    def configure_reducer(self) -> Reducer:
        moments = self._moment_shape if self.shares_moments else None
        momentum = self.teacher_momentum if self.er_weight > 0 and self.qt == "momentum_teacher" else None
        if moments is None and momentum is None:
            return DomainHeadReducer(self._head_keys, self._head_numel) if self._domain_weighted else Reducer()
        return FedTAILReducer(self._head_keys if self._domain_weighted else None, self._head_numel, moments, momentum)

    # -- client ----------------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        n = int(ctx.num_samples)
        self._steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        steps = self.local_steps if self.local_steps is not None else self._steps_per_epoch * self.local_epochs
        self._steps_per_round = max(1, steps)
        self._step = 0
        self._ctx = ctx
        self._lambda = torch.zeros(self.num_classes, device=ctx.device)
        self._warm = 0.01 if ctx.round <= self.warmup_rounds else 1.0
        if self.shares_moments:
            self._moments = torch.zeros(self._moment_shape, device=ctx.device)
            self._shared = _SharedMoments.of(ctx.message.extras.get(_MOMENTS), self.adv_min_count)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        if self.class_sam and self.hessian_ema > 0:
            ctx.state[_LAMBDA] = self._lambda.detach().clone()
        extras = {}
        if self._domain_weighted:
            extras = domain_head_extras(self.model, self._head_keys, self._head_numel,
                                        self._domain_counts[ctx.client_id].to(ctx.device))
        if self.shares_moments:
            extras[_MOMENTS] = self._moments
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors,
                            extras=extras)

    def _kappa(self) -> float:
        if self.adv_schedule == "constant":
            return self.adv_coeff
        progress = ((self._ctx.round - 1) + self._step / self._steps_per_round) / max(1, self.run.rounds)
        return self.adv_coeff * dann_coefficient(progress)

    @torch.no_grad()
    def _class_samples(self, ctx: ClientContext) -> list[tuple[int, Tensor, Tensor]]:
        data = self.data
        idx = data.client_indices[ctx.client_id]
        labels = data.train.y[idx]
        out = []
        for c in torch.unique(labels).tolist():
            own = idx[labels == c]
            pick = own[torch.randperm(own.numel(), generator=ctx.generator)[: self.hessian_samples].to(own.device)]
            batch = data.get_batch(data.train, pick, None, train=False)
            out.append((c, batch[0], batch[1]))
        return out

    def _estimate_lambdas(self, ctx: ClientContext) -> None:
        """lambda_c for every local class (docs/reference.md 6.2 step 3), smoothed with the client's previous values."""
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        new = torch.zeros_like(self._lambda)
        for c, x, y in self._class_samples(ctx):
            if self.hessian_params == "head":
                with torch.no_grad():
                    h = self.model.forward_features(x)
                loss = F.cross_entropy(self.model.head(h), y)
                params = self._phi
            else:
                loss = F.cross_entropy(self.model(x), y)
                params = self._w
            new[c] = top_hessian_eigenvalue(loss, params, self.hessian_iters, gen)
        self.model.train(was_training)
        if self.hessian_ema > 0:
            prev = ctx.state.get(_LAMBDA)
            if prev is not None:
                prev = prev.to(new.device)
                new = torch.where((prev > 0) & (new > 0), self.hessian_ema * prev + (1 - self.hessian_ema) * new, new)
        self._lambda = new

    def _refresh_due(self) -> bool:
        every = self.hessian_refresh_steps or self._steps_per_epoch
        return self._step % every == 0

    def _class_groups(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Masks of the batch's class groups and each group's gamma."""
        classes = torch.unique(y)
        gammas = class_weights(self._lambda[classes], self.gamma_mode, self.gamma_delta)
        g = len(classes) if self.class_sam_max_classes is None else min(len(classes), self.class_sam_max_classes)
        chunks = torch.arange(len(classes), device=y.device).tensor_split(g)
        masks = [torch.isin(y, classes[ch]) for ch in chunks]
        return masks, torch.stack([gammas[ch].mean() for ch in chunks])

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        dom = batch_domains(batch)
        if self.class_sam and self._refresh_due():
            self._estimate_lambdas(ctx)
        self._step += 1
        w = self._w
        acc = _GradSum()
        add = acc.add
        # 1. clean pass at w.
        h = self.model.forward_features(x)
        logits = self.model.head(h)
        adv_batch = self._adversarial_batch(h, y, dom, ctx) if self.adversarial_active else None
        coh_on = adv_batch is not None and self.coherence_alpha > 0
        l_cls = self.loss(logits, y, ctx.class_counts, ctx.round)
        g_cls = torch.autograd.grad(l_cls, w, retain_graph=True, create_graph=coh_on, allow_unused=True)
        add(w, g_cls, self.clean_loss_weight)
        parts = {"loss": l_cls.detach()}
        if self.shares_moments:
            self._accumulate_moments(h.detach(), y, dom)
        if adv_batch is not None:
            parts.update(self._adversarial(*adv_batch, g_cls, coh_on, add))
        # Everything that needs the clean graph comes before the in-place perturbations of w (which would bump the
        # version counters of tensors that graph saved): the class gradients g_c, the unperturbed entropy term and
        # the auxiliary heads (DGviaER: each T_d learns on the detached clean features of its domain).
        if self.class_sam:
            masks, gammas = self._class_groups(y)
            g_classes = [torch.autograd.grad(F.cross_entropy(logits[m], y[m]), w, retain_graph=True,
                                             allow_unused=True) for m in masks]
        if self.er_weight > 0 and self.er_rho == 0:
            parts["er"] = self._sharp_er(x, y, dom, h, g_cls, ctx, add)
        if self.uses_domain_heads:
            l_aux = aux_head_loss(self._dg_aux, h, y, dom, self.num_classes)
            add(self._aux, torch.autograd.grad(l_aux, self._aux, allow_unused=True))
            parts["aux"] = l_aux.detach()
        del logits, h
        # 3. class-wise SAM.
        if self.class_sam:
            parts["csam"] = self._class_sam(x, y, masks, gammas, g_classes, add)
        # 4. sharpness-aware entropy regularisation at w + eps.
        if self.er_weight > 0 and self.er_rho > 0:
            parts["er"] = self._sharp_er(x, y, dom, None, g_cls, ctx, add)
        # 5. one step on the accumulated gradient.
        acc.to_grad()
        last = len(self._optimizers) - 1
        for i, opt in enumerate(self._optimizers):
            self.trainer.step(opt, self.grad_clip, update_scaler=i == last)
        return StepOutput(loss=None, parts=parts)

    def _adversarial_batch(self, h: Tensor, y: Tensor, dom: Tensor, ctx: ClientContext) -> tuple[Tensor, Tensor] | None:
        """The discriminator's inputs and domain labels: the clean features, plus (``shared_*``) one class-matched
        sample of another source domain per image; ``None`` when they hold a single domain (nothing to separate,
        e.g. round 1 before any moments were shared)."""
        feats, labels = h, dom
        if self.shares_moments and self._shared is not None:
            z, d_z = self._shared.sample(y, dom, self.adv_source == "shared_stats", ctx.generator)
            if z.shape[0]:
                feats, labels = torch.cat([h, z.to(h.device, h.dtype)]), torch.cat([dom, d_z.to(dom.device)])
        if not bool((labels != labels[0]).any()):
            return None
        return feats, labels

    def _accumulate_moments(self, h: Tensor, y: Tensor, dom: Tensor) -> None:
        """Adds this batch's clean features to the client's per-(domain, class) sums of h, h^2 and the count."""
        cell = dom * self.num_classes + y
        rows = torch.cat([h.float(), h.float().square(), torch.ones_like(h[:, :1]).float()], dim=1)
        self._moments.view(-1, rows.shape[1]).index_add_(0, cell, rows)

    def _adversarial(self, feats: Tensor, labels: Tensor, g_cls, coh_on: bool, add) -> dict[str, Tensor]:
        """L_adv with the reversed extractor gradient (step 1) and the coherence penalty (step 2) on the clean graph.

        ``feats`` are the clean features (with the extractor's graph), followed by the shared samples (constants)."""
        theta = self._theta
        # The extractor's reversed gradient -kappa grad_theta L_D is formed explicitly rather than by a GRL inside the
        # graph: under create_graph a GRL would also reverse (and scale) the second-order path through the features,
        # and the coherence update would not be the gradient of L_coh (same first-order step).
        l_d = F.cross_entropy(self._dg_disc(feats), labels)
        weight = self.adv_weight * self._warm
        g_d = torch.autograd.grad(weight * l_d, theta + self._psi, retain_graph=True, create_graph=coh_on,
                                  allow_unused=True)
        kappa = self._kappa()
        g_adv = [None if g is None else -kappa * g for g in g_d[: len(theta)]] + list(g_d[len(theta) :])
        add(theta + self._psi, g_adv)
        parts = {"adv": l_d.detach()}
        if coh_on:  # coherence between the task and the (reversed) adversarial gradients on the extractor
            pairs = [(a, b) for a, b in zip(g_cls[: len(theta)], g_adv[: len(theta)])
                     if a is not None and b is not None]
            l_coh = coherence_loss([a for a, _ in pairs], [b for _, b in pairs], self.coherence_alpha, self.coherence)
            if l_coh.requires_grad:
                add(self._w, torch.autograd.grad(l_coh, self._w, retain_graph=True, allow_unused=True))
            parts["coh"] = l_coh.detach()
        return parts

    def _class_sam(self, x: Tensor, y: Tensor, masks: list[Tensor], gammas: Tensor, g_classes: list, add) -> Tensor:
        """sum_c gamma_c grad L_c(w + eps_c), eps_c = rho g_c / ||g_c|| (docs/reference.md 6.2 step 3).

        ``g_classes`` are the class gradients g_c at w, one per group mask."""
        w = self._w
        total = torch.zeros((), device=y.device)
        norm = len(masks) if self.class_sam_reduction == "mean" else 1
        for mask, gamma, g_c in zip(masks, gammas.tolist(), g_classes):
            radius = self.rho * (gamma if self.gamma_target == "perturbation" else 1.0)
            eps = perturbation(w, g_c, radius)
            shift_(w, eps)
            with frozen_bn_stats(self.model):  # backward inside: BatchNorm's backward reads the running stats
                # With BatchNorm the whole batch is forwarded (the clean pass's batch statistics, and no single-image
                # batch for a one-sample class); without it, the class's images alone give the same loss, cheaper.
                out = self.model(x)[mask] if self._has_bn else self.model(x[mask])
                l_c = F.cross_entropy(out, y[mask])
                grads = torch.autograd.grad(l_c, w, allow_unused=True)
            restore_(w, eps)
            weight = self.class_sam_weight * (gamma if self.gamma_target == "loss" else 1.0) / norm
            add(w, grads, weight)
            total = total + weight * l_c.detach()
        return total

    def _sharp_er(self, x: Tensor, y: Tensor, dom: Tensor, h: Tensor | None, g_cls, ctx: ClientContext,
                  add) -> Tensor:
        """lambda_er L_sharp-er evaluated at the global SAM point w + eps (docs/reference.md 6.2 step 4); with
        ``er_rho = 0`` at w itself, on the clean features ``h``."""
        w = self._w
        eps = perturbation(w, g_cls, self.er_rho) if self.er_rho > 0 else None
        if eps is not None:
            shift_(w, eps)
        targets = w + (self._adv_heads if self.uses_domain_heads else [])
        with frozen_bn_stats(self.model):
            feats = self.model.forward_features(x) if eps is not None else h
            assert feats is not None  # h is given when er_rho = 0 (no perturbation)
            if self.qt == "domain_heads":
                cross, adv = entropy_regularization(self._dg_aux, self._dg_adv, feats, y, dom,
                                                    self.trained_domains, self.num_classes, self.er_cross_scale,
                                                    self.er_adv_coeff)
                loss = cross + adv
            else:
                loss = self._teacher_kl(x, self.model.head(feats), ctx)
            scale = self.er_weight * self._warm
            grads = torch.autograd.grad(scale * loss, targets, retain_graph=eps is None, allow_unused=True)
        if eps is not None:
            restore_(w, eps)
        add(targets, grads)
        return loss.detach()

    def _teacher_kl(self, x: Tensor, logits: Tensor, ctx: ClientContext) -> Tensor:
        """KL(Q_T || p) with Q_T the (eval-mode) prediction of the received global model, or of the server's
        momentum ensemble (``qt="momentum_teacher"``)."""
        state = ctx.message.extras["teacher"] if self.qt == "momentum_teacher" else ctx.message.state
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            params = {k: v for k, v in state.items()}
            teacher = functional_call(self.model, params, (x,), strict=False)
        self.model.train(was_training)
        t = self.teacher_temperature
        q = F.softmax(teacher / t, dim=1)
        return F.kl_div(F.log_softmax(logits / t, dim=1), q, reduction="batchmean")
