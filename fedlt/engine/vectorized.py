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

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedlt.engine.faults import failpoint
from fedlt.methods.base import Reducer
from fedlt.types import ClientContext, ClientUpdate, ServerMessage

if TYPE_CHECKING:
    from fedlt.engine.simulator import Simulator

_MODEL = "model."


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
    if method.momentum < 0 or method.weight_decay < 0:
        raise VectorizationError("trainer.vectorize_cohort: momentum and weight decay must be >= 0")


class VectorizedCohort:
    """Trains a list of clients of one round together (see the module docstring)."""

    def __init__(self, sim: Simulator) -> None:
        check_vectorizable(sim)
        self.sim = sim

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
        personal = [n for n in stacked if n in set(getattr(sim.method, "personal_keys", ()))]
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

    def _loop(self, stacked: dict[str, Tensor], fixed: dict[str, Tensor], contexts: list[ClientContext],
              plans: list[list[Tensor]], message: ServerMessage) -> list[list[dict[str, Tensor]]]:
        """All clients' local steps: per step, one vmapped gradient per group of clients with equal batch sizes."""
        sim, method, model = self.sim, self.sim.method, self.sim.model
        global_params = {n: message.state[n] for n in stacked if n in message.state}
        rnd = message.round

        def objective(params: dict[str, Tensor], x: Tensor, y: Tensor, counts: Tensor) -> tuple[Tensor, dict]:
            logits = functional_call(model, {**params, **fixed}, (x,))
            loss = method.loss(logits, y, counts, rnd)
            penalty = method.vectorized_penalty(params, global_params)
            if penalty is None:  # the loss parts the sequential training step logs
                return loss, {"loss": loss.detach()}
            term, logged = penalty
            total = loss + term
            return total, {"loss": total.detach(), "ce": loss.detach(), **{k: v.detach() for k, v in logged.items()}}

        forward = vmap(objective)  # per-client losses of one group; autograd then gives each client its gradient

        def step(params: dict[str, Tensor], x: Tensor, y: Tensor, counts: Tensor) -> tuple[dict, dict]:
            leaves = {n: v.requires_grad_() for n, v in params.items()}
            totals, values = forward(leaves, x, y, counts)
            # Client i's loss depends on its own slice only, so the gradient of the sum is every client's own.
            grads = torch.autograd.grad(totals.sum(), list(leaves.values()))
            return dict(zip(leaves, grads)), values

        momentum: dict[str, Tensor] = {}
        losses: list[list[dict[str, Tensor]]] = [[] for _ in contexts]
        data, train = sim.data, sim.data.train
        for t in range(max(len(p) for p in plans)):
            groups: dict[int, list[int]] = {}  # batch size -> the clients (rows) with a batch of that size
            for i, plan in enumerate(plans):
                if t < len(plan):
                    groups.setdefault(int(plan[t].numel()), []).append(i)
            for group in groups.values():
                batches = [data.get_batch(train, plans[i][t], contexts[i].generator, train=True) for i in group]
                rows = torch.tensor(group, device=sim.device)
                params = {n: v[rows] for n, v in stacked.items()}
                counts = torch.stack([contexts[i].class_counts for i in group])
                grads, values = step(params, torch.stack([b[0] for b in batches]),
                                     torch.stack([b[1] for b in batches]), counts)
                self._sgd(stacked, momentum, params, grads, rows, first=t == 0)
                for row, i in enumerate(group):
                    losses[i].append({key: v[row] for key, v in values.items()})
        return losses

    def _fold(self, clients: list[int], stacked: dict[str, Tensor], fixed: dict[str, Tensor],
              contexts: list[ClientContext], losses: list[list[dict[str, Tensor]]]
              ) -> list[tuple[dict[str, Tensor], int]]:
        """Every client's upload into the reducer and its personal parameters into the store."""
        sim = self.sim
        personal = [n for n in stacked if n in set(getattr(sim.method, "personal_keys", ()))]
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
            stacked[n][rows] = p - method.lr * d

