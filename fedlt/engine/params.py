"""State dicts <-> flat buffers, ``copy_``-based loading, and the shared/personal key policy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters and persistent buffers by state-dict key, as live tensors (no copies), without the
    frozen backbone a model may declare with ``frozen_state_keys()`` (e.g. CLIP's towers under PEFT): those are
    loaded once into the workspace and are never aggregated, stored per client or checkpointed."""
    frozen_fn = getattr(model, "frozen_state_keys", None)
    frozen = set(frozen_fn()) if callable(frozen_fn) else set()
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in frozen}


def split_keys(keys: Iterable[str], is_personal: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """Splits state-dict keys into (shared, personal) preserving order."""
    shared: list[str] = []
    personal: list[str] = []
    for k in keys:
        (personal if is_personal(k) else shared).append(k)
    return shared, personal


def copy_tensors_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i, with one fused call when possible, never tracking autograd."""
    if not dst:
        return
    with torch.no_grad():
        try:
            torch._foreach_copy_(list(dst), list(src))
        except (RuntimeError, AttributeError, TypeError):  # mixed dtypes/devices: fall back to a loop
            for d, s in zip(dst, src):
                d.copy_(s)


def snapshot(tensors: dict[str, Tensor], keys: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Detached clones of ``tensors`` (optionally only ``keys``)."""
    keys = tensors.keys() if keys is None else keys
    return {k: tensors[k].detach().clone() for k in keys}


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor lives inside one flat float buffer (for a single all-reduce)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, shapes: dict[str, torch.Size | Sequence[int]]) -> FlatLayout:
        names, sizes, offsets, total = [], [], [], 0
        for name, shape in shapes.items():
            shape = torch.Size(shape)
            names.append(name)
            sizes.append(shape)
            offsets.append(total)
            total += shape.numel()
        return cls(tuple(names), tuple(sizes), tuple(offsets), total)

    def views(self, buffer: Tensor) -> dict[str, Tensor]:
        """Named views into ``buffer`` (writes through)."""
        return {
            n: buffer[o : o + s.numel()].view(s) for n, s, o in zip(self.names, self.shapes, self.offsets)
        }

    def flatten(self, tensors: dict[str, Tensor], out: Tensor) -> Tensor:
        """Copies ``tensors`` into ``out`` (shape (numel,)) following the layout."""
        views = self.views(out)
        copy_tensors_([views[n] for n in self.names], [tensors[n].to(out.dtype) for n in self.names])
        return out
