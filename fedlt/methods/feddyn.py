"""FedDyn (federated dynamic regularization).

Paper: D. A. E. Acar, Y. Zhao, R. M. Navarro, M. Mattina, P. N. Whatmough, V. Saligrama, "Federated Learning Based on
Dynamic Regularization", ICLR 2021, arXiv:2111.04263 (Algorithm 1; official code: alpemreacar/FedDyn).

Client k of round t (its gradient state g_k = grad L_k(theta_k^{t-1}), zeros the first time it is seen; theta^{t-1}
from the broadcast): local SGD from theta^{t-1} on the dynamically regularized objective
L_k(theta) - <g_k, theta> + (alpha/2) ||theta - theta^{t-1}||^2, then the first-order condition of that objective
updates the state, g_k <- g_k - alpha (theta_k^t - theta^{t-1}), kept in the client's persistent state. It uploads
theta_k^t (as FedAvg) and Delta_k = theta_k^t - theta^{t-1} (an extra, summed exactly).
Server (state h, zeros at the start, checkpointed with the reducer): h^t = h^{t-1} - alpha (1/m) sum_{k in P_t}
Delta_k with m the total number of clients, then theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - (1/alpha) h^t.
The linear term, the penalty and h cover the trainable shared parameters; BatchNorm running statistics take the plain
mean of the cohort (integer buffers rounded), as in SCAFFOLD.
Hyperparameters (paper symbol): ``alpha`` (alpha, default 0.01, the value of both example scripts of the official
code; paper grid {0.1, 0.01, 0.001}), ``weighted`` (how the client models are averaged), ``eval_model`` (which model
GM/PM evaluate), plus FedAvg's local arguments (``lr``, ``local_epochs``, ``batch_size``, ``weight_decay``; the
code's local optimizer is plain SGD, fresh every round). ``lr_schedule: Exponential`` gives the code's
``lr_decay_per_round``.

Paper vs released code (``FedDyn.released_code``; the rest of the code is the paper's: the unweighted mean over the
active clients, m = all clients, h the mean over *all* clients of their accumulated Delta_k, h^0 = 0; weight decay
is SGD weight decay on the local objective and so part of L_k, its state update uses the model difference):
- ``adaptive_alpha=True``: the code scales alpha per client by its data size, alpha_k = alpha / w_k with
  w_k = n_k K / sum_j n_j (K clients; w_k = 1 on balanced data), in the client's objective and its state update
  g_k <- g_k - alpha_k Delta_k; the server update keeps alpha. Algorithm 1 has one alpha (default false).
- ``quadratic_as_weight_decay=True``: the code writes the penalty as alpha_k <theta, -theta^{t-1}> (and the linear
  term) in the loss plus ``alpha_k`` added to SGD's weight decay, which torch applies after gradient clipping: the
  clip then bounds the gradient of L_k plus the linear terms, not the quadratic one. Without clipping the two forms
  are the same update. Default false: the whole objective is the loss (and ``grad_clip`` clips all of it).
- ``grad_clip=10.0``: the code clips every local gradient to L2 norm 10 (``max_norm``); Algorithm 1 does not clip.
- ``eval_model="all_mean"``: the code never evaluates theta^t (it is only broadcast): it reports the plain mean of
  the active clients' models (``avg_model``, its ``*_sel`` curves; ``"cohort_mean"``) and the mean over all clients
  of their latest local models (``all_model``, a never-trained client counting with theta^0; ``"all_mean"``, the
  curve both example scripts plot). Default ``"server"``: GM/PM evaluate theta^t, Algorithm 1's server model. The
  evaluated parameters are server state (checkpointed); buffers are the global ones. ``"all_mean"`` keeps one more
  copy of the trainable parameters per client (its latest model).

Deviations: ``weighted: true`` averages the client models by sample count (fedlt's FedAvg aggregation); the default
is the paper's and the code's uniform mean. The code's local epochs include a trailing batch of one sample, which
fedlt's local loop drops (for every method). The paper assumes exact local minimization; like the code, clients run
``local_epochs`` of SGD.
Memory: every client keeps one copy of the trainable parameters as g_k (two with ``eval_model: all_mean``); use
``client_state: disk`` for large models or many clients.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import functional_call

from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

_G = "feddyn.grad."  # client state: the gradient state g_k
_LAST = "feddyn.last."  # client state (eval_model="all_mean"): the client's latest local model
_DELTA = "d."  # extras: Delta_k = theta_k^t - theta^{t-1}
_DLAST = "dl."  # extras (eval_model="all_mean"): theta_k^t - (the client's previous local model)
EVAL_MODELS = ("server", "cohort_mean", "all_mean")


class FedDynReducer(Reducer):
    """Mean of the client models, the server state ``h`` and the corrected global model ``mean - h / alpha``.

    Args:
        alpha: the server's alpha.
        num_clients: m, the total number of clients.
        param_shapes: shapes of the regularized parameters (by state-dict key).
        eval_model: ``server``, ``cohort_mean`` or ``all_mean`` (which parameters :attr:`eval_params` holds).
    """

    def __init__(self, alpha: float, num_clients: int, param_shapes: dict[str, tuple[int, ...]],
                 eval_model: str = "server") -> None:
        extras = {_DELTA + k: s for k, s in param_shapes.items()}
        if eval_model == "all_mean":
            extras.update({_DLAST + k: s for k, s in param_shapes.items()})
        super().__init__(extras)
        self.alpha = float(alpha)
        self.num_clients = int(num_clients)
        self.param_shapes = dict(param_shapes)
        self.eval_model = eval_model

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        keys = list(self.param_shapes)
        self.h = {k: torch.zeros_like(global_state[k]) for k in keys}
        # The evaluated parameters (eval_model != "server"): theta^0 until a round changes them, as in the code.
        self.eval_params = {k: global_state[k].detach().clone() for k in keys} if self.eval_model != "server" else {}
        self.theta0 = {k: global_state[k].detach().clone() for k in keys} if self.eval_model == "all_mean" else {}

    def server_step(self, round: int) -> None:
        """``h -= (alpha/m) sum Delta_k``; ``theta = mean - h/alpha`` (buffers: the mean; no-op when nobody trained)."""
        mean = self.weighted_mean()
        if mean is None:
            return
        with torch.no_grad():
            keys = list(self.h)
            if keys:
                torch._foreach_add_([self.h[k] for k in keys], [self.extras_sum[_DELTA + k] for k in keys],
                                    alpha=-self.alpha / self.num_clients)
            for k in self.float_keys:
                value = mean[k] - self.h[k] / self.alpha if k in self.h else mean[k]
                self.global_state[k].copy_(value)
            for k in self.other_keys:
                self.global_state[k].copy_(mean[k].round().to(self.global_state[k].dtype))
            if self.eval_model == "cohort_mean":
                for k, v in self.eval_params.items():
                    v.copy_(mean[k])
            elif self.eval_model == "all_mean":
                for k, v in self.eval_params.items():
                    v.add_(self.extras_sum[_DLAST + k], alpha=1.0 / self.num_clients)

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        return {"theta0": self.theta0} if self.theta0 else {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["feddyn"] = {name: {k: v.detach().cpu().clone() for k, v in getattr(self, name).items()}
                           for name in ("h", "eval_params", "theta0")}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for name, saved in state["feddyn"].items():
                mine: dict[str, Tensor] = getattr(self, name)
                if set(saved) != set(mine):
                    raise ValueError(f"FedDyn server state {name!r} does not match this model's parameters")
                for k, v in saved.items():
                    mine[k].copy_(v)


@METHODS.register("feddyn")
class FedDyn(FedAvg):
    """FedAvg with a dynamic linear + quadratic regularizer on every client (Acar et al., 2021).

    Args:
        alpha: the regularization strength alpha > 0.
        adaptive_alpha: scale alpha per client by its relative data size, alpha_k = alpha sum_j n_j / (K n_k)
            (the released code); false: one alpha for every client (the paper).
        quadratic_as_weight_decay: put the quadratic part alpha_k/2 ||theta||^2 of the penalty into SGD's weight
            decay, after gradient clipping (the released code); false: the whole objective is the loss.
        eval_model: what GM/PM evaluate: ``server`` (theta^t, the paper's server model), ``cohort_mean`` (the plain
            mean of the round's client models) or ``all_mean`` (the mean of every client's latest local model).
        weighted: sample-weighted mean of the client models instead of the paper's uniform mean.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Federated Learning Based on Dynamic Regularization",
        venue="ICLR 2021",
        arxiv="2111.04263",
    )
    # The official code's values (github alpemreacar/FedDyn: utils_methods.py train_FedDyn, utils_general.py
    # train_feddyn_mdl and max_norm, example_cifar_10.py).
    released_code: ClassVar[dict[str, Any]] = {"adaptive_alpha": True, "quadratic_as_weight_decay": True,
                                               "grad_clip": 10.0, "eval_model": "all_mean"}

    def __init__(self, alpha: float = 0.01, adaptive_alpha: bool = False, quadratic_as_weight_decay: bool = False,
                 eval_model: str = "server", weighted: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if eval_model not in EVAL_MODELS:
            raise ValueError(f"eval_model must be one of {list(EVAL_MODELS)}, got {eval_model!r}")
        self.alpha = alpha
        self.adaptive_alpha = adaptive_alpha
        self.quadratic_as_weight_decay = quadratic_as_weight_decay
        self.eval_model = eval_model
        self.weighted = weighted
        self._alpha_k = float(alpha)

    @property
    def personalizes(self) -> bool:
        return False  # g_k only steers training; PM is the global model

    def _regularized(self) -> dict[str, Tensor]:
        """The trainable shared parameters (by state-dict key): those the regularizer and h cover."""
        params = dict(self.model.named_parameters())
        return {k: params[k] for k in self.shared_tensors if k in params and params[k].requires_grad}

    def client_state_template(self) -> dict[str, Tensor]:
        params = self._regularized()
        template = {_G + k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        if self.eval_model == "all_mean":
            template.update({_LAST + k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()})
        return template

    def configure_reducer(self) -> Reducer:
        shapes = {k: tuple(p.shape) for k, p in self._regularized().items()}
        self._reducer = FedDynReducer(self.alpha, self.data.num_clients, shapes, self.eval_model)
        return self._reducer

    def client_alpha(self, num_samples: int) -> float:
        """alpha_k of a client with ``num_samples`` training samples (alpha itself unless ``adaptive_alpha``)."""
        if not self.adaptive_alpha or num_samples <= 0:
            return float(self.alpha)
        sizes = [int(i.numel()) for i in self.data.client_indices]
        return float(self.alpha) * sum(sizes) / (len(sizes) * num_samples)

    # -- client half ---------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        x = ctx.message.state
        params = self._regularized()
        self._alpha_k = self.client_alpha(ctx.num_samples)
        self._g = {k: ctx.state.get(_G + k, torch.zeros_like(p, dtype=torch.float32)) for k, p in params.items()}
        # (theta, theta^{t-1}, g_k) for the full objective; with quadratic_as_weight_decay (theta,
        # -(g_k + alpha_k theta^{t-1})) for the linear part the loss keeps
        self._prox = [] if self.quadratic_as_weight_decay else [(p, x[k], self._g[k].to(p.dtype))
                                                                 for k, p in params.items()]
        self._lin = [] if not self.quadratic_as_weight_decay else [
            (p, -(self._g[k] + self._alpha_k * x[k].float()).to(p.dtype)) for k, p in params.items()]
        if self._lin:
            # (alpha_k/2) ||theta^{t-1}||^2: the constant that makes the logged value the regularizer's
            squares = [x[k].double().pow(2).sum() for k in params]
            self._const = (0.5 * self._alpha_k * torch.stack(squares).sum()).float()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        if not self.quadratic_as_weight_decay:
            return super().configure_optimizers()
        regularized = {id(p) for p in self._regularized().values()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in regularized],
                   "weight_decay": self.weight_decay + self._alpha_k}]
        others = [p for p in params if id(p) not in regularized]
        if others:
            groups.append({"params": others, "weight_decay": self.weight_decay})
        return [torch.optim.SGD(groups, lr=self.current_lr, momentum=self.momentum)]

    def penalty(self) -> tuple[Tensor, Tensor]:
        """The regularizer's term in the loss, and its value (alpha_k/2) ||theta - theta^{t-1}||^2 - <g_k, theta>
        (detached). The term is that value, or with ``quadratic_as_weight_decay`` only -<g_k + alpha_k theta^{t-1},
        theta> (SGD's weight decay adds the gradient of the rest)."""
        half = 0.5 * self._alpha_k
        if self._lin:
            term = torch.stack([(p * c).sum() for p, c in self._lin]).sum()
            with torch.no_grad():
                rest = half * torch.stack([p.pow(2).sum() for p, _ in self._lin]).sum() + self._const
            return term, term.detach() + rest
        term = torch.stack([half * (p - x).pow(2).sum() - (p * g).sum() for p, x, g in self._prox]).sum()
        return term, term.detach()

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """The loss plus the regularizer; the logged ``loss`` is the local objective, ``dyn`` the regularizer."""
        out = super().training_step(batch, ctx)
        assert out.loss is not None, "FedDyn adds its regularizer to the step's loss (automatic optimization)"
        if not self._g:
            return out
        term, dyn = self.penalty()
        ce = out.loss.detach()
        return StepOutput(loss=out.loss + term, parts={"loss": ce + dyn, "ce": ce, "dyn": dyn})

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        x = ctx.message.state
        keys = list(self._g)
        with torch.no_grad():
            delta = {k: self.shared_tensors[k] - x[k] for k in keys}
            # g_k <- g_k - alpha_k (theta_k^t - theta^{t-1})
            ctx.state.update({_G + k: self._g[k] - self._alpha_k * delta[k].float() for k in keys})
            extras = {_DELTA + k: delta[k] for k in keys}
            if self.eval_model == "all_mean":
                theta0 = ctx.message.extras["theta0"]
                last = {k: self.shared_tensors[k].detach().float().clone() for k in keys}
                extras.update({_DLAST + k: last[k] - ctx.state.get(_LAST + k, theta0[k].float()) for k in keys})
                ctx.state.update({_LAST + k: v for k, v in last.items()})
        weight = float(ctx.num_samples) if self.weighted else 1.0
        return ClientUpdate(client_id=ctx.client_id, weight=weight, tensors=self.shared_tensors, extras=extras)

    # -- inference -------------------------------------------------------------------------------------------
    def predict_global(self, x: Tensor) -> Tensor:
        """GM logits: theta^t (``eval_model="server"``) or the reducer's mean of client models."""
        if self.eval_model == "server":
            return self.model(x)
        return functional_call(self.model, self._reducer.eval_params, (x,), strict=False)

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        return self.predict_global(x)
