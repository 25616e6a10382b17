"""FedLoGe.

Paper: Z. Xiao, Z. Chen, L. Liu, Y. Feng, J. Wu, W. Liu, J. T. Zhou, H. H. Yang, Z. Liu, "FedLoGe: Joint Local and
Generic Federated Learning under Long-tailed Data", ICLR 2024, arXiv:2401.08977 (official code:
ZackZikaiXiao/FedLoGe). Implemented from docs/reference.md section 2; every paper-vs-code choice of section 2.6
and section 8 rows 1-6 is a constructor argument.

Model: backbone f_theta (features h in R^d) and three linear classifiers on h:
- the **SSE-C** psi_S (C x d, buffer ``sse.weight``): a static sparse simplex ETF built once before round 1 (below),
  identical on every rank, never trained, never averaged (held bit-for-bit by the reducer);
- the **auxiliary global head** psi = ``head`` (weight and bias), trained on detached features and FedAvg-aggregated;
- the **local head** phi_k = ``l_head`` (weight and bias), trained on detached features, kept per client in the
  ClientStateStore, never uploaded.

SSE-C construction (server, once): orthonormal P (d x C, QR of a random d x C matrix: Gaussian by default,
uniform on [0, 1) with ``etf_basis="uniform"`` as in the official code), dense simplex ETF
M = sqrt(C/(C-1)) P (I - 11^T/C); a uniformly random ``floor(beta d C)`` of ALL entries of M are zeroed (global
mask S); the non-zero entries are then optimised with Adam (``sse_lr`` 1e-4, ``sse_steps`` 10,000, full batch) on
L = sum_c (||w_c|| - gamma)^2 - (1/C) sum_c arccos(max_{j != c} <w_c/||w_c||, w_j/||w_j||>) (argument clamped to
+-(1 - 1e-5)); the gradient is multiplied by S so the zeros stay exactly zero. psi_S = W^T.

Client (round t): three fresh SGD optimizers (lr, momentum, weight decay of the method; momentum never crosses
rounds) over theta, psi and phi_k. Per mini-batch, as in the official code: h = f_theta(x);
(1) L_theta = loss(psi_S h, y) -> step theta; (2) L_psi = CE(psi h_bar, y) -> step psi; (3) L_phi = CE(phi_k h_bar, y)
-> step phi_k, with h_bar = stop_gradient(h) from the pre-update backbone. Upload theta (with BN statistics) and
psi, weighted by n_k. Server: FedAvg of theta and psi; psi_S unchanged; phi_k of absent clients unchanged.

Realignment (pure functions of the current heads):
- GA-FR (GM): psi'_c = ``ga_fr_scale`` psi_c / ||psi_c||, the bias b_psi kept; GM logits psi' h + b_psi.
- LA-FR (PM): phi'_{k,c} = src_c ||phi_{k,c}|| with src = psi' (``la_fr_source="ga_fr_psi"``, default: Algorithm 1
  runs GA-FR before LA-FR) or raw psi (``"raw_psi"``, the code), bias b_psi; PM logits phi'_k(h)
  (``pm_logits="realigned_only"``, default: Algorithm 1 returns the realigned local head) or phi_k(h) + phi'_k(h)
  (``"local_plus_realigned"``, the code and its README). Optional fine-tuning of phi'_k with theta
  frozen (``la_fr_finetune_epochs``, Algorithm 1 line 12; 0 in the code and by default).
- Absent-class masking of PM (code trick, docs/reference.md 1.5) is the data protocol flag
  ``data.mask_absent_classes`` (set in the paper-table configs), applied by the evaluator to any method.

Hyperparameters (paper symbol, default): ``beta`` (beta, sparsity ratio, 0.6), ``gamma`` (gamma, target column norm,
1.0 = paper CIFAR; 1.6 ImageNet/iNat; the code hard-codes 0.1), ``sse_steps`` (10,000), ``sse_lr`` (1e-4),
``sse_bias`` (``"none"`` paper; ``"random_frozen"`` mimics the code's untrained default-initialised bias),
``ga_fr_scale`` (1.0 paper; 1.7 code), ``la_fr_source`` (``ga_fr_psi`` paper; ``raw_psi`` code), ``pm_logits``
(``realigned_only`` paper; ``local_plus_realigned`` code), ``la_fr_finetune_epochs`` (0), ``gm_head`` (``ga_fr``;
``sse`` = the universal model psi_S h; ``aux`` = psi h without realignment), ``pm_head`` (``la_fr``; ``unrealigned``
= psi h + phi_k h, what the code logs during training), ``realign`` (``every_eval``: every evaluation uses
``gm_head``/``pm_head``, so the last evaluated round equals the paper's post-training numbers; ``post_training``:
evaluations during training log like the code (GM = SSE-C, PM = unrealigned sum) and one extra evaluation after
training applies the realignment; it is stored under ``post_training`` in final.json). Local training (code): lr
0.03, momentum 0.5, batch 8, E 5.

Released code (``FedLoGe.released_code``; docs/paper_vs_code.md; the ``configs/paper/fedloge_*.yaml`` files set
it): ``etf_basis="uniform"``: the paper's P is a random orthogonal matrix; the code takes the Q factor of a
U[0, 1) matrix (numpy's ``random.random``), fedlt's default that of a Gaussian one. Both give an orthonormal P and
a simplex ETF; the uniform draw has a non-zero mean, so the first column of its P has all entries of one sign.
``gamma=0.1``: the code's SSE-C objective pulls the column norms to 0.1 (the paper: 1.0 on CIFAR).
``sse_bias="random_frozen"``: the code's SSE-C head keeps nn.Linear's initial bias, never trained.
``ga_fr_scale=1.7``: the code's GA-FR rescales the rows of psi to norm 1.7 (the paper: unit norm).
``la_fr_source="raw_psi"``: the code's LA-FR takes its directions from psi before GA-FR (the paper's Algorithm 1
realigns after GA-FR). ``pm_logits="local_plus_realigned"``: the code's PM adds the local head's logits to the
realigned head's (the paper's PM is the realigned local head alone).

Deviations / reconstructed choices: the ``loss`` argument applies to L_theta only (cross-entropy by default, as in
the paper); the auxiliary and local heads always use cross-entropy. Every client's local head starts from the same
initial draw (the code initialises the K heads independently); the heads are independent of psi's initialisation.
The backbone's unused linear classifier and projection of the code's ResNets do not exist in fedlt.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.sharding import seeded_generator
from fedlt.methods._finetune import FrozenKeysReducer, client_features, finetune, trainable_only
from fedlt.methods.base import METHODS, Reducer, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.methods.fedetf import ETF_BASES, simplex_etf
from fedlt.types import ClientContext, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

_SSE = "sse."
_LOCAL = "l_head."
_CHOICES = {
    "sse_bias": ("none", "random_frozen"),
    "la_fr_source": ("raw_psi", "ga_fr_psi"),
    "pm_logits": ("local_plus_realigned", "realigned_only"),
    "gm_head": ("ga_fr", "sse", "aux"),
    "pm_head": ("la_fr", "unrealigned"),
    "realign": ("every_eval", "post_training"),
    "etf_basis": ETF_BASES,
}


def sparsity_mask(dim: int, num_classes: int, beta: float, generator: torch.Generator) -> Tensor:
    """The SSE-C mask S (dim x C): exactly ``floor(beta * dim * C)`` of all entries are 0, chosen uniformly."""
    total = dim * num_classes
    zeros = int(math.floor(beta * total))
    mask = torch.ones(total)
    mask[torch.randperm(total, generator=generator)[:zeros]] = 0.0
    return mask.view(dim, num_classes)


def sse_loss(w: Tensor, gamma: float) -> Tensor:
    """FedLoGe's SSE-C objective on the columns w_c of ``w`` (dim x C): norm term minus mean max-min angle."""
    norms = w.norm(dim=0)
    unit = w / norms.clamp_min(1e-12)
    cos = unit.t() @ unit
    cos = cos - 3.0 * torch.eye(cos.shape[0], dtype=cos.dtype, device=cos.device)  # exclude j == c from the max
    nearest = cos.max(dim=1).values.clamp(-1.0 + 1e-5, 1.0 - 1e-5)
    return (norms - gamma).pow(2).sum() - torch.arccos(nearest).mean()


