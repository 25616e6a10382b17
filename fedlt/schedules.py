"""Learning-rate schedules: a multiplier of a base learning rate as a pure function of a 1-based index.

The same classes schedule three things:

* ``method.init_args.lr_schedule``: the local learning rate per server round (index = round, total = rounds);
* ``method.init_args.local_lr_schedule``: within one client's local training (index = local step, total = the
  client's steps that round; a fresh schedule for every client, as its optimizer is fresh);
* ``server_lr_schedule`` of the server-optimizer methods (FedAvgM, FedAdam, FedAdagrad, FedYogi): the server
  learning rate per round.

A factor depends only on (index, total), never on state, so a scheduled run is the same for any number of ranks
and after a kill and resume. ``fedlt fit --help`` lists the classes; in YAML::

    method:
      class_path: FedAvg
      init_args:
        lr: 0.05
        lr_schedule: {class_path: Exponential, init_args: {gamma: 0.98}}
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence


class Schedule(abc.ABC):
    """Base class: ``factor(t, total)`` multiplies the base learning rate at index ``t`` (1-based) of ``total``."""

    @abc.abstractmethod
    def factor(self, t: int, total: int) -> float:
        """The multiplier of the base learning rate at index ``t`` of ``total``."""

    def __call__(self, base: float, t: int, total: int) -> float:
        """The scheduled learning rate ``base * factor(t, total)``."""
        return float(base) * self.factor(int(t), max(int(total), 1))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The base learning rate throughout (the same as no schedule)."""

    def factor(self, t: int, total: int) -> float:
        return 1.0


class Exponential(Schedule):
    """``gamma ** (t - 1)``: decay by ``gamma`` every index (PFLlib's per-round learning-rate decay).

    Args:
        gamma: the decay per index, in (0, 1] (1: constant).
    """

    def __init__(self, gamma: float = 0.99) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"Exponential: gamma must be in (0, 1], got {gamma}")
        self.gamma = gamma

    def factor(self, t: int, total: int) -> float:
        return self.gamma ** (t - 1)


class Step(Schedule):
    """``gamma ** ((t - 1) // step_size)``: multiply by ``gamma`` every ``step_size`` indices.

    Args:
        step_size: indices per step (rounds, or local steps).
        gamma: the factor per step, in (0, 1].
    """

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        if step_size < 1:
            raise ValueError(f"Step: step_size must be >= 1, got {step_size}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"Step: gamma must be in (0, 1], got {gamma}")
        self.step_size, self.gamma = step_size, gamma

    def factor(self, t: int, total: int) -> float:
        return self.gamma ** ((t - 1) // self.step_size)


class MultiStep(Schedule):
    """``gamma ** (number of milestones <= t)``: multiply by ``gamma`` from each milestone on.

    Args:
        milestones: the indices (rounds, or local steps) from which the rate is multiplied by ``gamma`` once more.
        gamma: the factor per milestone, in (0, 1].
    """

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1) -> None:
        if any(m < 1 for m in milestones):
            raise ValueError(f"MultiStep: milestones must be >= 1, got {list(milestones)}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"MultiStep: gamma must be in (0, 1], got {gamma}")
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma

    def factor(self, t: int, total: int) -> float:
        return self.gamma ** sum(1 for m in self.milestones if t >= m)


class Cosine(Schedule):
    """Cosine annealing: ``min_factor + (1 - min_factor) (1 + cos(pi (t - 1) / T)) / 2`` with ``T = length``
    (default ``total``: the run's rounds, or the client's local steps), as ``torch.optim.lr_scheduler.
    CosineAnnealingLR`` stepped once per index. Indices past ``T`` keep ``min_factor``.

    Args:
        min_factor: the final multiplier (eta_min / eta).
        length: T, the indices to anneal over (``None``: ``total``; set it so that extending a run with a larger
            ``trainer.rounds`` does not re-stretch the schedule).
    """

    def __init__(self, min_factor: float = 0.0, length: int | None = None) -> None:
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"Cosine: min_factor must be in [0, 1], got {min_factor}")
        if length is not None and length < 1:
            raise ValueError(f"Cosine: length must be >= 1, got {length}")
        self.min_factor, self.length = min_factor, length

    def factor(self, t: int, total: int) -> float:
        span = self.length or total
        if t - 1 >= span:
            return self.min_factor
        return self.min_factor + (1.0 - self.min_factor) * (1.0 + math.cos(math.pi * (t - 1) / span)) / 2.0


class Warmup(Schedule):
    """Linear warm-up over the first ``length`` indices, from ``start_factor`` towards 1 (as ``LinearLR``), then
    ``then`` (indices counted from the end of the warm-up: ``then.factor(t - length, total - length)``).

    Args:
        length: warm-up indices.
        start_factor: the multiplier at index 1.
        then: the schedule after the warm-up (``None``: constant).
    """

    def __init__(self, length: int, start_factor: float = 0.1, then: Schedule | None = None) -> None:
        if length < 1:
            raise ValueError(f"Warmup: length must be >= 1, got {length}")
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"Warmup: start_factor must be in (0, 1], got {start_factor}")
        self.length, self.start_factor, self.then = length, start_factor, then

    def factor(self, t: int, total: int) -> float:
        if t <= self.length:
            return self.start_factor + (1.0 - self.start_factor) * (t - 1) / self.length
        return self.then.factor(t - self.length, max(total - self.length, 1)) if self.then is not None else 1.0


SCHEDULES = {cls.__name__: cls for cls in (Constant, Exponential, Step, MultiStep, Cosine, Warmup)}
