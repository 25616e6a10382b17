"""FedPuReL: gradient Purification (Stage 1) + Residual Learning (Stage 2) on a frozen CLIP.

Paper: "Fine-tuning Impairs the Balancedness of Foundation Models in Long-tailed Personalized Federated Learning",
CVPR 2026, arXiv:2605.02247 (the id given by pith.science/paper/2605.02247). Official code: github
shihaohou/FedPuReL. Spec: docs/reference.md section 4 (paper [paper] vs official code [code]).

Model: a frozen CLIP (``model.name: clip:<open_clip model>``, text head) with two PEFT branches of the model's kind
(``model.kwargs.peft``: ``prompt`` = CoOp context, ``lora`` = image-tower q/k/v LoRA, ``adapter`` = CLIP-Adapter,
``attention_adapter`` = FedCLIP's attention adapter, the adapter of the official code):
the global branch phi_g (``peft.global.*``, aggregated) and the personal residual branch phi_k
(``peft.personal.*``, added in :meth:`FedPuReL.setup`, kept per client and never uploaded; every client starts from
the same seeded initialisation). Logits: l_G(x) = CLIP(x; phi_g), l_P^k(x) = CLIP(x; phi_k), and the zero-shot
teacher z(x) (no PEFT, hand-crafted template text features).

Client, Stage 1 (every local step, docs/reference.md 4.3): student f = l_G(x), teacher z = z(x) (no grad);
L_task = CE(f, y) (the configured ``loss``), L_align = TKL(f, z) (``fedlt.methods._tkl``: per-sample bisection of
the temperatures that give both tempered softmaxes the mean entropy H*; teacher-first KL, tau_f constant, gradient
through f only; the code's adapter variant uses the soft cross-entropy at T = 1 instead: ``adapter_alignment``).
g_align = grad_{phi_g} L_align and g_task = grad_{phi_g} L_task (two ``torch.autograd.grad`` calls
on one graph); purification g~ = g_task - lambda_proj <g_task, g_align> / ||g_align||^2 g_align where
<g_task, g_align> < 0 (else g~ = g_task exactly), per parameter tensor [code] or over the concatenated vector
[paper]; the code tests the cosine, whose sign is the inner product's. The step uses g~ only (g_align is a direction
constraint, never added [code]); SGD lr 1e-3, momentum 0.9, weight decay 5e-4 (Dassl defaults [code]).
Server (4.4): sample-weighted FedAvg of phi_g only (the reducer's state holds exactly the ``peft.global.*``
tensors). Every round trains the engine's uniform cohort (trainer.clients_per_round, floor(q K) in the paper's
notation); ``full_first_round=True`` trains every client in round 1 [code].
Stage 2 (4.5): phi_k minimises L_k = (1 - lambda) CE(l_G + l_P^k, y) + lambda CE(l_P^k, y), with l_G computed with
phi_g frozen (no grad, eval mode); plain SGD lr 1e-3 without momentum or weight decay, a fresh optimizer [code].
``stage2="post_hoc"`` [paper text, default]: after the last round every client trains phi_k for ``stage2_epochs``
epochs against the final, frozen phi_g (``on_fit_end``; a ``post_training`` evaluation follows; the per-round PM
before it uses the initial phi_k). ``stage2="interleaved"`` [code]: in every round, after the server step, each
client of the cohort trains phi_k for ``stage2_epochs`` epochs against the new phi_g^t (the engine's
``after_aggregation`` pass). Stage 2
always uses plain cross-entropy (the ``loss`` argument only replaces L_task).
Inference (4.6): GM = l_G; PM (client k) = l_G + l_P^k (image features computed once for prompt PEFT, per branch for
LoRA / adapter). The zero-shot model is not used at inference.
Balancedness (docs/reference.md 1.7, definition pending): logged for every method by the evaluator; the default key is
``test/global/balancedness`` / ``test/personal/balancedness`` = worst-class accuracy, candidate (a); the other
candidates are logged beside it.
Logged losses: ``train/loss`` = L_task, ``train/loss_tkl_teacher_first`` and ``train/loss_tkl_reverse`` (the
diagnostic TKL in both directions, one bisection), ``train/loss_conflict`` (fraction of purification groups --
tensors, or the whole vector -- that were projected).

Hyperparameters (paper symbol): ``lam`` (lambda, 0.9 [paper, ablated best]; 0.99 [code, README]), ``lambda_proj``
(projection strength, 1), ``purification`` (global [paper, default] | per_tensor [code]), ``tkl_iters`` / ``tau_min`` /
``tau_max`` (bisection: 20 iterations on [0.05, 20] [code]), ``align_direction`` (teacher_first [code] | reverse),
``alignment`` (tkl | kl: the plain-KL ablation of the paper | soft_ce), ``adapter_alignment``,
``share_optimizer_state``, ``full_first_round``, ``stage2``, ``stage2_epochs``, ``stage2_lr`` /
``stage2_momentum`` / ``stage2_weight_decay``, ``adapter_fusion_only``, plus ``lr`` (1e-3), ``momentum`` (0.9),
``weight_decay`` (5e-4), ``batch_size`` (B, 32), ``local_epochs`` (E, 1). Model arguments (prompt length n_ctx 4,
LoRA rank 8 / alpha 16 / dropout 0.25, ``lora_scaling``, ``template_set``) belong to the experiment config's
``model.kwargs``.

Paper vs released code (``FedPuReL.released_code`` holds the code's values of the method arguments; the
``configs/paper/fedpurel_*.yaml`` files set them and the model options below; docs/paper_vs_code.md):
- ``lam``: 0.9 (paper, ablated best) vs 0.99 (code and README, ``--fusion_loss_alpha``).
- ``purification``: one projection of the concatenated phi_g gradient (``global``, the paper's g~) vs one per
  parameter tensor with the cosine test (``per_tensor``, the code).
- ``stage2``: Stage 2 after Stage 1 against the final phi_g (``post_hoc``, the paper) vs one epoch in every round
  after aggregation (``interleaved``, the code).
- ``full_first_round``: the paper samples the cohort every round; the code trains every client in round 1.
- ``share_optimizer_state``: a fresh Stage-1 optimizer per client and round vs the code's one optimizer object
  reused across clients and rounds (see below).
- ``adapter_alignment``: with adapter PEFT the paper's alignment loss (TKL) vs the code's soft cross-entropy
  ``-sum_c softmax(z)_c log softmax(f)_c`` at T = 1 (``soft_ce``; its gradient is the plain teacher-first KL's: no
  temperature alignment).
- ``adapter_fusion_only``: with adapter PEFT Stage 2 uses the paper's L_k with ``lam`` vs the code's fused CE
  alone (lambda = 0).
- Model options (``model.kwargs``, not method arguments): ``lora_scaling`` ``alpha_over_r`` (alpha / r, LoRA's
  rule) vs ``alpha_over_sqrt_r`` (alpha / sqrt(r) = 16 / sqrt(8) in the code, CLIP-LoRA's loralib); ``peft``
  ``adapter`` (CLIP-Adapter, 131k parameters at d = 512) vs ``attention_adapter`` (the code's FedCLIP attention
  adapter, 525k); ``template_set`` ``coop`` vs ``fedpurel_code`` (the code's Pets / Food-101 / DTD templates).
- Remaining known differences (not reproduced): the code trains prompt and adapter models with CLIP in fp16 (LoRA
  in fp32); with LoRA each of q, k, v draws its own dropout mask (fedlt: one mask shared by the three); with LoRA
  and adapter PEFT the code's student classifies with the text features of "a photo of a {}." while its teacher uses
  the dataset template (fedlt: both use the zero-shot text features, identical for CIFAR / ImageNet / Places).

Deviations / choices (docs/reference.md 4.8 and section 8 rows 10-16):
- lambda defaults to the paper's 0.9 (the code's 0.99 via ``lam``).
- Noise floor (``align_noise_floor``, default 0 = the paper and the code): the sign test projects whenever
  <g_task, g_align> < 0, however small g_align is. At a fresh LoRA branch (B = 0, round 1, first local step) the
  student equals the teacher up to rounding, TKL is about 1e-9 and g_align about 1e-7 of g_task: rounding noise
  whose sign differs between CPU kernels (AVX2 / AVX-512) and thread counts, and each projection removes 20-70 %
  of a tensor's task gradient. ``align_noise_floor=1e-4`` leaves such groups unprojected.
- Adapter PEFT: the code trains phi_k with the fusion CE only (lambda = 0); ``adapter_fusion_only=True`` selects
  that behaviour (the default ``False`` applies ``lam`` to adapters too, as the paper's L_k).
- Optimizer: a fresh Stage-1 optimizer per client and round by default. ``share_optimizer_state=True`` mimics the
  code's single optimizer object reused across clients and rounds (momentum leaks between clients); the shared
  optimizer is per rank, so with several ranks the leak follows each rank's clients (in sorted order, after the
  engine's size-balanced assignment) and cannot match the code's single-process order exactly; its state is
  checkpointed from rank 0. The code's warm-up/cosine scheduler lands on the base lr at every call: constant lr.
- Precision: the code runs the prompt models with CLIP in fp16 (parameters and gradients in half precision). fedlt
  keeps fp32 master weights; with ``trainer.precision`` set, forward passes run under Fabric's autocast and the
  losses, TKL bisection and purification are computed in fp32. With ``16-mixed`` on CUDA both gradients are taken of
  the *scaled* losses (one common scale, to which purification is equivariant), g~ is written into ``.grad`` and
  the engine's ``LocalTrainer.step`` unscales, skips steps with inf/NaN and updates the scale.
- Personal branch init: drawn from a generator seeded from the experiment seed (not the global RNG), identical on
  every rank and for every client.
- Stage-2 losses are not logged (the engine's second pass has no loss channel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.sharding import derive_seed, sample_cohort
from fedlt.methods._clip import require_clip
from fedlt.methods._tkl import DIRECTIONS, aligned_temperatures, plain_kl, soft_cross_entropy, tkl
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.models.clip import ADAPTER_KINDS
from fedlt.types import ClientContext, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

GLOBAL, PERSONAL = "global", "personal"
PERSONAL_PREFIX = f"peft.{PERSONAL}."
PURIFICATIONS = ("per_tensor", "global")
STAGE2_SCHEDULES = ("interleaved", "post_hoc")
ALIGNMENTS = ("tkl", "kl", "soft_ce")
_INIT_TAG, _POST_HOC_TAG = 0xF0_9E1, 0xF0_9E2


def purify(g_task: Sequence[Tensor], g_align: Sequence[Tensor], mode: str = "per_tensor",
           lambda_proj: float = 1.0, noise_floor: float = 0.0) -> tuple[list[Tensor], Tensor]:
    """Gradient purification: removes from ``g_task`` its component against ``g_align`` where they conflict.

    ``g~ = g_task - lambda_proj * <g_task, g_align> / ||g_align||^2 * g_align`` where ``<g_task, g_align> < 0``,
    else ``g~ = g_task`` (bit-identical). With ``lambda_proj = 1`` the purified gradient is orthogonal to
    ``g_align`` where a conflict was found, and ``||g~|| <= ||g_task||`` for ``lambda_proj`` in [0, 2].
    With ``noise_floor > 0`` a group is never projected where ``||g_align|| <= noise_floor * ||g_task||``: there
    the alignment gradient is too small for its direction to mean anything (e.g. a fresh LoRA branch, whose B
    factors are zero, so that the student equals the teacher up to rounding and the sign of the inner product is
    decided by float noise). Decided on device (no host sync per tensor).

    Args:
        g_task: gradients of the task loss, one per parameter tensor.
        g_align: gradients of the alignment loss, same shapes.
        mode: ``per_tensor`` (each tensor on its own, official code) or ``global`` (one concatenated vector, paper).
        lambda_proj: strength of the projection.
        noise_floor: no projection where ``||g_align|| <= noise_floor * ||g_task||`` (0: the paper's rule).

    Returns:
        (purified gradients, bool tensor of which groups were projected: one per tensor, or one for ``global``).
    """
    if mode not in PURIFICATIONS:
        raise ValueError(f"unknown purification {mode!r}; valid: {', '.join(PURIFICATIONS)}")
    if not g_task:
        return [], torch.zeros(0, dtype=torch.bool)
    dots = torch.stack([(t.float() * a.float()).sum() for t, a in zip(g_task, g_align)])
    sqs = torch.stack([a.float().pow(2).sum() for a in g_align])
    if noise_floor < 0:
        raise ValueError(f"noise_floor must be >= 0, got {noise_floor}")
    task_sqs = torch.stack([t.float().pow(2).sum() for t in g_task]) if noise_floor > 0 else None
    if mode == "global":
        dots, sqs = dots.sum().expand(len(g_task)), sqs.sum().expand(len(g_task))
        task_sqs = task_sqs.sum().expand(len(g_task)) if task_sqs is not None else None
    conflict = dots < 0
    if task_sqs is not None:  # compared as squares: no square root, and exact at the boundary
        conflict = conflict & (sqs > noise_floor * noise_floor * task_sqs)
    coef = lambda_proj * dots / sqs.clamp_min(torch.finfo(torch.float32).tiny)
    out = [torch.where(conflict[i], t - (coef[i] * a.float()).to(t.dtype), t)
           for i, (t, a) in enumerate(zip(g_task, g_align))]
    return out, (conflict[:1] if mode == "global" else conflict)


@METHODS.register("fedpurel")
class FedPuReL(FedAvg):
    """Purified FedAvg of a global CLIP PEFT branch plus a per-client residual branch (FedPuReL).

    Args:
        lam: Stage-2 weight lambda of the residual CE (1 - lambda weighs the fused CE); paper 0.9, code 0.99.
        lambda_proj: projection strength of the purification (1: exactly the paper's formula).
        align_noise_floor: no projection of a group (tensor, or the whole vector) where ``||g_align|| <=
            align_noise_floor * ||g_task||``. 0 (default) projects on the sign alone, as the paper and the official
            code do; 1e-4 skips the projection against rounding noise at a fresh LoRA branch (B = 0), whose first
            step otherwise depends on the CPU's float kernels.
        purification: ``global`` (default, the paper: one vector over all phi_g tensors) or ``per_tensor`` (the
            official code).
        alignment: ``tkl`` (temperature-aligned KL), ``kl`` (plain KL at temperature 1, the paper's ablation) or
            ``soft_ce`` (soft cross-entropy to the teacher at temperature 1).
        adapter_alignment: the alignment loss with adapter PEFT (``adapter`` / ``attention_adapter``): ``None``
            (default, the paper: as ``alignment``) or one of ``tkl``, ``kl``, ``soft_ce`` (the official code's adapter
            variant: soft cross-entropy at T = 1).
        align_direction: direction of the alignment loss: ``teacher_first`` KL(z || f) (code) or ``reverse``.
        tkl_iters: bisection iterations of the TKL temperatures.
        tau_min: lower end of the temperature bracket.
        tau_max: upper end of the temperature bracket.
        share_optimizer_state: reuse one Stage-1 optimizer across clients and rounds (the code's momentum leak;
            per rank, see the module docstring) instead of a fresh one per client and round.
        full_first_round: every client trains in round 1 (official code; default False, the paper's sampler in
            every round); later rounds use the engine's sampler.
        stage2: ``post_hoc`` (default, the paper: every client after the last round) or ``interleaved`` (every
            round after aggregation, cohort clients; the code).
        stage2_epochs: epochs of Stage 2 per round (interleaved) or in total (post_hoc).
        stage2_lr: Stage-2 SGD learning rate.
        stage2_momentum: Stage-2 SGD momentum (code: none).
        stage2_weight_decay: Stage-2 weight decay (code: none).
        adapter_fusion_only: with adapter PEFT, Stage 2 uses the fused CE only (lambda = 0), as the official code;
            ``False`` (default, the paper's L_k) applies ``lam`` to adapters as to prompts and LoRA.
        lr: Stage-1 SGD learning rate (eta).
        momentum: Stage-1 SGD momentum.
        weight_decay: Stage-1 weight decay.
        local_epochs: Stage-1 local epochs E.
        batch_size: local batch size B (both stages).
        **kwargs: further local-training arguments of :class:`fedlt.methods.base.FedMethod` (``local_steps``,
            ``grad_clip`` -- applied to g~ and to the Stage-2 gradient --, ``loss`` for L_task).
    """

    paper = PaperRef(
        title="Fine-tuning Impairs the Balancedness of Foundation Models in Long-tailed Personalized Federated "
        "Learning",
        venue="CVPR 2026",
        arxiv="2605.02247",
        url="https://github.com/shihaohou/FedPuReL",
    )
    automatic_optimization = False
    needs_clip = True
    # The official code's values (github shihaohou/FedPuReL, scripts/cifar100.sh and federated_main.py).
    released_code: ClassVar[dict[str, Any]] = {
        "lam": 0.99,
        "share_optimizer_state": True,
        "adapter_alignment": "soft_ce",
        "adapter_fusion_only": True,
        "purification": "per_tensor",
        "stage2": "interleaved",
        "full_first_round": True,
    }

    def __init__(
        self,
        lam: float = 0.9,
        lambda_proj: float = 1.0,
        align_noise_floor: float = 0.0,
        purification: str = "global",
        alignment: str = "tkl",
        adapter_alignment: str | None = None,
        align_direction: str = "teacher_first",
        tkl_iters: int = 20,
        tau_min: float = 0.05,
        tau_max: float = 20.0,
        share_optimizer_state: bool = False,
        full_first_round: bool = False,
        stage2: str = "post_hoc",
        stage2_epochs: int = 1,
        stage2_lr: float = 1e-3,
        stage2_momentum: float = 0.0,
        stage2_weight_decay: float = 0.0,
        adapter_fusion_only: bool = False,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        local_epochs: int = 1,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, local_epochs=local_epochs,
                         batch_size=batch_size, **kwargs)
        for name, value, valid in (("purification", purification, PURIFICATIONS), ("alignment", alignment, ALIGNMENTS),
                                   ("align_direction", align_direction, DIRECTIONS),
                                   ("stage2", stage2, STAGE2_SCHEDULES)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if adapter_alignment is not None and adapter_alignment not in ALIGNMENTS:
            raise ValueError(f"unknown adapter_alignment {adapter_alignment!r}; valid: None, {', '.join(ALIGNMENTS)}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if lambda_proj < 0:
            raise ValueError(f"lambda_proj must be >= 0, got {lambda_proj}")
        if align_noise_floor < 0:
            raise ValueError(f"align_noise_floor must be >= 0, got {align_noise_floor}")
        if not 0 < tau_min < tau_max or tkl_iters < 1:
            raise ValueError("need 0 < tau_min < tau_max and tkl_iters >= 1")
        if stage2_epochs < 0 or stage2_lr <= 0:
            raise ValueError("stage2_epochs must be >= 0 and stage2_lr > 0")
        self.lam = float(lam)
        self.lambda_proj = float(lambda_proj)
        self.align_noise_floor = float(align_noise_floor)
        self.purification = purification
        self.alignment = alignment
        self.adapter_alignment = adapter_alignment
        self.align_direction = align_direction
        self.tkl_iters = int(tkl_iters)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.share_optimizer_state = bool(share_optimizer_state)
        self.full_first_round = bool(full_first_round)
        self.stage2 = stage2
        self.stage2_epochs = int(stage2_epochs)
        self.stage2_lr = float(stage2_lr)
        self.stage2_momentum = float(stage2_momentum)
        self.stage2_weight_decay = float(stage2_weight_decay)
        self.adapter_fusion_only = bool(adapter_fusion_only)
        # The engine's second client pass of every round (interleaved Stage 2).
        self.runs_after_aggregation = stage2 == "interleaved"
        self._shared_opt: torch.optim.Optimizer | None = None
        self._pending_opt_state: dict[str, Any] | None = None

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        clip = require_clip(model, "FedPuReL")
        if clip.peft_kind == "none" or clip.head_kind != "text":
            raise ValueError("FedPuReL trains PEFT branches of CLIP's text classifier: set model.kwargs.peft to "
                             "prompt, lora, adapter or attention_adapter and head to text; got "
                             f"peft={clip.peft_kind!r}, head={clip.head_kind!r}")
        if PERSONAL not in clip.branches:
            # Before the engine splits the keys; seeded so that every rank builds the same phi_k initialisation.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(  # CPU only: fork_rng restores it
                    derive_seed(self.run.seed, _INIT_TAG))
                clip.add_branch(PERSONAL)
        super().setup(model, data, trainer)
        self.clip = clip
        self._global_params = [p for p in clip.peft[GLOBAL].parameters() if p.requires_grad]
        self._personal_params = [p for p in clip.peft[PERSONAL].parameters() if p.requires_grad]

    def is_personal(self, key: str) -> bool:
        return key.startswith(PERSONAL_PREFIX)

    @property
    def personalizes(self) -> bool:
        return True

    def cohort_sampler(self) -> Callable[[int, int, int, int], list[int]] | None:
        """Round 1: every client (``full_first_round``); later rounds the engine's uniform sampler."""
        if not self.full_first_round:
            return None

        def sampler(seed: int, round: int, num_clients: int, clients_per_round: int) -> list[int]:
            if round == 1:
                return list(range(num_clients))
            return sample_cohort(seed, round, num_clients, clients_per_round)

        return sampler

    # -- Stage 1 ---------------------------------------------------------------------------------------------
    def _stage1_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self._global_params, lr=self.current_lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """SGD over phi_g: fresh per client and round, or one shared object (``share_optimizer_state``)."""
        if not self.share_optimizer_state:
            return [self._stage1_optimizer()]
        if self._shared_opt is None:
            self._shared_opt = self._stage1_optimizer()
            if self._pending_opt_state is not None:
                self._shared_opt.load_state_dict(self._pending_opt_state)
                self._pending_opt_state = None
        return [self._shared_opt]

    def student_teacher(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f, z): the global branch's logits l_G (with gradients) and the zero-shot logits (without)."""
        clip = self.clip
        if clip.image_depends_on_branch():
            return clip.classify(clip.encode(x, GLOBAL), GLOBAL), clip.zero_shot_logits(x)
        feats = clip.encode(x, None)  # prompt PEFT: the image side is the frozen tower, shared by both
        with torch.no_grad():
            z = clip.classify(feats, None)
        return clip.classify(feats, GLOBAL), z

    @property
    def active_alignment(self) -> str:
        """The Stage-1 alignment loss of the model's PEFT kind: ``adapter_alignment`` for adapters (when set), else
        ``alignment``."""
        if self.adapter_alignment is not None and self.clip.peft_kind in ADAPTER_KINDS:
            return self.adapter_alignment
        return self.alignment

    def stage1_losses(self, x: Tensor, y: Tensor, ctx: ClientContext) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(L_task, L_align, diagnostics) of a mini-batch (losses in fp32)."""
        f, z = self.student_teacher(x)
        f, z = f.float(), z.float()
        task = self.loss(f, y, ctx.class_counts, ctx.round)
        taus = aligned_temperatures(f, z, self.tkl_iters, self.tau_min, self.tau_max)
        temps = (taus[0], taus[1])
        alignment = self.active_alignment
        if alignment == "tkl":
            align = tkl(f, z, self.align_direction, temperatures=temps)
        elif alignment == "kl":
            align = plain_kl(f, z, self.align_direction)
        else:  # soft_ce: teacher-first by definition (a cross-entropy against the teacher's distribution)
            align = soft_cross_entropy(f, z, 1.0)
        with torch.no_grad():
            diag = {d: tkl(f, z, d, temperatures=temps) for d in DIRECTIONS}
        return task, align, {f"tkl_{d}": v for d, v in diag.items()}

    def _scaled(self, loss: Tensor) -> Tensor:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def _grads(self, loss: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor]:
        grads = torch.autograd.grad(self._scaled(loss), params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def purified_gradients(self, x: Tensor, y: Tensor, ctx: ClientContext) -> tuple[list[Tensor], Tensor,
                                                                                      dict[str, Tensor]]:
        """(g~, L_task, parts) of a mini-batch: both gradients w.r.t. phi_g from one graph, then purification."""
        task, align, parts = self.stage1_losses(x, y, ctx)
        g_align = self._grads(align, self._global_params, retain_graph=True)
        g_task = self._grads(task, self._global_params, retain_graph=False)
        g_tilde, conflict = purify(g_task, g_align, self.purification, self.lambda_proj,
                                    self.align_noise_floor)
        parts["conflict"] = conflict.float().mean() if conflict.numel() else torch.zeros((), device=task.device)
        return g_tilde, task, parts

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """One purified step: g~ is written into ``.grad`` and the engine's trainer steps (unscaling, clipping)."""
        x, y = batch[0], batch[1]
        g_tilde, task, parts = self.purified_gradients(x, y, ctx)
        for p, g in zip(self._global_params, g_tilde):
            p.grad = g
        self.trainer.step(self._optimizers[0], self.grad_clip)
        return StepOutput(loss=None, parts={"loss": task.detach(), **parts})

    # -- Stage 2 ---------------------------------------------------------------------------------------------
    @property
    def stage2_lambda(self) -> float:
        """The lambda Stage 2 uses: 0 (fused CE only) for adapter PEFT with ``adapter_fusion_only``."""
        return 0.0 if self.adapter_fusion_only and self.clip.peft_kind in ADAPTER_KINDS else self.lam

    def branch_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(l_G, l_P) of a batch with the branches as they are, both with whatever gradients are enabled."""
        clip = self.clip
        if clip.image_depends_on_branch():
            return clip.classify(clip.encode(x, GLOBAL), GLOBAL), clip.classify(clip.encode(x, PERSONAL), PERSONAL)
        feats = clip.encode(x, None)
        return clip.classify(feats, GLOBAL), clip.classify(feats, PERSONAL)

    def stage2_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """L_k = (1 - lambda) CE(l_G + l_P, y) + lambda CE(l_P, y), l_G without gradients and in eval mode (a term
        with weight 0 is left out, so lambda = 1 ignores l_G entirely)."""
        clip = self.clip
        shared = not clip.image_depends_on_branch()
        was_training = clip.training
        clip.eval()
        with torch.no_grad():
            feats = clip.encode(x, None if shared else GLOBAL)
            l_g = clip.classify(feats, GLOBAL).float()
        clip.train(was_training)
        l_p = clip.classify(feats if shared else clip.encode(x, PERSONAL), PERSONAL).float()
        lam = self.stage2_lambda
        terms = []
        if lam < 1.0:
            terms.append((1.0 - lam) * F.cross_entropy(l_g + l_p, y))
        if lam > 0.0:
            terms.append(lam * F.cross_entropy(l_p, y))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def train_personal(self, ctx: ClientContext, indices: Tensor, epochs: int) -> int:
        """``epochs`` passes of Stage 2 on phi_k (plain SGD, fresh optimizer) through the engine's trainer; the
        workspace must hold the client's phi_k and the phi_g to train against. Returns the number of steps."""
        if epochs == 0 or not self._personal_params:
            return 0
        data = self.data
        order = self.trainer.batch_indices(indices, ctx, self.batch_size, epochs)
        batches = (data.get_batch(data.train, idx, ctx.generator, train=True) for idx in order)
        opt = torch.optim.SGD(self._personal_params, lr=self.stage2_lr, momentum=self.stage2_momentum,
                              weight_decay=self.stage2_weight_decay)
        self.clip.train()
        records = self.trainer.run(batches, lambda b: StepOutput(loss=self.stage2_loss(b[0], b[1])), [opt],
                                   self.grad_clip)
        return len(records)

    def after_aggregation(self, ctx: ClientContext, indices: Tensor) -> None:
        """Interleaved Stage 2: phi_k against the round's new phi_g^t."""
        self.train_personal(ctx, indices, self.stage2_epochs)

    def on_fit_end(self, simulator: Any) -> bool | None:
        """Post-hoc Stage 2: every client trains phi_k against the final phi_g (this rank: clients
        ``cid % world_size == rank``; the client store is then synced across ranks). Returns ``True`` so a
        ``post_training`` evaluation follows."""
        if self.stage2 != "post_hoc":
            return None
        sim = simulator
        clients = list(range(self.data.num_clients))
        mine = [c for c in clients if c % sim.world_size == sim.rank]
        message = sim.reducer.broadcast(sim.round)
        for cid in mine:
            indices = self.data.client_indices[cid]
            sim.client_pass(cid, message, derive_seed(self.run.seed, _POST_HOC_TAG, cid),
                            lambda ctx, indices=indices: self.train_personal(ctx, indices, self.stage2_epochs))
        sim.sync_clients(clients, mine)
        return True

    # -- inference -------------------------------------------------------------------------------------------
    def predict_global(self, x: Tensor) -> Tensor:
        """GM: l_G."""
        return self.clip.classify(self.clip.encode(x, GLOBAL), GLOBAL)

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM: l_G + l_P^k."""
        l_g, l_p = self.branch_logits(x)
        return l_g + l_p

    # -- server state ----------------------------------------------------------------------------------------
    def server_state_dict(self) -> dict[str, Any]:
        """The shared Stage-1 optimizer's state (``share_optimizer_state``; this rank's), else nothing."""
        if self.share_optimizer_state and self._shared_opt is not None:
            return {"optimizer": self._shared_opt.state_dict()}
        return {}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            if self._shared_opt is not None:
                self._shared_opt.load_state_dict(state["optimizer"])
            else:
                self._pending_opt_state = state["optimizer"]
