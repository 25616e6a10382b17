"""Vectorized cohorts: a rank trains its clients of a round simultaneously instead of one after another.

Every client's trainable parameters are stacked along a new leading dimension; one forward pass
(``torch.func.functional_call`` under ``vmap``) and one backward pass compute all clients' gradients of a step at
once, and the SGD step (momentum, weight decay, gradient-norm clipping) is applied to the stacked tensors. Each
client keeps its own generator-driven batch stream, exactly the one the sequential engine draws (the same
``batch_indices`` and augmentation draws from the same seed), so the results equal the sequential engine's up to
float rounding (the batched kernels sum in another order). Clients whose batches of a step differ in size are
grouped by size (the last batch of an epoch is smaller); a client with fewer steps simply stops. The per-client
results are folded into the same reducer as the sequential engine's uploads, and personal parameters (FedPer's head)
are loaded from and stored to the client store.

Supported: methods that declare ``vectorizable = True`` in their own class body (FedAvg, FedProx, FedPer,
FedFocal, FedLC: the default training step, a loss of (logits, labels, class counts), one SGD optimizer over the
trainable parameters, and optionally :meth:`~fedlt.methods.base.FedMethod.vectorized_penalty`), on models without
BatchNorm (its running statistics are a per-client, in-place update) and without active dropout (its random
stream is the global RNG's, per client), in 32-bit precision. Anything else is refused up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedlt.engine.faults import failpoint
from fedlt.methods.base import FedMethod, Reducer
from fedlt.types import ClientContext, ClientUpdate, ServerMessage

if TYPE_CHECKING:
    from fedlt.engine.simulator import Simulator

_MODEL = "model."


def _penalties(method: FedMethod, params: dict[str, Tensor], global_params: dict[str, Tensor],
               k: int) -> list[tuple[Tensor, dict[str, Tensor]]] | None:
    """Each of the ``k`` stacked clients' ``vectorized_penalty``; None when the method has none this round (a
    penalty whose coefficient is 0 returns None, as FedProx with ``mu = 0``)."""
    terms = []
    for i in range(k):
        term = method.vectorized_penalty({n: v[i] for n, v in params.items()}, global_params)
        if term is None:
            return None
        terms.append(term)
    return terms


class VectorizationError(ValueError):
    """The method, model or precision cannot train a cohort vectorized (the message says why)."""


def check_vectorizable(sim: Simulator) -> None:
    """Raises :class:`VectorizationError` unless the simulator's method and model support vectorized cohorts."""
    method, model = sim.method, sim.model
    name = type(method).__name__
    if not type(method).__dict__.get("vectorizable", False):
        raise VectorizationError(
            f"trainer.vectorize_cohort: {name} does not declare support for vectorized cohorts (supported: the "
            "methods whose class sets vectorizable = True, e.g. FedAvg, FedProx, FedPer, FedFocal, FedLC); "
            "set trainer.vectorize_cohort false")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise VectorizationError("trainer.vectorize_cohort: the model has BatchNorm layers (per-client running "
                                     "statistics); use a model without them or set trainer.vectorize_cohort false")
        if isinstance(module, nn.Dropout) and module.p > 0:
            raise VectorizationError("trainer.vectorize_cohort: the model has active dropout; use a model without "
                                     "it or set trainer.vectorize_cohort false")
    if sim.precision != "32-true":
        raise VectorizationError(f"trainer.vectorize_cohort needs trainer.precision 32-true, got {sim.precision}")
    if getattr(method, "lightning", None) is not None:
        raise VectorizationError("trainer.vectorize_cohort: a LightningModule's own training_step cannot be "
                                 "vectorized; set trainer.vectorize_cohort false")
    if method.local_lr_schedule is not None:
        raise VectorizationError("trainer.vectorize_cohort: a local_lr_schedule (within a client's steps) is not "
                                 "supported vectorized; use lr_schedule (per round) or set trainer.vectorize_cohort "
                                 "false")
    if method.momentum < 0 or method.weight_decay < 0:
        raise VectorizationError("trainer.vectorize_cohort: momentum and weight decay must be >= 0")


# Layers a stacked forward can run on inputs of shape (K * B, ...) (client-major): elementwise or per-sample, or
# Linear / Conv2d, which get the clients' stacked weights (batched matmul, grouped convolution).
_PER_SAMPLE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
               nn.AdaptiveAvgPool2d, nn.Identity, nn.Sequential, nn.Dropout)


