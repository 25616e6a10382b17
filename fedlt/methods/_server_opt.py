"""Server optimizers on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
arXiv:2003.00295, Algorithm 2; server momentum: Hsu et al., arXiv:1909.06335).

The server treats ``Delta_t = sum_k n_k x_k / sum_k n_k - x_t`` (the weighted mean client model minus the global
model) as a gradient-like step and applies an optimizer rule to it:

* ``sgdm`` (FedAvgM): ``m_t = beta1 m_{t-1} + Delta_t``, ``x_{t+1} = x_t + eta m_t`` (heavy ball, no dampening);
* ``adagrad``: ``v_t = v_{t-1} + Delta_t^2``;
* ``adam``: ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2``;
* ``yogi``: ``v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``;

and for the three adaptive rules ``m_t = beta1 m_{t-1} + (1 - beta1) Delta_t``,
``x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)``, with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (Algorithm 2 only asks
for ``v_{-1} >= tau^2``) and no bias correction (as in the paper).

Only trainable *parameters* go through the optimizer. Buffers (BatchNorm running mean/var) are statistics, not
weights moved by gradients: a momentum or an Adam step on them has no meaning (and can even make a running
variance negative), so they take the plain weighted mean as in FedAvg; integer buffers (``num_batches_tracked``)
take the rounded weighted mean, also as in FedAvg.

The optimizer state (``m``, ``v``) lives in the reducer and is part of :meth:`ServerOptReducer.state_dict`, so a
resumed run continues with the same moments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_
from fedlt.methods.base import Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.schedules import Schedule

RULES = ("sgdm", "adagrad", "adam", "yogi")


def buffer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's buffers (running statistics): averaged, never optimized."""
    return {name for name, _ in model.named_buffers()}


