"""SCAFFOLD.

Paper: S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, arXiv:1910.06378 (Algorithm 1).

Client i (control variate c_i, zeros the first time it is seen; server control variate c from the broadcast):
local SGD from the global model x on the corrected gradient g_i(y) + c - c_i, then option II
c_i+ = c_i - c + (x - y_i) / (K eta_l) with K the number of local steps taken and eta_l the local lr. It uploads
y_i (the model, as FedAvg; the server forms Delta y_i = y_i - x) and Delta c_i = c_i+ - c_i (an extra), and keeps
c_i+ in its persistent state.
Server: x <- x + eta_g * mean_i(Delta y_i); c <- c + (1/N) sum_{i in S} Delta c_i = c + (|S|/N) mean_i(Delta c_i),
N the total number of clients. Control variates cover the trainable shared parameters only; BatchNorm running
statistics take the plain weighted mean (integer buffers rounded), see ``fedlt/methods/_server_opt.py``.
Hyperparameters (paper symbol): ``server_lr`` (eta_g, default 1), ``weighted`` (how mean_i(Delta y_i) is taken),
plus FedAvg's local arguments (``lr`` is eta_l, ``local_steps``/``local_epochs`` give K).
Deviations:
- mean_i(Delta y_i) is sample-weighted (n_i / sum n) by default, not the paper's uniform 1/|S|: it is the
  aggregation every other fedlt method uses, so with zero control variates (round 1) SCAFFOLD is exactly FedAvg
  (tested) and comparisons isolate the correction. ``weighted: false`` gives the paper's uniform mean. The server
  control variate always uses the paper's uniform (1/N) sum, which keeps c the mean of all N client variates.
- Gradient clipping (``grad_clip``) clips the stochastic gradient g_i before the correction c - c_i is added.
- With local momentum or weight decay, option II still divides by K * lr (the plain-SGD step count); the paper
  uses plain SGD (momentum 0, the default).
Memory: every client keeps one full copy of the trainable parameters as c_i. With ``client_state: memory`` or
``cpu`` that is K model copies on every rank (plus one per-round upload buffer); use ``client_state: disk`` for
large models or many clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlt.methods._server_opt import ServerOptReducer, buffer_keys
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

_CI = "scaffold.c_i."  # client-state keys of c_i
_DC = "dc."  # extras: Delta c_i


class ScaffoldReducer(ServerOptReducer):
    """Weighted mean step ``x <- x + eta_g (mean - x)`` plus the server control variate ``c``.

    Args:
        server_lr: global step size eta_g.
        num_clients: N, the total number of clients.
        param_shapes: shapes of the controlled parameters (by state-dict key).
        average_keys: buffers (take the weighted mean).
    """

    def __init__(self, server_lr: float, num_clients: int, param_shapes: dict[str, tuple[int, ...]],
                 average_keys: set[str]) -> None:
        super().__init__("sgdm", server_lr, beta1=0.0, average_keys=average_keys,
                         extras={_DC + k: s for k, s in param_shapes.items()})
        self.num_clients = num_clients
        self.param_shapes = dict(param_shapes)

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        self.control = {k: torch.zeros(s, device=device, dtype=self.buffer.dtype) for k, s in self.param_shapes.items()}

    def server_step(self, round: int) -> None:
        """Model step as FedAvgM(beta=0, eta_g), then ``c += (1/N) sum Delta c_i`` (idle ranks added zeros)."""
        super().server_step(round)
        if self.control:
            with torch.no_grad():
                torch._foreach_add_(list(self.control.values()), [self.extras_sum[_DC + k] for k in self.control],
                                    alpha=1.0 / self.num_clients)

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        return {"c": self.control}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["control"] = {k: v.detach().cpu().clone() for k, v in self.control.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for k, v in state["control"].items():
                self.control[k].copy_(v)


class _CorrectedSGD(torch.optim.SGD):
    """SGD that adds a fixed per-parameter correction (SCAFFOLD's c - c_i) to the gradients before each step.

    It is a real optimizer, so the engine's unscale / clip / step path (precision, ``grad_clip``) stays intact
    and the method keeps automatic optimization.
    """

    def __init__(self, params: Sequence[Tensor], corrections: list[tuple[Tensor, Tensor]], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.corrections = corrections

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for p, corr in self.corrections:
            if p.grad is None:  # a parameter the loss did not reach: its gradient is 0, the correction still applies
                p.grad = corr.to(p.dtype, copy=True)
            else:
                p.grad.add_(corr.to(p.grad.dtype))
        return super().step(closure)


@METHODS.register("scaffold")
class Scaffold(FedAvg):
    """FedAvg with client/server control variates correcting client drift (Karimireddy et al., 2020).

    Args:
        server_lr: global step size eta_g (1: the new global model is the mean client model).
        weighted: sample-weighted mean of the client models (fedlt's FedAvg aggregation) instead of the paper's
            uniform mean over the cohort.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
        venue="ICML 2020",
        arxiv="1910.06378",
    )

    def __init__(self, server_lr: float = 1.0, weighted: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.weighted = weighted

    @property
    def personalizes(self) -> bool:
        return False  # c_i only steers training; PM is the global model

    def _controlled(self) -> dict[str, Tensor]:
        """The trainable shared parameters (by state-dict key): those that carry control variates."""
        params = dict(self.model.named_parameters())
        return {k: params[k] for k in self.shared_tensors if k in params and params[k].requires_grad}

    def client_state_template(self) -> dict[str, Tensor]:
        return {_CI + k: torch.zeros_like(p, dtype=torch.float32) for k, p in self._controlled().items()}

    def configure_reducer(self) -> Reducer:
        shapes = {k: tuple(p.shape) for k, p in self._controlled().items()}
        return ScaffoldReducer(self.server_lr, self.data.num_clients, shapes, buffer_keys(self.model))

    # -- client half ---------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        c = ctx.message.extras["c"]
        self._c_i = {k: ctx.state.get(_CI + k, torch.zeros_like(v)) for k, v in c.items()}
        self._correction = {k: c[k] - self._c_i[k] for k in c}
        self._steps = 0
        self._lr_sum = 0.0

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        controlled = self._controlled()
        pairs = [(controlled[k], corr) for k, corr in self._correction.items()]
        return [_CorrectedSGD(params, pairs, lr=self.current_lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)]

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        self._steps += 1  # one optimizer step per training_step (automatic optimization)
        self._lr_sum += self.current_lr  # the step's rate (a local_lr_schedule changes it step by step)
        return super().training_step(batch, ctx)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        x, c = ctx.message.state, ctx.message.extras["c"]
        with torch.no_grad():
            if self._steps > 0:  # option II: c_i+ = c_i - c + (x - y_i) / (K eta_l)
                # K eta_l is the sum of the K steps' rates: K times the round's rate without a local schedule.
                lr_sum = self._steps * self.current_lr if self.local_lr_schedule is None else self._lr_sum
                scale = 1.0 / lr_sum
                new = {k: self._c_i[k] - c[k] + (x[k] - self.shared_tensors[k]).float() * scale for k in c}
            else:  # a client without a single step learned nothing: keep c_i
                new = dict(self._c_i)
            extras = {_DC + k: new[k] - self._c_i[k] for k in c}
        ctx.state.update({_CI + k: v for k, v in new.items()})
        weight = float(ctx.num_samples) if self.weighted else 1.0
        return ClientUpdate(client_id=ctx.client_id, weight=weight, tensors=self.shared_tensors, extras=extras)
