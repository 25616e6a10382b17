"""The ONLY per-batch training loop in fedlt.

A client's local fit: shuffle its indices with its own generator, cut mini-batches, call the method's
``training_step`` under the precision context, and (with automatic optimization) backward and step. Methods
with ``automatic_optimization = False`` call :meth:`LocalTrainer.backward` and :meth:`LocalTrainer.step`
themselves, so that precision (gradient scaling) and gradient clipping stay correct everywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedlt.errors import ConfigError
from fedlt.types import ClientContext, StepOutput

if TYPE_CHECKING:
    from fedlt.methods.base import FedMethod


class NonFiniteLossError(RuntimeError):
    """A client's loss became NaN or infinite; the message names the round and the client."""


COUNT = "#n"  # suffix of a logged value's step count in a local fit's sums (values logged on some steps only)


class ClientOptimizer(torch.optim.Optimizer):
    """An optimizer of a client's local fit as a method sees it through ``self.optimizers()`` (Lightning's
    manual optimization): :meth:`step` unscales the gradients (``16-mixed``), clips them to the method's
    ``grad_clip`` and steps; :meth:`zero_grad` is torch's. It is a view of the wrapped optimizer (its
    ``param_groups`` and ``state``), an ``Optimizer`` so that LightningModule code that checks for one accepts it."""

    def __init__(self, optimizer: torch.optim.Optimizer, trainer: LocalTrainer,  # noqa: D107 -- no super().__init__
                 grad_clip: float | None) -> None:
        self.optimizer = optimizer
        self._trainer = trainer
        self._grad_clip = grad_clip

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._trainer.step(self.optimizer, self._grad_clip, update_scaler=False, zero_grad=False)
        self._trainer._stepped = True
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "_trainer", "_grad_clip"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"ClientOptimizer({self.optimizer!r})"