def build_sse_c(dim: int, num_classes: int, beta: float = 0.6, gamma: float = 1.0, steps: int = 10_000,
                lr: float = 1e-4, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", basis: str = "gaussian") -> tuple[Tensor, Tensor]:
    """The sparse simplex-ETF classifier (docs/reference.md 2.2).

    Args:
        dim: feature dimension d (>= C).
        num_classes: C.
        beta: fraction of all d*C entries set to zero.
        gamma: target column norm.
        steps: Adam steps on the non-zero entries.
        lr: Adam learning rate.
        generator: CPU generator for the ETF basis and the mask.
        device: where the optimisation runs.
        basis: the random matrix whose QR gives P: ``"gaussian"`` or ``"uniform"`` (U[0, 1), the official code).

    Returns:
        (W (dim x C) after optimisation, mask S (dim x C)); W is exactly zero where S is zero.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"SSE-C sparsity beta must be in [0, 1), got {beta}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dense = simplex_etf(num_classes, dim, gen, basis)
    mask = sparsity_mask(dim, num_classes, beta, gen)
    w = (dense * mask).to(device).requires_grad_(True)
    mask = mask.to(device)
    if steps > 0:
        opt = torch.optim.Adam([w], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=False)
                sse_loss(w, gamma).backward()
                assert w.grad is not None  # w is a leaf that requires grad
                w.grad.mul_(mask)
                opt.step()
    return w.detach(), mask


def ga_fr(weight: Tensor, scale: float = 1.0) -> Tensor:
    """GA-FR: every row of the global head rescaled to norm ``scale``."""
    return scale * weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def la_fr(source: Tensor, local_weight: Tensor) -> Tensor:
    """LA-FR: phi'_c = source_c * ||phi_c|| (direction of the global head, norm of the local head)."""
    return source * local_weight.norm(dim=1, keepdim=True)


class SSEClassifier(nn.Module):
    """psi_S as buffers (never trained): logits = h W^T (+ a frozen random bias with ``sse_bias="random_frozen"``)."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight, self.bias)


@METHODS.register("fedloge")
class FedLoGe(FedAvg):
    """Backbone on a static sparse ETF (SSE-C), global and local heads on detached features, GA-FR/LA-FR.

    Args:
        beta: SSE-C sparsity ratio (fraction of zeroed entries).
        gamma: SSE-C target column norm (paper 1.0 on CIFAR, 1.6 on ImageNet-LT/iNat; code 0.1).
        sse_steps: Adam steps of the SSE-C optimisation.
        sse_lr: Adam learning rate of the SSE-C optimisation.
        sse_bias: ``none`` (paper) or ``random_frozen`` (code artefact: U(+-1/sqrt(d)), never trained).
        ga_fr_scale: GA-FR row norm (1.0 paper, 1.7 code).
        la_fr_source: ``ga_fr_psi`` (paper, Algorithm 1 order) or ``raw_psi`` (code) as the LA-FR direction source.
        pm_logits: ``realigned_only`` (paper) or ``local_plus_realigned`` (code).
        la_fr_finetune_epochs: epochs fine-tuning phi'_k with the backbone frozen before PM inference.
        gm_head: GM classifier: ``ga_fr``, ``sse`` (universal model) or ``aux`` (psi, no realignment).
        pm_head: PM classifier: ``la_fr`` or ``unrealigned`` (psi h + phi_k h).
        realign: ``every_eval`` or ``post_training`` (see the module docstring).
        etf_basis: the random matrix whose QR gives the SSE-C's orthonormal P: ``gaussian`` (paper) or
            ``uniform`` (U[0, 1), the official code).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`; its ``loss`` is the
            backbone's loss on the SSE-C logits (default cross-entropy).
    """

    paper = PaperRef(
        title="FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data",
        venue="ICLR 2024",
        arxiv="2401.08977",
    )
    automatic_optimization = False
    personal_prefixes = (_LOCAL,)
    # The official code's values (github ZackZikaiXiao/FedLoGe, util/etf_methods.py).
    released_code: ClassVar[dict[str, Any]] = {"etf_basis": "uniform", "gamma": 0.1, "sse_bias": "random_frozen",
                                               "ga_fr_scale": 1.7, "la_fr_source": "raw_psi",
                                               "pm_logits": "local_plus_realigned"}

    def __init__(self, beta: float = 0.6, gamma: float = 1.0, sse_steps: int = 10_000, sse_lr: float = 1e-4,
                 sse_bias: str = "none", ga_fr_scale: float = 1.0, la_fr_source: str = "ga_fr_psi",
                 pm_logits: str = "realigned_only", la_fr_finetune_epochs: int = 0, gm_head: str = "ga_fr",
                 pm_head: str = "la_fr", realign: str = "every_eval", etf_basis: str = "gaussian",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        chosen = {"sse_bias": sse_bias, "la_fr_source": la_fr_source, "pm_logits": pm_logits, "gm_head": gm_head,
                  "pm_head": pm_head, "realign": realign, "etf_basis": etf_basis}
        for name, value in chosen.items():
            if value not in _CHOICES[name]:
                raise ValueError(f"{name} must be one of {list(_CHOICES[name])}, got {value!r}")
        if not 0.0 <= beta < 1.0 or gamma <= 0 or sse_steps < 0 or sse_lr <= 0 or ga_fr_scale <= 0:
            raise ValueError("FedLoGe needs 0 <= beta < 1, gamma > 0, sse_steps >= 0, sse_lr > 0, ga_fr_scale > 0")
        if la_fr_finetune_epochs < 0:
            raise ValueError(f"la_fr_finetune_epochs must be >= 0, got {la_fr_finetune_epochs}")
        self.beta, self.gamma, self.sse_steps, self.sse_lr = beta, gamma, sse_steps, sse_lr
        self.sse_bias, self.ga_fr_scale, self.la_fr_source = sse_bias, ga_fr_scale, la_fr_source
        # ``pm_logits_mode``: the name ``pm_logits`` is FedMethod's PM-logits hook.
        self.pm_logits_mode, self.la_fr_finetune_epochs = pm_logits, la_fr_finetune_epochs
        self.gm_head, self.pm_head, self.realign = gm_head, pm_head, realign
        self.etf_basis = etf_basis
        self.realigned = realign == "every_eval"
        self._pm_cache: tuple[int, Tensor, Tensor] | None = None

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or head.bias is None:
            raise ValueError("FedLoGe needs a backbone whose classifier ``head`` is an nn.Linear with bias")
        device, d, c = head.weight.device, self.model.num_features, self.num_classes
        if d < c:
            raise ValueError(f"FedLoGe's SSE-C needs feature dimension d >= C, got d={d}, C={c}")
        gen = seeded_generator(self.run.seed, "fedloge-sse-c")
        w, _ = build_sse_c(d, c, self.beta, self.gamma, self.sse_steps, self.sse_lr, gen, device, self.etf_basis)
        bias = None
        if self.sse_bias == "random_frozen":
            bound = 1.0 / math.sqrt(d)
            bias = (torch.rand(c, generator=gen) * 2 * bound - bound).to(device)
        weight = w.t().contiguous()
        comm = self.run.comm
        if comm.distributed:  # GPU optimisation may differ in the last bits per rank
            weight = comm.broadcast(weight.cpu(), src=0).to(device)
            bias = comm.broadcast(bias.cpu(), src=0).to(device) if bias is not None else None
        model.sse = SSEClassifier(weight, bias)
        # The local head: nn.Linear's default init from a seeded generator (no global RNG; same on every rank).
        local = nn.utils.skip_init(nn.Linear, d, c, device=device, dtype=head.weight.dtype)
        lgen = seeded_generator(self.run.seed, "fedloge-local-head")
        with torch.no_grad():
            local.weight.copy_(nn.init.kaiming_uniform_(torch.empty(c, d), a=math.sqrt(5), generator=lgen))
            local.bias.copy_(torch.rand(c, generator=lgen) * 2 / math.sqrt(d) - 1 / math.sqrt(d))
        model.l_head = local

    @property
    def _psi(self) -> nn.Linear:
        """psi, the global head (``model.head``, an ``nn.Linear`` with bias: checked in :meth:`setup`)."""
        return submodule(self.model, "head", nn.Linear)

    @property
    def _sse(self) -> SSEClassifier:
        """psi_S, the SSE-C (``model.sse``, added in :meth:`setup`)."""
        return submodule(self.model, "sse", SSEClassifier)

    @property
    def _phi(self) -> nn.Linear:
        """phi_k, the local head (``model.l_head``, added in :meth:`setup`)."""
        return submodule(self.model, "l_head", nn.Linear)

    def configure_reducer(self) -> Reducer:
        return FrozenKeysReducer(lambda key: key.startswith(_SSE))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[backbone theta, global head psi, local head phi_k], fresh every round."""
        psi, phi = self._psi, self._phi
        heads = {id(p) for p in psi.parameters()} | {id(p) for p in phi.parameters()}
        body = [p for p in self.model.parameters() if p.requires_grad and id(p) not in heads]
        return [self._sgd(body), self._sgd(psi.parameters()), self._sgd(phi.parameters())]

    def _sgd(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(params), lr=self.current_lr, momentum=self.momentum, weight_decay=self.weight_decay)

    # -- client ----------------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        opt_theta, opt_psi, opt_phi = self._optimizers
        model = self.model
        h = model.forward_features(x)
        loss_theta = self.loss(self._sse(h), y, ctx.class_counts, ctx.round)
        self.trainer.backward(loss_theta)
        self.trainer.step(opt_theta, self.grad_clip, update_scaler=False)
        h_bar = h.detach()  # features of the pre-update backbone (one forward pass per batch, as in the code)
        loss_psi = F.cross_entropy(model.head(h_bar), y)
        self.trainer.backward(loss_psi)
        self.trainer.step(opt_psi, self.grad_clip, update_scaler=False)
        loss_phi = F.cross_entropy(self._phi(h_bar), y)
        self.trainer.backward(loss_phi)
        self.trainer.step(opt_phi, self.grad_clip)
        parts = {"backbone": loss_theta.detach(), "global_head": loss_psi.detach(), "local_head": loss_phi.detach()}
        total = parts["backbone"] + parts["global_head"] + parts["local_head"]
        return StepOutput(loss=None, parts={"loss": total, **parts})

    # -- inference -------------------------------------------------------------------------------------------
    def on_fit_end(self, simulator: Any) -> bool:
        """With ``realign="post_training"``: switch to the realigned heads and ask for one more evaluation."""
        if self.realigned:
            return False
        self.realigned = True
        return True

    def global_logits(self, h: Tensor, head: str | None = None) -> Tensor:
        """GM logits of features ``h`` with ``head`` (default: the configured GM head, or SSE-C before a
        post-training realignment)."""
        head = head or (self.gm_head if self.realigned else "sse")
        psi = self._psi
        if head == "sse":
            return self._sse(h)
        if head == "aux":
            return psi(h)
        return F.linear(h, ga_fr(psi.weight, self.ga_fr_scale), psi.bias)

    def predict_global(self, x: Tensor) -> Tensor:
        return self.global_logits(self.model.forward_features(x))

    def realigned_local_head(self) -> tuple[Tensor, Tensor]:
        """(phi'_k weight, bias) of the client whose local head is in the workspace (LA-FR)."""
        psi = self._psi
        source = psi.weight if self.la_fr_source == "raw_psi" else ga_fr(psi.weight, self.ga_fr_scale)
        return la_fr(source, self._phi.weight), psi.bias

    def _personal_logits(self, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        realigned = F.linear(h, weight, bias)
        return realigned + self._phi(h) if self.pm_logits_mode == "local_plus_realigned" else realigned

    @property
    def _use_la_fr(self) -> bool:
        return self.realigned and self.pm_head == "la_fr"

    def prepare_personal(self, client_id: int) -> None:
        """LA-FR for the client in the workspace, then the optional fine-tuning of phi'_k (backbone frozen)."""
        self._pm_cache = None
        if not self._use_la_fr:
            return
        weight, bias = (t.detach().clone() for t in self.realigned_local_head())
        if self.la_fr_finetune_epochs > 0:

            def loss_fn(h: Tensor, y: Tensor) -> Tensor:
                return F.cross_entropy(self._personal_logits(h, weight, bias), y)

            cached = client_features(self, client_id)
            gen = seeded_generator(self.run.seed, "fedloge-la-fr", client_id)
            with trainable_only(self.model, [weight, bias]) as params:
                finetune(self, client_id, params, loss_fn, self.la_fr_finetune_epochs, self.lr, gen, self.momentum,
                         self.weight_decay, cached=cached)
        self._pm_cache = (client_id, weight.detach(), bias.detach())

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        h = self.model.forward_features(x)
        if not self._use_la_fr:
            return self.model.head(h) + self._phi(h)
        if self._pm_cache is None or self._pm_cache[0] != client_id:
            self.prepare_personal(client_id)
        assert self._pm_cache is not None  # set by prepare_personal (LA-FR is in use)
        _, weight, bias = self._pm_cache
        return self._personal_logits(h, weight.to(h.dtype), bias.to(h.dtype))

    # -- checkpoint ------------------------------------------------------------------------------------------
    def server_state_dict(self) -> dict[str, Any]:
        return {"realigned": self.realigned}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        self.realigned = bool(state.get("realigned", self.realign == "every_eval"))
