"""The ONLY per-batch training loop in fedlt.

A client's local fit: shuffle its indices with its own generator, cut mini-batches, call the method's
``training_step`` under the precision context, and (with automatic optimization) backward and step. Methods
with ``automatic_optimization = False`` call :meth:`LocalTrainer.backward` and :meth:`LocalTrainer.step`
themselves, so that precision (gradient scaling) and gradient clipping stay correct everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedlt.types import ClientContext, StepOutput

if TYPE_CHECKING:
    from fedlt.methods.base import FedMethod


class NonFiniteLossError(RuntimeError):
    """A client's loss became NaN or infinite; the message names the round and the client."""


class LocalTrainer:
    """Runs local fits on one rank.

    Args:
        data: the federated dataset (``train``, ``get_batch``).
        fabric: the Fabric object providing ``autocast``; ``None`` runs in plain float32.
        precision: Fabric precision string; ``16-mixed`` on CUDA uses a gradient scaler.
    """

    def __init__(self, data: Any, fabric: Any = None, precision: str = "32-true") -> None:
        self.data = data
        self.fabric = fabric
        use_scaler = precision.startswith("16") and fabric is not None and fabric.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    # -- helpers for methods that optimize manually -------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context for forward passes."""
        return self.fabric.autocast() if self.fabric is not None else contextlib.nullcontext()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` with gradient scaling when the precision needs it."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(**kwargs)

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
             update_scaler: bool = True) -> None:
        """Unscales, clips (global L2 norm ``grad_clip``), steps and zeroes ``optimizer``.

        With several optimizers stepping on one backward pass, pass ``update_scaler=False`` to all but the last
        so the gradient scaler is updated once per step.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            if update_scaler:
                self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- the loop --------------------------------------------------------------------------------------
    def _orders(self, indices: Tensor, ctx: ClientContext) -> Iterator[Tensor]:
        """Endless reshuffled passes over the client's indices, drawn from the client's generator."""
        n = int(indices.numel())
        while True:
            yield indices[torch.randperm(n, generator=ctx.generator).to(indices.device, non_blocking=True)]

    def batch_indices(self, indices: Tensor, ctx: ClientContext, batch_size: int, epochs: int,
                      steps: int | None = None) -> list[Tensor]:
        """The client's mini-batch index tensors: ``epochs`` shuffled passes, or exactly ``steps`` batches
        (cycling through reshuffled passes) when ``steps`` is given. A trailing batch of one sample is dropped
        (BatchNorm cannot normalise it) unless the client has a single sample."""
        n = int(indices.numel())
        if n == 0:
            return []
        out: list[Tensor] = []
        for order in self._orders(indices, ctx):
            chunks = list(order.split(batch_size))
            if n > 1 and chunks[-1].numel() == 1:
                chunks.pop()
            out.extend(chunks)
            if steps is None and len(out) >= epochs * len(chunks):
                return out
            if steps is not None and len(out) >= steps:
                return out[:steps]
        return out

    def run(self, batches: Iterable[tuple[Tensor, ...]], step_fn: Callable[[tuple[Tensor, ...]], StepOutput],
            optimizers: Sequence[torch.optim.Optimizer], grad_clip: float | None = None,
            automatic: bool = True, lr_factors: Sequence[float] | None = None,
            method: FedMethod | None = None) -> list[dict[str, Tensor]]:
        """The per-batch loop itself: ``step_fn`` under the precision context, then (``automatic``) backward and
        one step of every optimizer. Local training (:meth:`fit`) and every other optimisation over a client's
        batches (e.g. FedBABU/FedETF personal fine-tuning) go through here.

        ``lr_factors`` (one per batch) scale every optimizer's learning rates, relative to the values they start
        with, before each step (a local learning-rate schedule); ``method.current_lr`` then follows them too.

        Returns:
            The per-step loss parts.
        """
        records: list[dict[str, Tensor]] = []
        last = len(optimizers) - 1
        groups = [g for opt in optimizers for g in opt.param_groups] if lr_factors is not None else []
        base = [g["lr"] for g in groups]
        for i, batch in enumerate(batches):
            if lr_factors is not None:
                for g, lr in zip(groups, base):
                    g["lr"] = lr * lr_factors[i]
                if method is not None:
                    method._local_factor = lr_factors[i]
            with self.autocast():
                out = step_fn(batch)
            if automatic:
                assert out.loss is not None, "training_step must return a loss with automatic optimization"
                self.backward(out.loss)
                for i, opt in enumerate(optimizers):
                    self.step(opt, grad_clip, update_scaler=i == last)
            records.append(out.parts or {"loss": out.loss})
        return records

    def fit(self, method: FedMethod, ctx: ClientContext, indices: Tensor) -> tuple[dict[str, Tensor], int]:
        """Runs one client's local training.

        Returns:
            (sums of each loss part over steps, number of steps). The caller divides to get means.
        """
        optimizers = method.configure_optimizers()
        method._optimizers = optimizers
        data, train, gen = self.data, self.data.train, ctx.generator
        order = self.batch_indices(indices, ctx, method.batch_size, method.local_epochs, method.local_steps)
        batches = (data.get_batch(train, idx, gen, train=True) for idx in order)
        schedule = method.local_lr_schedule
        factors = [schedule.factor(i, len(order)) for i in range(1, len(order) + 1)] if schedule else None
        try:
            records = self.run(batches, lambda b: method.training_step(b, ctx), optimizers, method.grad_clip,
                               method.automatic_optimization, lr_factors=factors, method=method)
        finally:
            method._local_factor = 1.0
        method._optimizers = []
        if not records:
            return {}, 0
        # One stack per part and client (not one add per step): the loop stays free of bookkeeping.
        if len(records) == 1:
            return {k: v.detach().float() for k, v in records[0].items()}, 1
        sums = {k: torch.stack([r[k].detach() for r in records]).float().sum() for k in records[0]}
        return sums, len(records)
