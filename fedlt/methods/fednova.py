"""FedNova (federated normalized averaging).

Paper: J. Wang, Q. Liu, H. Liang, G. Joshi, H. V. Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020, arXiv:2007.07481 (official code: JYWa/FedNova, ``distoptim/FedNova.py``).

Client k: tau_k local steps from theta^t (at fixed ``local_epochs`` tau_k grows with the client's data size n_k)
with the local solver, which fixes the vector a_k of how the local gradients add up in the model change,
theta^t - theta_k = eta G_k a_k; the client counts ||a_k||_1 (a_k below) step by step:
vanilla SGD a_k = tau_k; SGD with momentum rho (``momentum``) a_k = [tau_k - rho (1 - rho^tau_k) / (1 - rho)] /
(1 - rho); proximal SGD (``mu`` > 0, the FedProx term (mu/2) ||theta - theta^t||^2) a_k = [1 - (1 - eta mu)^tau_k] /
(eta mu). It uploads theta_k and the scalars n_k and n_k a_k (n_k tau_k for ``prox_tau_eff``) as extras.
Server: the normalized updates d_k = (theta^t - theta_k) / a_k are averaged with p_k = n_k / sum_{j in S} n_j and
rescaled by tau_eff = sum_k p_k a_k: theta^{t+1} = theta^t - tau_eff sum_k p_k d_k. fedlt computes it as
theta^t + s (M - theta^t), with M the exact (n_k / a_k)-weighted mean of the client models and
s = tau_eff sum_k p_k / a_k (>= 1; 1 when every a_k is the same). The weights are n_k c / a_k with c the a of a
reference client that every rank computes alike (``local_steps`` steps, or ``local_epochs`` passes over the mean
client size), so that with equal local steps (plain SGD or any equal a_k) the weights are FedAvg's n_k, s is 1 and
FedNova is FedAvg bit for bit (tested). Optionally the server then applies FedAvgM's momentum step to the
pseudo-gradient -tau_eff sum_k p_k d_k (``server_lr`` eta_g, ``server_momentum`` beta; 1 and 0 by default, the plain
FedNova update). BatchNorm running statistics are not updates: they take the p_k-weighted mean as in FedAvg (integer
buffers rounded). ``train/tau_eff`` logs tau_eff every round.
Hyperparameters (paper symbol): ``lr`` (eta), ``momentum`` (rho), ``mu`` (mu), ``local_epochs`` (E, tau_k =
E ceil(n_k / B)), ``batch_size`` (B). The released launch script: lr 0.02, momentum 0.9, batch 32, E 2, weight
decay 1e-4 (the code's fixed value), lr / 10 at half the rounds and / 100 at three quarters.

Paper vs released code (``FedNova.released_code``):
- ``prox_tau_eff="steps"``: with the proximal solver (``mu`` > 0) the code rescales by tau_eff = sum_k p_k tau_k,
  the mean number of local steps, instead of sum_k p_k a_k (the paper's, default ``"a"``, also the code's for vanilla
  and momentum SGD). Without ``mu`` the argument does nothing.

Deviations / choices: p_k is normalized over the round's cohort (the code trains every client every round, so its
p_k = n_k / n); a client without a local step uploads nothing. The code's server momentum (``gmf``, 0 in its
launch script) keeps its buffer in units of the local learning rate, which differs from ``server_momentum`` only
when the local lr changes between rounds. The code's ``uniform_random`` pattern (heterogeneous local epochs per
client and round, the paper's other setting) is not simulated: every client runs ``local_epochs``. Momentum
together with the proximal term is refused: the paper gives a_k for each solver alone. With a
``local_lr_schedule`` a_k is still the solver's count (each step's rate enters only the proximal one), as in the
code, whose d_k divides the lr-weighted model change by it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlt.methods._server_opt import ServerOptReducer, buffer_keys
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

_N, _NA, _NT = "nova.n", "nova.na", "nova.nt"  # extras: n_k, n_k a_k / c, n_k tau_k / c
PROX_TAU_EFF = ("a", "steps")


def solver_step(a: float, counter: float, lr: float, momentum: float = 0.0, mu: float = 0.0) -> tuple[float, float]:
    """One local step's change of ||a||_1 (``a``) and of the momentum weight of the newest gradient (``counter``):
    momentum rho: counter <- rho counter + 1, a <- a + counter; proximal: a <- (1 - lr mu) a + 1; vanilla: a <- a + 1.
    Over tau steps this gives the paper's closed forms (tau; [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho);
    [1 - (1 - eta mu)^tau] / (eta mu))."""
    if momentum:
        counter = counter * momentum + 1.0
        return a + counter, counter
    if mu > 0:
        return a * (1.0 - lr * mu) + 1.0, counter
    return a + 1.0, counter


class FedNovaReducer(ServerOptReducer):
    """The normalized average as a server-optimizer target ``theta + s (M - theta)`` (then FedAvgM's rule).

    Clients upload their models with the weight n_k c / a_k (c: :attr:`reference_a`, the same for every client of a
    round, so that it cancels), their buffers times a_k / c (their weighted sum is sum_k n_k buffer_k), and the
    extras n_k, n_k a_k / c and n_k tau_k / c.

    Args:
        server_lr: eta_g (1: the FedNova update itself).
        server_momentum: beta (0: none).
        average_keys: buffers (take the p_k-weighted mean).
        tau_eff_key: the extra that gives tau_eff (``nova.na``: sum_k p_k a_k; ``nova.nt``: sum_k p_k tau_k).
    """

    def __init__(self, server_lr: float, server_momentum: float, average_keys: set[str],
                 tau_eff_key: str = _NA) -> None:
        super().__init__("sgdm", server_lr, beta1=server_momentum, beta2=0.0, tau=1.0, average_keys=average_keys,
                         extras={_N: (1,), _NA: (1,), _NT: (1,)})
        self.tau_eff_key = tau_eff_key
        self.reference_a = 1.0  # c of the current round (set by the method on every rank)
        self.tau_eff = 0.0  # tau_eff of the last round that trained (a train metric)

    def weighted_mean(self) -> dict[str, Tensor] | None:
        """The targets of the server step: ``M + (s - 1)(M - theta)`` for the optimized parameters (M exactly when
        s = 1), the p_k-weighted mean for buffers; ``None`` when no client trained."""
        mean = super().weighted_mean()  # sum_k (n_k c / a_k) theta_k / sum_k (n_k c / a_k)
        n = float(self.extras_sum[_N].item())
        if mean is None or n <= 0:
            return None
        ratio = float(self.extras_sum[self.tau_eff_key].item()) / n  # tau_eff / c
        self.tau_eff = self.reference_a * ratio
        scale = ratio * (float(self.weight_sum.item()) / n)  # s = tau_eff sum_k p_k / a_k: c cancels
        out = dict(mean)
        if self.opt_keys:
            m = [mean[k] for k in self.opt_keys]
            diff = torch._foreach_sub(m, [self.global_state[k].to(v.dtype) for k, v in zip(self.opt_keys, m)])
            out.update(zip(self.opt_keys, torch._foreach_add(m, diff, alpha=scale - 1.0)))
        for k in self.avg_keys + self.other_keys:
            out[k] = self.acc[k] / n  # sum_k n_k buffer_k / sum_k n_k
        return out


@METHODS.register("fednova")
class FedNova(FedAvg):
    """FedAvg with normalized averaging of the local updates (Wang et al., 2020).

    Args:
        mu: the proximal local solver's mu (FedProx's (mu/2) ||theta - theta^t||^2); 0: none.
        prox_tau_eff: tau_eff of the proximal solver: ``a`` (sum_k p_k a_k, the paper) or ``steps`` (sum_k p_k tau_k,
            the released code).
        server_lr: server learning rate eta_g on the FedNova update (1: the update itself).
        server_momentum: server momentum beta on the FedNova update (0: none).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``momentum`` is rho).
    """

    paper = PaperRef(
        title="Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
        venue="NeurIPS 2020",
        arxiv="2007.07481",
    )
    # The official code's value (github JYWa/FedNova, distoptim/FedNova.py, FedNova.average).
    released_code: ClassVar[dict[str, Any]] = {"prox_tau_eff": "steps"}

    def __init__(self, mu: float = 0.0, prox_tau_eff: str = "a", server_lr: float = 1.0, server_momentum: float = 0.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        if mu > 0 and self.momentum:
            raise ValueError("FedNova: the paper's a_k covers momentum SGD or proximal SGD, not both (set momentum "
                             "or mu to 0)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"FedNova needs local momentum in [0, 1), got {self.momentum}")
        if prox_tau_eff not in PROX_TAU_EFF:
            raise ValueError(f"prox_tau_eff must be one of {list(PROX_TAU_EFF)}, got {prox_tau_eff!r}")
        self.mu = mu
        self.prox_tau_eff = prox_tau_eff
        self.server_lr = server_lr
        self.server_momentum = server_momentum

    def configure_reducer(self) -> Reducer:
        self._buffers = [k for k in self.shared_tensors if k in buffer_keys(self.model)]
        key = _NT if self.mu > 0 and self.prox_tau_eff == "steps" else _NA
        self._reducer = FedNovaReducer(self.server_lr, self.server_momentum, set(self._buffers), key)
        return self._reducer

    def begin_round(self, round: int) -> None:
        super().begin_round(round)
        self._reducer.reference_a = self.reference_a(round)

    def reference_a(self, round: int) -> float:
        """c: ||a||_1 of a reference client of ``round`` (``local_steps`` steps, or ``local_epochs`` passes over the
        mean client size), computed step by step as the clients do, so that c / a_k is exactly 1 for a client with
        the reference's steps: with equal steps everywhere the aggregation weights are FedAvg's n_k, bit for bit."""
        steps = self.local_steps
        if steps is None:
            sizes = [int(i.numel()) for i in self.data.client_indices]
            mean = (sum(sizes) + len(sizes) // 2) // max(len(sizes), 1)
            steps = self.local_epochs * self.trainer.batches_per_epoch(torch.empty(mean), self.batch_size)
        schedule, base = self.local_lr_schedule, self.round_lr(round)
        a = counter = 0.0
        for i in range(1, steps + 1):
            lr = base * (schedule.factor(i, steps) if schedule is not None else 1.0)
            a, counter = solver_step(a, counter, lr, self.momentum, self.mu)
        return a if a > 0 else 1.0

    def round_metrics(self, round: int) -> dict[str, float]:
        return {**super().round_metrics(round), "train/tau_eff": self._reducer.tau_eff}

    # -- client half ---------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        self._steps = 0
        self._a = 0.0  # ||a_k||_1, accumulated step by step as the code does
        self._counter = 0.0  # momentum: the weight of the newest gradient in the model change
        if self.mu > 0:
            named = dict(self.model.named_parameters())
            self._prox_pairs = [(named[k], ctx.message.state[k]) for k in self.shared_tensors if k in named]

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        # one optimizer step per training_step (automatic optimization), at the step's rate
        self._steps += 1
        self._a, self._counter = solver_step(self._a, self._counter, self.current_lr, self.momentum, self.mu)
        out = super().training_step(batch, ctx)
        if self.mu == 0:
            return out
        assert out.loss is not None, "FedNova adds its proximal term to the step's loss (automatic optimization)"
        prox = torch.stack([(p - g).pow(2).sum() for p, g in self._prox_pairs]).sum()
        loss = out.loss + 0.5 * self.mu * prox
        return StepOutput(loss=loss, parts={"loss": loss.detach(), "ce": out.loss.detach(), "prox": prox.detach()})

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        if self._steps == 0 or self._a <= 0:  # nothing learned: no share of the update
            return ClientUpdate(client_id=ctx.client_id, weight=0.0, tensors=self.shared_tensors)
        n, c = float(ctx.num_samples), self._reducer.reference_a
        up = self._a / c  # exactly 1.0 when a_k = c
        ref = next(iter(self.shared_tensors.values()))
        scalars = {_N: n, _NA: n * up, _NT: n * (self._steps / c)}
        extras = {k: torch.full((1,), v, dtype=torch.float64, device=ref.device) for k, v in scalars.items()}
        tensors = dict(self.shared_tensors)
        with torch.no_grad():  # weight * (buffer * a_k / c) = n_k buffer_k: buffers keep the p_k-weighted mean
            tensors.update({k: self.shared_tensors[k].float() * up for k in self._buffers})
        return ClientUpdate(client_id=ctx.client_id, weight=n * (c / self._a), tensors=tensors, extras=extras)