class _StackedLinear(nn.Module):
    """``nn.Linear`` with one weight per client: the input's leading dimension is client-major (K * B rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        assert self.weight is not None
        k = self.weight.shape[0]
        flat = x.reshape(k, -1, x.shape[-1])  # (K, B * ..., in)
        if self.bias is None:
            out = torch.bmm(flat, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class _StackedConv2d(nn.Module):
    """``nn.Conv2d`` with one weight per client, as a grouped convolution over the clients' channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        assert self.weight is not None
        k, o = self.weight.shape[0], self.weight.shape[1]
        n, c, h, w = x.shape
        grouped = x.view(k, n // k, c, h, w).transpose(0, 1).reshape(n // k, k * c, h, w)
        bias = self.bias.reshape(k * o) if self.bias is not None else None
        out = torch.nn.functional.conv2d(grouped, self.weight.reshape(k * o, *self.weight.shape[2:]), bias,
                                         self.stride, self.padding, self.dilation, self.groups * k)
        return out.view(n // k, k, o, *out.shape[2:]).transpose(0, 1).reshape(n, o, *out.shape[2:])


def stacked_forward_model(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]] | None:
    """A copy of ``model`` whose Linear and Conv2d layers take stacked per-client weights, with the layer of each
    parameter name; ``None`` when the model does not declare a per-sample forward (``stackable_forward``) or has a
    layer a stacked forward cannot run (then the engine uses ``torch.func.vmap``)."""
    import copy

    if not getattr(type(model), "stackable_forward", False):
        return None
    clone = copy.deepcopy(model)
    owners: dict[str, nn.Module] = {}
    for name, module in list(clone.named_modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                return None
            layer = _StackedLinear() if isinstance(module, nn.Linear) else _StackedConv2d(module)
            parent_name, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent_name) if parent_name else clone, attr, layer)
            for pname in ("weight", "bias"):
                if getattr(module, pname, None) is not None:
                    owners[f"{name}.{pname}" if name else pname] = layer
        elif name and not isinstance(module, _PER_SAMPLE):
            return None
    if any(True for _ in clone.buffers()):
        return None
    return clone, owners


