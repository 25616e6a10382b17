"""FedSAM (and FedASAM): FedAvg with a sharpness-aware local optimizer.

Papers: Z. Qu, X. Li, R. Duan, Y. Liu, B. Tang, Z. Lu, "Generalized Federated Learning via Sharpness Aware
Minimization", ICML 2022, arXiv:2206.02618 (FedSAM); D. Caldarola, B. Caputo, M. Ciccone, "Improving
Generalization in Federated Learning by Seeking Flat Minima", ECCV 2022, arXiv:2203.11834 (FedSAM and FedASAM).
Local optimizer: SAM (P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021, arXiv:2010.01412) and ASAM (J. Kwon, J. Kim, H. Park, I. K. Choi, "ASAM:
Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021,
arXiv:2102.11600).

Client: every local step on a mini-batch B (the same batch for both passes):
1. loss L_B(w) and its gradient g at the current weights w (logged as ``loss``);
2. the ascent step eps = rho g / ||g|| (SAM), or eps = rho T^2 g / ||T g|| with T = |w| + eta element-wise (ASAM),
   over all trainable parameters with one joint norm (:func:`fedlt.methods._sam.perturbation`);
3. w <- w + eps, gradients zeroed, loss L_B(w + eps) and its gradient g_SAM (logged as ``loss_sam``);
4. w <- w - eps, then one step of the local optimizer (SGD with the FedAvg arguments: momentum, weight decay,
   ``grad_clip`` all act on g_SAM) through the engine's ``step`` (gradient scaling and clipping stay correct).
Server: as FedAvg (sample-weighted mean of the client models, BatchNorm statistics included).

Hyperparameters (paper symbol, default): ``rho`` (rho, the neighbourhood radius, 0.05), ``adaptive`` (False: SAM;
True: ASAM, i.e. FedASAM), ``eta`` (ASAM's eta, 0.0), plus FedAvg's ``lr``, ``momentum``, ``weight_decay``,
``local_epochs``, ``batch_size``. Caldarola et al. use rho = 0.05 for SAM and rho = 0.5, eta = 0.2 for ASAM; ASAM's
own default is eta = 0.01. With ``adaptive`` and eta = 0, a parameter that is exactly 0 is never perturbed.

Implementation choices and deviations:
- BatchNorm: the perturbed forward pass must not move the running statistics a second time. Every buffer of the
  model (running mean/var, ``num_batches_tracked``) is saved before the second forward pass and restored after it,
  so after a step the statistics are exactly those of the clean pass at w (Foret et al.'s convention of disabling
  the running-statistics update in the second pass; setting the BN momentum to 0 would still bump
  ``num_batches_tracked``). Caldarola et al.'s code does not special-case BN.
- ASAM's T = |w| + eta scales every trainable parameter (biases and normalisation affine parameters included);
  the ASAM and Caldarola et al. code scale only parameters whose name contains ``weight`` (biases use T = 1).
- w - eps after w + eps restores w up to float rounding (as in the reference implementations, which also subtract
  eps); with rho = 0 it is exact, so FedSAM with rho = 0 equals FedAvg (tested).
- Under a gradient scaler (16-mixed on CUDA) an overflowing first-pass gradient yields a zero eps for that step
  (non-finite entries are zeroed) instead of corrupting the weights; the scaler then skips the step as usual.
- The second pass costs one extra forward/backward per step (2x local compute), as in the papers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlt.engine.params import copy_tensors_
from fedlt.methods._sam import perturbation, restore_, shift_
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput


@METHODS.register("fedsam")
class FedSAM(FedAvg):
    """FedAvg whose clients minimise the sharpness-aware objective with SAM (or ASAM) steps.

    Args:
        rho: SAM radius rho >= 0 (0: plain SGD on the clean gradient, i.e. FedAvg).
        adaptive: use ASAM's scale-invariant ascent step (FedASAM).
        eta: ASAM's eta >= 0 in T = |w| + eta (ignored unless ``adaptive``).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Generalized Federated Learning via Sharpness Aware Minimization",
        venue="ICML 2022",
        arxiv="2206.02618",
    )
    automatic_optimization = False

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []

    def on_client_start(self, ctx: ClientContext) -> None:
        """Allocates the buffer snapshot used to undo the second pass's running-statistics update."""
        buffers = list(self.model.buffers())
        if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers)):
            self._buffers = buffers
            self._saved = [b.detach().clone() for b in buffers]

    def perturb(self, params: list[Tensor]) -> list[Tensor | None]:
        """The ascent step eps for ``params`` from their current gradients (``None`` where there is none)."""
        eps = perturbation(params, [p.grad for p in params], self.rho, self.adaptive, self.eta)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.scaler is not None:
            # An overflow in the scaled gradient: the step will be skipped by the scaler, never move the weights.
            eps = [None if e is None else torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0) for e in eps]
        return eps

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        opt = self.optimizers()
        params = [p for group in opt.param_groups for p in group["params"]]
        loss = self.loss(self.model(x), y, ctx.class_counts, ctx.round)
        self.manual_backward(loss)
        eps = self.perturb(params)
        shift_(params, eps)
        opt.zero_grad()
        copy_tensors_(self._saved, self._buffers)
        loss_sam = self.loss(self.model(x), y, ctx.class_counts, ctx.round)
        self.manual_backward(loss_sam)
        copy_tensors_(self._buffers, self._saved)  # the perturbed pass leaves no trace in the BN statistics
        restore_(params, eps)
        opt.step()  # unscaled and clipped to grad_clip
        opt.zero_grad()
        return StepOutput(loss=None, parts={"loss": loss.detach(), "sam": loss_sam.detach()})
