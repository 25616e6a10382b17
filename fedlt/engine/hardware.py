"""Resolves ``trainer.accelerator`` / ``devices`` / ``precision`` (``auto`` included) to what a run uses.

As in Lightning, ``auto`` means every visible GPU of the node, else one CPU process; ``precision: auto`` means
``bf16-mixed`` on a GPU that computes in bfloat16 (compute capability 8.0 and newer) and ``32-true`` elsewhere.
Asking for hardware that is not there is a :class:`HardwareError` (the CLI prints it and exits with status 2)
before any process is spawned or file written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from fedlt.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "64-true")
Precision = Literal["32-true", "bf16-mixed", "16-mixed", "64-true"]  # what a run uses (``auto`` and ``32`` resolved)


class HardwareError(ConfigError):
    """The requested accelerator, device count or precision does not exist on this machine."""


@dataclass(frozen=True)
class Hardware:
    """What a run runs on: ``accelerator`` is ``cpu`` or ``cuda``; ``devices`` processes per node."""

    accelerator: str
    devices: int
    num_nodes: int
    precision: Precision

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def describe(self, clients_per_round: int, num_clients: int) -> str:
        """The one line a run prints at its start: hardware, world size, precision and the cohort's sharding."""
        cohort = min(clients_per_round, num_clients)
        ranks = self.world_size
        how = "balanced by local sample counts, every round" if ranks > 1 else "all on this rank"
        return (f"fedlt: accelerator {self.accelerator} | {self.devices} device{_s(self.devices)} per node x "
                f"{self.num_nodes} node{_s(self.num_nodes)} = world size {ranks} | precision {self.precision} | "
                f"cohort of {cohort} client{_s(cohort)} sharded over {ranks} rank{_s(ranks)} ({how})")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _cuda() -> Any:
    import torch

    return torch.cuda


def resolve_hardware(accelerator: str, devices: int | str, num_nodes: int, precision: str) -> Hardware:
    """The concrete hardware of a run (see the module docstring); idempotent on resolved values."""
    acc = str(accelerator).lower()
    if acc not in ACCELERATORS:
        raise HardwareError(f"trainer.accelerator {accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if str(precision) not in PRECISIONS:
        raise HardwareError(f"trainer.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cuda = _cuda()
    has_gpu = bool(cuda.is_available())
    if acc in ("gpu", "cuda") and not has_gpu:
        raise HardwareError(f"--trainer.accelerator {accelerator}: no CUDA GPU is visible to this process "
                            "(torch.cuda.is_available() is False). Use --trainer.accelerator cpu (or auto), or run "
                            "on a GPU node with a CUDA build of torch.")
    acc = "cuda" if acc in ("gpu", "cuda") or (acc == "auto" and has_gpu) else "cpu"
    visible = int(cuda.device_count()) if acc == "cuda" else None
    if devices == "auto" or devices == -1:
        count = visible if visible is not None else 1
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            raise HardwareError(f"trainer.devices must be a positive number or 'auto', got {devices!r}") from None
        if count < 1:
            raise HardwareError(f"trainer.devices must be >= 1 (or 'auto'), got {devices!r}")
        if visible is not None and count > visible:
            raise HardwareError(f"--trainer.devices {count}: this node has {visible} visible GPU"
                                f"{'s' if visible != 1 else ''}. Ask for at most {visible} (or 'auto'), or run on a "
                                "node with more GPUs (CUDA_VISIBLE_DEVICES may hide some).")
    prec = str(precision)
    if prec == "auto":
        prec = "bf16-mixed" if acc == "cuda" and _bf16_capable(cuda) else "32-true"
    elif prec == "32":
        prec = "32-true"
    return Hardware(accelerator=acc, devices=count, num_nodes=int(num_nodes), precision=cast(Precision, prec))


def _bf16_capable(cuda: Any) -> bool:
    """Whether GPU 0 computes in bfloat16 natively (Ampere, compute capability 8.0, and newer)."""
    major, _ = cuda.get_device_capability(0)
    return major >= 8
