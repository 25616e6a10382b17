"""Order-independent sums: the reason 1, 2 or N ranks give bitwise identical results.

A float sum depends on the order of its terms, and the order depends on how the cohort is split across ranks.
:class:`ExactSum` makes the sum of client contributions a function of the set of contributions only:

1. every term ``w * x`` is rounded once, on its own, onto a fixed-point grid of ``2^-s`` (``s`` per segment,
   from a reference magnitude every rank knows before the round, e.g. the global tensor);
2. the rounded term is added as a two-limb integer ``hi * 2^32 + lo`` (int64 each): integer addition is
   associative, so neither the client order, nor the split over ranks, nor the all-reduce tree changes a bit;
3. after the (integer) all-reduce the limbs are decoded into floats once.

The grid keeps 52 bits below ``max(reference, 1)``: for a weight tensor that is finer than float32's own
resolution wherever float32 values are above 2^-28 of it. The terms of all ranks together may reach about
``2^42 * max(reference, 1)`` in magnitude (ten clients of weight 10^6 leave a factor of 2^18 of growth over the
reference); beyond that, or for a NaN/inf term, :meth:`ExactSum.all_reduce` raises :class:`ExactSumOverflow`
on every rank. The cost per term is a few passes over a float64 copy of the contribution, and the all-reduce
moves 16 bytes per element instead of 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlt.engine.local_loop import NonFiniteLossError

_LIMB = 2.0**32
PRECISION_BITS = 52  # grid bits below the segment's reference magnitude
_SUM_BITS = 62  # the sum of |hi| over all terms of all ranks stays below 2^62 (int64 without overflow)


class ExactSumOverflow(NonFiniteLossError):
    """A term of an exact sum was non-finite or too large for the fixed-point grid (agreed on every rank): the
    run diverged, like a non-finite loss."""


def grid_exponent(reference: float) -> int:
    """The ``s`` of the grid ``2^-s`` that keeps :data:`PRECISION_BITS` bits below ``max(|reference|, 1)``."""
    ref = abs(float(reference))
    if not math.isfinite(ref):
        raise ExactSumOverflow(f"the reference magnitude {reference} of an exact sum is not finite")
    return PRECISION_BITS - math.frexp(max(ref, 1.0))[1]


def magnitudes(tensors: Sequence[Tensor]) -> list[float]:
    """``max |t|`` of each tensor (0 for an empty one), with one device synchronisation."""
    if not tensors:
        return []
    peaks = [t.detach().abs().amax().double() if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)
             for t in tensors]
    return torch.stack(peaks).tolist()


class ExactSum:
    """Exact, order-independent sums of weighted float terms over segments of a flat vector.

    Args:
        sizes: the number of elements of each segment (a segment shares one grid exponent).
        device: where the accumulators live.

    Use: :meth:`set_references` (or the default exponent of a reference of 1) and :meth:`zero_` once per
    round, :meth:`add_` once per contribution, then :meth:`all_reduce` on every rank, which returns the float64
    sums.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.sizes = [int(s) for s in sizes]
        self.numel = sum(self.sizes)
        self.device = torch.device(device)
        # rows: hi limb, lo limb; the last element of the hi row counts this rank's out-of-range terms
        self._acc = torch.zeros(2, self.numel + 1, dtype=torch.int64, device=self.device)
        self._stage = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        self._stage_views = list(torch.split(self._stage, self.sizes)) if self.sizes else []
        self.exponents = [grid_exponent(1.0)] * len(self.sizes)
        self._peak = torch.zeros((), dtype=torch.float64, device=self.device)
        self._terms = 0

    def set_references(self, magnitudes: Sequence[float]) -> None:
        """Sets each segment's grid from a magnitude known identically on every rank."""
        if len(magnitudes) != len(self.sizes):
            raise ValueError(f"{len(magnitudes)} reference magnitudes for {len(self.sizes)} segments")
        self.exponents = [grid_exponent(m) for m in magnitudes]

    def zero_(self) -> None:
        self._acc.zero_()
        self._peak.zero_()
        self._terms = 0

    @torch.no_grad()
    def add_(self, tensors: Sequence[Tensor | None], weights: float | Sequence[float] = 1.0) -> None:
        """Adds ``weights[i] * tensors[i]`` to segment ``i`` as one term (``None``: nothing for that segment).

        Each tensor has its segment's number of elements (any shape and dtype).
        """
        if len(tensors) != len(self.sizes):
            raise ValueError(f"{len(tensors)} tensors for {len(self.sizes)} segments")
        if not self.sizes:
            return
        ws = [float(weights)] * len(tensors) if isinstance(weights, (int, float)) else [float(w) for w in weights]
        given = [i for i, t in enumerate(tensors) if t is not None]
        missing = [self._stage_views[i] for i, t in enumerate(tensors) if t is None]
        if missing:
            torch._foreach_zero_(missing)
        if given:
            views = [self._stage_views[i].view(tensors[i].shape) for i in given]
            torch._foreach_copy_(views, [tensors[i].detach() for i in given])
            torch._foreach_mul_(views, [math.ldexp(ws[i], self.exponents[i]) for i in given])
        self._add_staged()

    @torch.no_grad()
    def add_rows_(self, rows: Tensor) -> None:
        """Adds every row of ``rows`` (shape ``(n, numel)``) as one term of weight 1 (vectorized over rows)."""
        q = rows.detach().to(self.device, torch.float64).reshape(len(rows), self.numel)
        if len(set(self.exponents)) == 1:
            q = q * math.ldexp(1.0, self.exponents[0])
        else:
            q = q * torch.cat([torch.full((n,), math.ldexp(1.0, s), dtype=torch.float64, device=self.device)
                               for n, s in zip(self.sizes, self.exponents)])
        hi = torch.div(q, _LIMB, rounding_mode="floor")
        lo = q.sub_(hi, alpha=_LIMB)
        if len(rows):
            self._peak = torch.maximum(self._peak, torch.linalg.vector_norm(hi, math.inf))
        self._acc[0, :-1].add_(hi.to(torch.int64).sum(0))
        self._acc[1, :-1].add_(lo.to(torch.int64).sum(0))
        self._terms += len(rows)

    def _add_staged(self) -> None:
        hi = torch.div(self._stage, _LIMB, rounding_mode="floor")
        lo = self._stage.sub_(hi, alpha=_LIMB)  # in [0, 2^32): exact
        self._peak = torch.maximum(self._peak, torch.linalg.vector_norm(hi, math.inf))  # NaN propagates
        self._acc[0, :-1].add_(hi.to(torch.int64))
        self._acc[1, :-1].add_(lo.to(torch.int64))
        self._terms += 1

    def all_reduce(self, fabric: Any = None, out: Tensor | None = None) -> Tensor:
        """Sums the accumulators over ranks (one int64 all-reduce) and decodes them.

        Args:
            fabric: anything with ``world_size`` and ``all_reduce`` (``None``: a single process).
            out: an optional float tensor of :attr:`numel` elements that receives the sums.

        Returns:
            The sums as float64 (or ``out``).

        Raises:
            ExactSumOverflow: on every rank, when any rank saw a non-finite or out-of-range term.
        """
        from fedlt.engine.collectives import all_reduce_sum_

        peak = float(self._peak)
        world = getattr(fabric, "world_size", 1) if fabric is not None else 1
        ok = math.isfinite(peak) and peak * max(self._terms, 1) * world < 2.0**_SUM_BITS
        self._acc[0, -1] = 0 if ok else 1
        acc = all_reduce_sum_(fabric, self._acc)
        if int(acc[0, -1]) > 0:
            raise ExactSumOverflow(
                "a client contribution is not finite or too large for exact aggregation (more than 2^41 times "
                "the global tensor's magnitude); the run diverged. Lower the learning rate, or set "
                "trainer.exact_reduction false to aggregate in float (results then depend on the number of ranks)."
            )
        hi, lo = acc[0, :-1], acc[1, :-1]
        carry = torch.bitwise_right_shift(lo, 32)
        value = (hi + carry).double().mul_(_LIMB).add_((lo - carry * (1 << 32)).double())
        if self.sizes:
            if len(set(self.exponents)) == 1:
                value.mul_(math.ldexp(1.0, -self.exponents[0]))
            else:
                torch._foreach_mul_(list(torch.split(value, self.sizes)),
                                    [math.ldexp(1.0, -s) for s in self.exponents])
        if out is None:
            return value
        out.copy_(value.view(out.shape))
        return out