class ServerOptReducer(Reducer):
    """Weighted accumulation as in FedAvg, then one server-optimizer step on the pseudo-gradient.

    Args:
        rule: ``sgdm``, ``adagrad``, ``adam`` or ``yogi``.
        lr: server learning rate eta.
        beta1: first-moment decay beta_1 (the momentum beta for ``sgdm``).
        beta2: second-moment decay beta_2 (``adam``, ``yogi``).
        tau: adaptivity tau (``adagrad``, ``adam``, ``yogi``).
        average_keys: float keys that take the weighted mean instead of the optimizer step (buffers).
        extras: names and shapes of extra client uploads (see :class:`Reducer`).
        lr_schedule: the server learning rate of round t is ``lr * lr_schedule.factor(t, rounds)``
            (:mod:`fedlt.schedules`; ``None``: constant).
        rounds: the run's rounds R (the schedule's total).
    """

    def __init__(
        self,
        rule: str,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        average_keys: Iterable[str] = (),
        extras: dict[str, tuple[int, ...]] | None = None,
        lr_schedule: Schedule | None = None,
        rounds: int = 1,
    ) -> None:
        super().__init__(extras)
        self.lr_schedule, self.rounds = lr_schedule, int(rounds)
        if rule not in RULES:
            raise ValueError(f"unknown server optimizer {rule!r}; valid: {', '.join(RULES)}")
        _check_hparams(lr, beta1, beta2, tau, adaptive=rule != "sgdm")
        self.rule = rule
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.average_keys = set(average_keys)

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        self.opt_keys = [k for k in self.float_keys if k not in self.average_keys]
        self.avg_keys = [k for k in self.float_keys if k in self.average_keys]
        # FedAvgM without momentum needs no first moment at all (SCAFFOLD's server step uses it so).
        keep_m = self.rule != "sgdm" or self.beta1 != 0.0
        self.m = {k: torch.zeros_like(global_state[k]) for k in self.opt_keys} if keep_m else {}
        adaptive = self.rule != "sgdm"
        self.v = {k: torch.full_like(global_state[k], self.tau**2) for k in self.opt_keys} if adaptive else {}

    def server_step(self, round: int) -> None:
        """Averages buffers, then moves the parameters by the optimizer rule (no-op when nobody trained)."""
        mean = self.weighted_mean()
        if mean is None:
            return
        with torch.no_grad():
            copy_tensors_([self.global_state[k] for k in self.avg_keys], [mean[k] for k in self.avg_keys])
            for k in self.other_keys:
                self.global_state[k].copy_(mean[k].round().to(self.global_state[k].dtype))
            if not self.opt_keys:
                return
            x = [self.global_state[k] for k in self.opt_keys]
            target = [mean[k].to(t.dtype) for k, t in zip(self.opt_keys, x)]
            delta = torch._foreach_sub(target, x)
            lr = self.round_lr(round)
            if self.rule == "sgdm":
                self._momentum_step(x, target, delta, lr)
            else:
                self._adaptive_step(x, delta, lr)

    def round_lr(self, round: int) -> float:
        """The server learning rate of ``round`` (``lr`` without a schedule)."""
        return self.lr if self.lr_schedule is None else self.lr_schedule(self.lr, round, self.rounds)

    def _momentum_step(self, x: list[Tensor], target: list[Tensor], delta: tuple[Tensor, ...], lr: float) -> None:
        """``x + eta (beta m + Delta)`` written as ``mean + (eta - 1) Delta + eta beta m``: algebraically the
        same, and exactly the weighted mean (FedAvg, bit for bit) when ``eta = 1`` and ``beta = 0``."""
        step = torch._foreach_mul(delta, lr - 1.0)
        m = [self.m[k] for k in self.opt_keys] if self.m else []
        if m:
            torch._foreach_add_(step, m, alpha=lr * self.beta1)
            torch._foreach_mul_(m, self.beta1)
            torch._foreach_add_(m, delta)
        copy_tensors_(x, torch._foreach_add(target, step))

    def _adaptive_step(self, x: list[Tensor], delta: tuple[Tensor, ...], lr: float) -> None:
        """Reddi et al. Algorithm 2: first moment, Adagrad/Adam/Yogi second moment, ``x += eta m/(sqrt v + tau)``."""
        m = [self.m[k] for k in self.opt_keys]
        v = [self.v[k] for k in self.opt_keys]
        torch._foreach_mul_(m, self.beta1)
        torch._foreach_add_(m, delta, alpha=1.0 - self.beta1)
        sq = torch._foreach_mul(delta, delta)
        if self.rule == "adagrad":
            torch._foreach_add_(v, sq)
        elif self.rule == "adam":
            torch._foreach_mul_(v, self.beta2)
            torch._foreach_add_(v, sq, alpha=1.0 - self.beta2)
        else:  # yogi: v - (1 - beta2) Delta^2 sign(v - Delta^2)
            sign = torch._foreach_sub(v, sq)
            torch._foreach_sign_(sign)
            torch._foreach_mul_(sign, sq)
            torch._foreach_add_(v, sign, alpha=-(1.0 - self.beta2))
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.tau)
        torch._foreach_add_(x, torch._foreach_div(m, denom), alpha=lr)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["server_opt"] = {
            "m": {k: t.detach().cpu().clone() for k, t in self.m.items()},
            "v": {k: t.detach().cpu().clone() for k, t in self.v.items()},
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        opt = state["server_opt"]
        with torch.no_grad():
            for name in ("m", "v"):
                mine: dict[str, Tensor] = getattr(self, name)
                if set(opt[name]) != set(mine):
                    raise ValueError(f"server optimizer state {name!r} does not match this model's parameters")
                for k, t in opt[name].items():
                    mine[k].copy_(t)


def _check_hparams(lr: float, beta1: float, beta2: float, tau: float, adaptive: bool) -> None:
    if lr <= 0:
        raise ValueError(f"server lr must be > 0, got {lr}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 / server momentum must be in [0, 1), got {beta1}")
    if adaptive and not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    if adaptive and tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")


class ServerOptMethod(FedAvg):
    """FedAvg clients with a server optimizer (the base of FedAvgM, FedAdam, FedYogi and FedAdagrad).

    Subclasses set ``rule`` and expose the hyperparameters their paper uses.

    Args:
        server_lr: server learning rate eta.
        beta1: first-moment decay beta_1 (server momentum beta for ``sgdm``).
        beta2: second-moment decay beta_2.
        tau: adaptivity tau.
        server_lr_schedule: the server learning rate per round, ``server_lr * factor(round, rounds)``
            (:mod:`fedlt.schedules`; ``None``: constant).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    rule: ClassVar[str] = "adam"

    def __init__(self, server_lr: float, beta1: float, beta2: float = 0.99, tau: float = 1e-3,
                 server_lr_schedule: Schedule | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_lr_schedule = server_lr_schedule
        _check_hparams(server_lr, beta1, beta2, tau, adaptive=self.rule != "sgdm")
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def round_metrics(self, round: int) -> dict[str, float]:
        metrics = super().round_metrics(round)
        if self.server_lr_schedule is not None:
            metrics["train/server_lr"] = self.server_lr_schedule(self.server_lr, round, self.run.rounds)
        return metrics

    def configure_reducer(self) -> Reducer:
        return ServerOptReducer(self.rule, self.server_lr, self.beta1, self.beta2, self.tau,
                                average_keys=buffer_keys(self.model), lr_schedule=self.server_lr_schedule,
                                rounds=self.run.rounds)