class VectorizedCohort:
    """Trains a list of clients of one round together (see the module docstring)."""

    def __init__(self, sim: Simulator) -> None:
        check_vectorizable(sim)
        self.sim = sim
        self._stacked_model = stacked_forward_model(sim.model)

    def train(self, clients: list[int], message: ServerMessage) -> list[tuple[dict[str, Tensor], int]]:
        """Local training of ``clients`` (this rank's part of the cohort); folds their updates into the reducer,
        stores their personal parameters and returns each client's (loss sums, steps) as the sequential engine."""
        if not clients:
            return []
        stacked, fixed = self._stack(clients)
        contexts, plans = self._plans(clients, message)
        losses = self._loop(stacked, fixed, contexts, plans, message)
        return self._fold(clients, stacked, fixed, contexts, losses)

    def _stack(self, clients: list[int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The trainable parameters stacked over clients (global values; each client's own personal ones), and
        the model's other tensors (frozen parameters, buffers), shared by all."""
        sim, model = self.sim, self.sim.model
        sim.load_global()
        named = dict(model.named_parameters())
        fixed = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        fixed.update(dict(model.named_buffers()))
        k = len(clients)
        stacked = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in named.items() if p.requires_grad}
        personal = [n for n in stacked if n in set(sim.method.personal_keys)]
        for i, cid in enumerate(clients):
            stored = sim.store.get(cid) if personal else {}
            for n in personal:
                stacked[n][i].copy_(stored.get(_MODEL + n, sim._default_personal[n]))
        return stacked, fixed

    def _plans(self, clients: list[int], message: ServerMessage) -> tuple[list[ClientContext], list[list[Tensor]]]:
        """Each client's context (its generator seeded as the sequential engine seeds it) and batch index plan."""
        sim, method = self.sim, self.sim.method
        contexts, plans = [], []
        for cid in clients:
            seed = sim.client_seed_fn(sim.seed, message.round, cid)
            ctx = ClientContext(client_id=cid, round=message.round, num_samples=sim._sizes[cid],
                                class_counts=sim._class_counts[cid], generator=torch.Generator().manual_seed(seed),
                                device=sim.device, message=message, state={})
            contexts.append(ctx)
            plans.append(sim.trainer.batch_indices(sim.data.client_indices[cid], ctx, method.batch_size,
                                                   method.local_epochs, method.local_steps))
        return contexts, plans

    def _vmapped_forward(self, fixed: dict[str, Tensor], global_params: dict[str, Tensor], rnd: int) -> Callable:
        """``(params, x, y, counts) -> (totals (k,), logged parts)`` for any model: ``functional_call`` under
        ``vmap``."""
        method, model = self.sim.method, self.sim.model

        def objective(params: dict[str, Tensor], x: Tensor, y: Tensor, counts: Tensor) -> tuple[Tensor, dict]:
            logits = functional_call(model, {**params, **fixed}, (x,))
            loss = method.loss(logits, y, counts, rnd)
            penalty = method.vectorized_penalty(params, global_params)
            if penalty is None:  # the loss parts the sequential training step logs
                return loss, {"loss": loss.detach()}
            term, logged = penalty
            total = loss + term
            return total, {"loss": total.detach(), "ce": loss.detach(), **{k: v.detach() for k, v in logged.items()}}

        return vmap(objective)

    def _stacked_forward(self, fixed: dict[str, Tensor], global_params: dict[str, Tensor], rnd: int) -> Callable:
        """The same for a model with a per-sample forward: the model's own forward on (k * B, ...) inputs with its
        Linear / Conv2d layers on the stacked weights (batched matmuls, grouped convolutions), each client's loss
        from ``Loss.per_client``: no ``vmap`` dispatch on the hot path."""
        method = self.sim.method
        assert self._stacked_model is not None
        clone, owners = self._stacked_model
        penalized = type(method).vectorized_penalty is not FedMethod.vectorized_penalty

        def forward(params: dict[str, Tensor], x: Tensor, y: Tensor, counts: Tensor) -> tuple[Tensor, dict]:
            k, b = x.shape[0], x.shape[1]
            for name, layer in owners.items():
                v = params[name] if name in params else fixed[name].unsqueeze(0).expand(k, *fixed[name].shape)
                setattr(layer, name.rpartition(".")[2], v)
            logits = clone(x.reshape(k * b, *x.shape[2:])).view(k, b, -1)
            loss = method.loss.per_client(logits, y, counts, rnd)
            terms = _penalties(method, params, global_params, k) if penalized else None
            if terms is None:
                return loss, {"loss": loss.detach()}
            total = loss + torch.stack([t[0] for t in terms])
            logged = {key: torch.stack([t[1][key] for t in terms]).detach() for key in terms[0][1]}
            return total, {"loss": total.detach(), "ce": loss.detach(), **logged}

        return forward

    def _loop(self, stacked: dict[str, Tensor], fixed: dict[str, Tensor], contexts: list[ClientContext],
              plans: list[list[Tensor]], message: ServerMessage) -> list[list[dict[str, Tensor]]]:
        """All clients' local steps: per step, one batched gradient per group of clients with equal batch sizes."""
        sim = self.sim
        global_params = {n: message.state[n] for n in stacked if n in message.state}
        build = self._stacked_forward if self._stacked_model is not None else self._vmapped_forward
        forward = build(fixed, global_params, message.round)

        def step(params: dict[str, Tensor], x: Tensor, y: Tensor, counts: Tensor) -> tuple[dict, dict]:
            leaves = {n: v.requires_grad_() for n, v in params.items()}
            totals, values = forward(leaves, x, y, counts)
            # Client i's loss depends on its own slice only, so the gradient of the sum is every client's own.
            grads = torch.autograd.grad(totals.sum(), list(leaves.values()))
            return dict(zip(leaves, grads)), values

        momentum: dict[str, Tensor] = {}
        losses: list[list[dict[str, Tensor]]] = [[] for _ in contexts]
        data, train = sim.data, sim.data.train
        everyone = list(range(len(contexts)))
        counts_all = torch.stack([c.class_counts for c in contexts])
        for t in range(max(len(p) for p in plans)):
            groups: dict[int, list[int]] = {}  # batch size -> the clients (rows) with a batch of that size
            for i, plan in enumerate(plans):
                if t < len(plan):
                    groups.setdefault(int(plan[t].numel()), []).append(i)
            for group in groups.values():
                batches = [data.get_batch(train, plans[i][t], contexts[i].generator, train=True) for i in group]
                x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
                if group == everyone:  # the usual case: every client steps, on the stacked tensors themselves
                    grads, values = step(stacked, x, y, counts_all)
                    for v in stacked.values():
                        v.requires_grad_(False)
                    self._sgd_all(stacked, momentum, grads, first=t == 0)
                else:
                    rows = torch.tensor(group, device=sim.device)
                    params = {n: v[rows] for n, v in stacked.items()}
                    grads, values = step(params, x, y, counts_all[rows])
                    self._sgd(stacked, momentum, params, grads, rows, first=t == 0)
                parts = {key: v.unbind(0) for key, v in values.items()}
                for row, i in enumerate(group):
                    losses[i].append({key: v[row] for key, v in parts.items()})
        return losses

    def _fold(self, clients: list[int], stacked: dict[str, Tensor], fixed: dict[str, Tensor],
              contexts: list[ClientContext], losses: list[list[dict[str, Tensor]]]
              ) -> list[tuple[dict[str, Tensor], int]]:
        """Every client's upload into the reducer and its personal parameters into the store."""
        sim = self.sim
        personal = [n for n in stacked if n in set(sim.method.personal_keys)]
        stacked_fold = type(sim.reducer).accumulate is Reducer.accumulate and not sim.reducer.extra_shapes
        if stacked_fold:  # one exact accumulation of every client's term (the same bits as one call per client)
            for _ in clients:
                failpoint("client.end")
            shared = {key: stacked[key] if key in stacked else fixed[key].unsqueeze(0).expand(len(clients),
                                                                                               *fixed[key].shape)
                      for key in sim.method.shared_tensors}
            weights = torch.tensor([float(c.num_samples) for c in contexts], dtype=torch.float64)
            sim.reducer.accumulate_stacked(weights, shared)
        out = []
        for i, cid in enumerate(clients):
            if not stacked_fold:
                failpoint("client.end")
                tensors = {key: stacked[key][i] if key in stacked else fixed[key]
                           for key in sim.method.shared_tensors}
                sim.reducer.accumulate(ClientUpdate(client_id=cid, weight=float(contexts[i].num_samples),
                                                    tensors=tensors))
            if personal:
                sim.store.put(cid, {_MODEL + n: stacked[n][i] for n in personal})
            records = losses[i]
            sums = {key: torch.stack([r[key].float() for r in records]).sum() for key in records[0]} if records else {}
            out.append((sums, len(records)))
        return out

    @torch.no_grad()
    def _sgd_all(self, stacked: dict[str, Tensor], momentum: dict[str, Tensor], grads: dict[str, Tensor],
                 first: bool) -> None:
        """:meth:`_sgd` when every client steps: in place on the stacked tensors (no row gathers)."""
        method = self.sim.method
        names = list(grads)
        ps, gs = [stacked[n] for n in names], [grads[n] for n in names]
        if method.grad_clip:
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in gs], 1).norm(dim=1)
            scale = (method.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            gs = [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in gs]
        if method.weight_decay:
            gs = list(torch._foreach_add(gs, ps, alpha=method.weight_decay))
        if method.momentum:
            if first or names[0] not in momentum:
                bufs = [g.clone() for g in gs]
                momentum.update(zip(names, bufs))
            else:
                bufs = [momentum[n] for n in names]
                torch._foreach_mul_(bufs, method.momentum)
                torch._foreach_add_(bufs, gs)
            gs = bufs
        torch._foreach_add_(ps, gs, alpha=-method.current_lr)

    @torch.no_grad()
    def _sgd(self, stacked: dict[str, Tensor], momentum: dict[str, Tensor], params: dict[str, Tensor],
             grads: dict[str, Tensor], rows: Tensor, first: bool) -> None:
        """``torch.optim.SGD`` (no dampening, no Nesterov) with the method's lr, momentum, weight decay and
        gradient-norm clip, on the stacked rows ``rows``; each client's momentum buffer starts at its first step."""
        method = self.sim.method
        if method.grad_clip:
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
            scale = (method.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            grads = {n: g * scale.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}
        for n, g in grads.items():
            p = params[n]
            d = g + method.weight_decay * p if method.weight_decay else g
            if method.momentum:
                if first or n not in momentum:
                    momentum.setdefault(n, torch.zeros_like(stacked[n]))
                    buf = d.clone()
                else:
                    buf = method.momentum * momentum[n][rows] + d
                momentum[n][rows] = buf
                d = buf
            stacked[n][rows] = p - method.current_lr * d

