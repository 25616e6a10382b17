"""Ditto.

Paper: T. Li, S. Hu, A. Beirami, V. Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021, arXiv:2012.04221.

Client (Algorithm 1): two models. The global model w is trained exactly as in FedAvg, from the broadcast w^t,
and uploaded. The personal model v_k (a full copy of the network, kept on the client) is trained on
h_k(v_k; w^t) = F_k(v_k) + (lambda/2) ||v_k - w^t||^2, i.e. v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t)),
where w^t is the round's broadcast global model (not the locally updated one). Server: FedAvg over the global
model only; v_k is never uploaded.
Schedule: by default (``personal_epochs=None``) each local mini-batch first takes one personal step and then one
global step on the same batch, as in the official code (so the personal model takes as many steps as the global
one: s = the local iterations). With ``personal_epochs`` set, the fit runs ``local_epochs`` global epochs and then
``personal_epochs`` personal epochs on fresh shuffles (Algorithm 1 with s = personal_epochs passes).
Storage: v_k lives in a second network created once per rank in :meth:`Ditto.setup` (a deep copy of the initial
model) and registered as the submodule ``personal_model`` of the workspace model, so its state-dict keys
(``personal_model.*``, parameters and BatchNorm buffers) are personal keys: the engine loads each client's v_k into
it before the client trains or is evaluated and stores it afterwards. A client seen for the first time starts from
the initial model w^0 (the official code initialises every personal model to the initial global model). This is
one full model per client: use ``trainer.client_state: disk`` for large models.
Inference: GM = the global model w (``predict_global``); PM = the client's v_k (``predict_personal``; a client that
never trained is evaluated with w^0); the evaluator's global state is never touched by the personal model.
Logged losses: interleaved, ``train/loss`` is the global model's local loss and ``train/loss_personal`` the
personal objective; with ``personal_epochs``, ``train/loss`` averages each step's objective over both phases.
Hyperparameters (paper symbol): ``lam`` (lambda, personalization strength, tuned per dataset in the paper;
official scripts: 1), ``personal_epochs`` (s), plus FedAvg's lr (eta), local epochs and batch size; both models use
the same learning rate (as in the official code).
Deviations: the dynamic-lambda variant of the official code (picking lambda on local validation data) and the
robustness experiments (corrupted clients, robust aggregators) are not implemented.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fedlt.methods._phases import batches_per_epoch
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput

PERSONAL = "personal_model"
_PREFIX = PERSONAL + "."


@METHODS.register("ditto")
class Ditto(FedAvg):
    """FedAvg for the global model plus a per-client personal model pulled towards it by (lambda/2)||v - w^t||^2.

    Args:
        lam: proximal strength lambda >= 0 of the personal objective (0: plain local training of v_k).
        personal_epochs: local epochs of the personal model after the global ones (``None``: one personal step
            per global step on the same mini-batch, as in the official code).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``local_epochs`` and
            ``local_steps`` are the global model's local work).
    """

    paper = PaperRef(
        title="Ditto: Fair and Robust Federated Learning Through Personalization",
        venue="ICML 2021",
        arxiv="2012.04221",
    )
    automatic_optimization = False

    def __init__(self, lam: float = 1.0, personal_epochs: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if personal_epochs is not None and personal_epochs < 1:
            raise ValueError(f"personal_epochs must be >= 1 or None, got {personal_epochs}")
        if personal_epochs is not None and self.local_steps is not None:
            raise ValueError("personal_epochs needs epoch-based local work: unset local_steps")
        self.lam = lam
        self.personal_epochs = personal_epochs
        self.global_epochs = self.local_epochs
        if personal_epochs is not None:
            # The local loop runs the global epochs, then the personal epochs.
            self.local_epochs = self.global_epochs + personal_epochs
        self._global_steps: int | None = None
        self._step = 0
        self._anchor: list[tuple[Tensor, Tensor]] = []

    def setup(self, model: nn.Module, data: Any, trainer: Any) -> None:
        super().setup(model, data, trainer)
        if PERSONAL not in model._modules:
            # Once per rank: a copy of the initial model (w^0) holds v_k of the client being trained/evaluated.
            model.add_module(PERSONAL, copy.deepcopy(model))

    @property
    def personal_model(self) -> nn.Module:
        """The network holding the current client's personal model v_k."""
        return self.model.get_submodule(PERSONAL)

    def is_personal(self, key: str) -> bool:
        return key.startswith(_PREFIX)

    @property
    def personalizes(self) -> bool:
        return True

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Two fresh SGD optimizers: [global model w, personal model v_k]."""
        glob = [p for n, p in self.model.named_parameters() if not n.startswith(_PREFIX) and p.requires_grad]
        pers = [p for p in self.personal_model.parameters() if p.requires_grad]
        return [
            torch.optim.SGD(params, lr=self.current_lr, momentum=self.momentum, weight_decay=self.weight_decay)
            for params in (glob, pers)
        ]

    def on_client_start(self, ctx: ClientContext) -> None:
        # Pairs (v_k parameter, w^t tensor): the anchor is the broadcast, which stays fixed during the round.
        state = ctx.message.state
        self._anchor = [(p, state[n]) for n, p in self.personal_model.named_parameters() if n in state]
        self._step = 0
        self._global_steps = None
        if self.personal_epochs is not None:
            self._global_steps = self.global_epochs * batches_per_epoch(self.trainer, ctx, self.batch_size)

    def _global_step(self, x: Tensor, y: Tensor, ctx: ClientContext) -> Tensor:
        """One FedAvg step of w on the local loss."""
        loss = self.loss(self.model(x), y, ctx.class_counts, ctx.round)
        opt = self.optimizers()[0]
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def _personal_step(self, x: Tensor, y: Tensor, ctx: ClientContext) -> Tensor:
        """One step of v_k on F_k(v_k) + (lambda/2) ||v_k - w^t||^2."""
        loss = self.loss(self.personal_model(x), y, ctx.class_counts, ctx.round)
        if self.lam > 0 and self._anchor:
            prox = torch.stack([(p - w).pow(2).sum() for p, w in self._anchor]).sum()
            loss = loss + 0.5 * self.lam * prox
        opt = self.optimizers()[1]
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        step, self._step = self._step, self._step + 1
        if self._global_steps is None:  # interleaved (official code): personal step, then global step
            personal = self._personal_step(x, y, ctx)
            return StepOutput(loss=None, parts={"loss": self._global_step(x, y, ctx), "personal": personal})
        if step < self._global_steps:
            return StepOutput(loss=None, parts={"loss": self._global_step(x, y, ctx)})
        return StepOutput(loss=None, parts={"loss": self._personal_step(x, y, ctx)})

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM logits from v_k (the engine loaded the client's personal keys into ``personal_model``)."""
        return self.personal_model(x)