@dataclass
class SchedulerConfig:
    """A learning-rate scheduler of ``configure_optimizers`` (Lightning's ``lr_scheduler`` entry): stepped every
    ``frequency`` optimizer steps (``interval: step``) or local epochs (``interval: epoch``) of the client's fit,
    with automatic optimization; with manual optimization the method steps it (``self.lr_schedulers()``)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1


def _scheduler_config(entry: Any) -> SchedulerConfig:
    if isinstance(entry, dict):
        unknown = set(entry) - {"scheduler", "interval", "frequency", "name", "monitor", "strict"}
        if "scheduler" not in entry or unknown:
            raise ConfigError(f"configure_optimizers: an lr_scheduler dict needs 'scheduler' and may have 'interval' "
                             f"and 'frequency'; got keys {sorted(entry)}")
        if "monitor" in entry:
            raise ConfigError("configure_optimizers: 'monitor' schedulers (ReduceLROnPlateau) are not supported in "
                             "local training: a client's fit has no validation metric")
        config = SchedulerConfig(entry["scheduler"], entry.get("interval", "epoch"), int(entry.get("frequency", 1)))
    else:
        config = SchedulerConfig(entry)
    if config.interval not in ("step", "epoch") or config.frequency < 1:
        raise ConfigError(f"configure_optimizers: lr_scheduler interval must be 'step' or 'epoch' and frequency >= 1, "
                         f"got {config.interval!r}, {config.frequency}")
    return config


def normalize_optimizers(out: Any) -> tuple[list[torch.optim.Optimizer], list[SchedulerConfig]]:
    """Any of Lightning's ``configure_optimizers`` return forms -> (optimizers, schedulers): one optimizer; a list
    or tuple of them; a dict ``{"optimizer": ..., "lr_scheduler": scheduler or {"scheduler", "interval",
    "frequency"}}``; a list of such dicts; or two lists ``([optimizers], [schedulers])``."""
    if isinstance(out, torch.optim.Optimizer):
        return [out], []
    if isinstance(out, dict):
        if "optimizer" not in out:
            raise ConfigError(f"configure_optimizers returned a dict without 'optimizer' (keys: {sorted(out)})")
        scheds = [_scheduler_config(out["lr_scheduler"])] if out.get("lr_scheduler") is not None else []
        return [out["optimizer"]], scheds
    if isinstance(out, (list, tuple)):
        items = list(out)
        if len(items) == 2 and all(isinstance(i, (list, tuple)) for i in items):
            return list(items[0]), [_scheduler_config(e) for e in items[1]]
        if items and all(isinstance(i, dict) for i in items):
            pairs = [normalize_optimizers(i) for i in items]
            return [o for opts, _ in pairs for o in opts], [c for _, cs in pairs for c in cs]
        if all(isinstance(i, torch.optim.Optimizer) for i in items):
            return items, []
    raise ConfigError(f"configure_optimizers returned {type(out).__name__}; expected an optimizer, a list of "
                     "optimizers, a dict with 'optimizer' (and 'lr_scheduler'), a list of such dicts, or two lists "
                     "(optimizers, schedulers)")


def metric_name(name: str) -> str:
    """The train-metric key of a value a method logs: ``train/<name>`` unless the name has its own prefix."""
    return name if "/" in name else f"train/{name}"


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
        # The current local fit (set by :meth:`fit`): its optimizers as methods see them, its schedulers, and the
        # values logged during the current step.
        self.optimizers: list[ClientOptimizer] = []
        self.schedulers: list[SchedulerConfig] = []
        self._logged: dict[str, Tensor] | None = None
        self._stepped = False

    # -- helpers for methods that optimize manually -------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context for forward passes."""
        return self.fabric.autocast() if self.fabric is not None else contextlib.nullcontext()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()`` with gradient scaling when the precision needs it."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(*args, **kwargs)

    def log(self, name: str, value: Tensor | float) -> None:
        """Records a value logged during the current training step (``FedMethod.log``)."""
        if self._logged is None:
            raise RuntimeError(f"log({name!r}): values can be logged during a client's local training only "
                               "(training_step and what it calls)")
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ConfigError(f"log({name!r}): expected a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        else:
            value = torch.tensor(float(value))
        self._logged[metric_name(name)] = value

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
             update_scaler: bool = True, zero_grad: bool = True) -> None:
        """Unscales, clips (global L2 norm ``grad_clip``), steps and (``zero_grad``) zeroes ``optimizer``.

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
        if zero_grad:
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
            method: FedMethod | None = None, schedulers: Sequence[SchedulerConfig] = (),
            per_epoch: int = 0) -> list[dict[str, Tensor]]:
        """The per-batch loop itself: ``step_fn`` under the precision context, then (``automatic``) backward and
        one step of every optimizer. Local training (:meth:`fit`) and every other optimisation over a client's
        batches (e.g. FedBABU/FedETF personal fine-tuning) go through here.

        ``lr_factors`` (one per batch) scale every optimizer's learning rates, relative to the values they start
        with, before each step (a local learning-rate schedule); ``method.current_lr`` then follows them too.
        ``schedulers`` (automatic optimization) step every ``frequency`` batches or, ``interval: epoch``, every
        ``frequency`` passes of ``per_epoch`` batches.

        Returns:
            The per-step loss parts (and, during :meth:`fit`, the values logged in the step).
        """
        records: list[dict[str, Tensor]] = []
        last = len(optimizers) - 1
        groups = [g for opt in optimizers for g in opt.param_groups] if lr_factors is not None else []
        base = [g["lr"] for g in groups]
        logging = self._logged is not None
        for i, batch in enumerate(batches):
            if lr_factors is not None:
                _scale_lrs(groups, base, lr_factors[i], method)
            if logging:
                self._logged = {}
            with self.autocast():
                out = step_fn(batch)
            if automatic:
                assert out.loss is not None, "training_step must return a loss with automatic optimization"
                self.backward(out.loss)
                for j, opt in enumerate(optimizers):
                    self.step(opt, grad_clip, update_scaler=j == last)
                self._step_schedulers(schedulers, i + 1, per_epoch)
            elif self._stepped:  # ClientOptimizer.step in the step: one scaler update for all of them
                self._update_scaler()
            record = out.parts or ({"loss": out.loss} if out.loss is not None else {})
            if logging and self._logged:
                record = _with_logged(record, self._logged)
            records.append(record)
        return records

    def _update_scaler(self) -> None:
        if self.scaler is not None:
            self.scaler.update()
        self._stepped = False

    @staticmethod
    def _step_schedulers(schedulers: Sequence[SchedulerConfig], done: int, per_epoch: int) -> None:
        """Steps the schedulers due after ``done`` batches (automatic optimization)."""
        for config in schedulers:
            if config.interval == "step":
                due = done % config.frequency == 0
            else:
                due = per_epoch > 0 and done % per_epoch == 0 and (done // per_epoch) % config.frequency == 0
            if due:
                config.scheduler.step()

    def fit(self, method: FedMethod, ctx: ClientContext, indices: Tensor) -> tuple[dict[str, Tensor], int]:
        """Runs one client's local training.

        Returns:
            (sums of each loss part and logged value over steps, number of steps). The caller divides to get
            means; a logged value comes with its own step count (``<name>#n``: the steps that logged it finitely).
        """
        optimizers, schedulers = self.open_fit(method)
        data, train, gen = self.data, self.data.train, ctx.generator
        order = self.batch_indices(indices, ctx, method.batch_size, method.local_epochs, method.local_steps)
        batches = (data.get_batch(train, idx, gen, train=True) for idx in order)
        schedule = method.local_lr_schedule
        factors = [schedule.factor(i, len(order)) for i in range(1, len(order) + 1)] if schedule else None
        try:
            records = self.run(batches, lambda b: method.training_step(b, ctx), optimizers, method.grad_clip,
                               method.automatic_optimization, lr_factors=factors, method=method,
                               schedulers=schedulers, per_epoch=self.batches_per_epoch(indices, method.batch_size))
        finally:
            self.close_fit(method)
        return _sum_records(records), len(records)

    def open_fit(self, method: FedMethod) -> tuple[list[torch.optim.Optimizer], list[SchedulerConfig]]:
        """Starts a client's local fit: the method's fresh optimizers and schedulers (``configure_optimizers``),
        what ``self.optimizers()`` / ``self.lr_schedulers()`` return and ``self.log`` writes to until
        :meth:`close_fit`."""
        optimizers, schedulers = normalize_optimizers(method.configure_optimizers())
        if schedulers and method.local_lr_schedule is not None:
            raise ConfigError(f"{type(method).__name__}: configure_optimizers returns an lr_scheduler and "
                             "local_lr_schedule is set; use one of them")
        method._optimizers = optimizers
        self.optimizers = [ClientOptimizer(o, self, method.grad_clip) for o in optimizers]
        self.schedulers = schedulers
        self._logged = {}
        return optimizers, schedulers

    def close_fit(self, method: FedMethod) -> None:
        """Ends the local fit :meth:`open_fit` started."""
        method._local_factor = 1.0
        method._optimizers = []
        self.optimizers, self.schedulers, self._logged, self._stepped = [], [], None, False

    @staticmethod
    def batches_per_epoch(indices: Tensor, batch_size: int) -> int:
        """The mini-batches of one pass over the client's indices (as :meth:`batch_indices` cuts them)."""
        n = int(indices.numel())
        chunks = math.ceil(n / batch_size)
        return chunks - 1 if n > 1 and n % batch_size == 1 else chunks


def _scale_lrs(groups: list[dict[str, Any]], base: list[float], factor: float, method: FedMethod | None) -> None:
    for g, lr in zip(groups, base):
        g["lr"] = lr * factor
    if method is not None:
        method._local_factor = factor


def part_metric(part: str) -> str:
    """The train-metric key of a ``StepOutput.parts`` entry: ``train/loss`` or ``train/loss_<part>``."""
    return "train/loss" if part == "loss" else f"train/loss_{part}"


def _with_logged(record: dict[str, Tensor], logged: dict[str, Tensor]) -> dict[str, Tensor]:
    clash = sorted(k for k in logged if k in {part_metric(p) for p in record})
    if clash:
        raise ConfigError(f"log({clash[0].removeprefix('train/')!r}) names the train metric {clash[0]} that the "
                         "step's loss parts already report; log it under another name")
    return {**record, **logged}


def _sum_records(records: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Each loss part summed over the steps; each logged value summed over the steps that logged it finitely,
    with that count under ``<name>#n``."""
    if not records:
        return {}
    # One stack per part and client (not one add per step): the loop stays free of bookkeeping.
    if len(records) == 1:
        sums = {k: v.detach().float() for k, v in records[0].items()}
    else:
        keys = list(dict.fromkeys(k for r in records for k in r))
        sums = {k: torch.stack([r[k].detach() for r in records if k in r]).float().sum() for k in keys
                if "/" not in k}
        for k in keys:
            if "/" in k:
                sums[k] = torch.stack([r[k] for r in records if k in r]).float()
    for k in [k for k in sums if "/" in k]:  # logged values: non-finite ones are left out, not counted
        v = sums[k].reshape(-1)
        finite = torch.isfinite(v)
        sums[k] = torch.where(finite, v, torch.zeros_like(v)).sum()
        sums[k + COUNT] = finite.sum().float()
    return sums
