"""What the engine and the methods know of the other ranks: one :class:`Comm`, built once from Fabric or for a
single process, and the :class:`RunInfo` every method gets before ``setup``.

Code that needs a collective calls ``comm.<collective>`` and never tests for Fabric or the world size itself: in
a single process every collective is the identity (a sum of one, a broadcast from oneself, a barrier of one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Comm:
    """Rank, world size, device and collectives (sum, exact sums through it, any, broadcast, gather, barrier).

    Args:
        fabric: a launched ``lightning.Fabric``, or ``None`` for a single process on ``device``.
        device: the device of a single process (ignored with Fabric).
    """

    def __init__(self, fabric: Any = None, device: torch.device | str = "cpu") -> None:
        self.fabric = fabric
        self.rank = int(fabric.global_rank) if fabric is not None else 0
        self.world_size = int(fabric.world_size) if fabric is not None else 1
        self.device = fabric.device if fabric is not None else torch.device(device)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def global_rank(self) -> int:  # the Fabric spelling, for code written against Fabric
        return self.rank

    def all_reduce(self, buffer: Tensor, reduce_op: str = "sum") -> Tensor:
        """Fabric's all-reduce (a new tensor on some backends); the identity for one process."""
        if not self.distributed:
            return buffer
        return self.fabric.all_reduce(buffer, reduce_op=reduce_op)

    def sum_(self, buffer: Tensor) -> Tensor:
        """Sums ``buffer`` over all ranks, in place (idle ranks contribute zeros)."""
        if self.distributed:
            out = self.fabric.all_reduce(buffer, reduce_op="sum")
            if out.data_ptr() != buffer.data_ptr():
                buffer.copy_(out)
        return buffer

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank."""
        if not self.distributed:
            return bool(flag)
        return bool(self.sum_(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        return self.fabric.broadcast(obj, src=src) if self.distributed else obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            self.fabric.barrier()

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size}, device={self.device})"


@dataclass(frozen=True)
class RunInfo:
    """What a method may know of the run it is part of (``FedMethod.run``, set before ``setup``).

    Args:
        seed: the experiment seed: every server-side random draw of a method derives from it (with
            :func:`fedlt.engine.sharding.seeded_generator`), never from the data seed, the rank or the global RNG.
        rounds: the number of server rounds R (schedules over training progress).
        comm: the ranks (for methods with their own collectives, e.g. a server-side pass sharded over ranks).
    """

    seed: int = 0
    rounds: int = 1
    comm: Comm = field(default_factory=Comm)
