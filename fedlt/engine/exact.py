"""Order-independent sums: the reason 1, 2 or N ranks give bitwise identical results.

A float sum depends on the order of its terms, and the order depends on how the cohort is split across ranks.
:class:`ExactSum` makes the sum of client contributions a function of the set of contributions only:

1. every term ``w * x`` is rounded once, on its own, onto a fixed-point grid of ``2^-s`` (``s`` per segment,
   from a reference magnitude every rank knows before the round, e.g. the global tensor);
2. the rounded term is split into two integer limbs ``hi * 2^32 + lo`` held in float64 (integers below 2^53 add
   exactly in float64, so the addition is associative): neither the client order, nor the split over ranks,
   nor the all-reduce tree changes a bit;
3. after the all-reduce of the limbs they are decoded into floats once.

The grid keeps 52 bits below ``max(reference, 1)``: for a weight tensor that is finer than float32's own
resolution wherever float32 values are above 2^-28 of it. The terms of all ranks together may reach about
``2^30 * max(reference, 1)`` in magnitude (a cohort of total weight 10^6 leaves a factor of 2^10 of growth over
the reference); beyond that, or for a NaN/inf term, :meth:`ExactSum.all_reduce` raises :class:`ExactSumOverflow`
on every rank. The cost per term is eight elementwise passes over a float64 copy of the contribution (no
integer conversion), and the all-reduce moves 16 bytes per element instead of 4.
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
_EXACT_BITS = 51  # limb sums (float64 integers) are exact below 2^53; the ranks' summed max |hi sum| stays below 2^51
_MAX_TERMS = 2**18  # and on the number of terms (each lo limb is below 2^32, so their sum below 2^50)
_CHUNK = 1 << 17  # elements per pass of the limb split (1 MiB of float64: stays in cache)
_MAX_STAGED_ROWS = 64


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
    zero = torch.zeros(2, dtype=torch.float64, device=tensors[0].device)
    extremes = torch.stack([torch.stack(torch.aminmax(t.detach())).double() if t.numel() else zero for t in tensors])
    return extremes.abs().amax(1).tolist()


def _chunk_plan(sizes: Sequence[int], chunk: int) -> list[tuple[tuple[int, int], list[tuple[int, int, int]]]]:
    """Consecutive stage ranges ``(a, b)`` of about ``chunk`` elements, each with its pieces ``(segment, start,
    end)``: small segments share a range, a large one is cut into several."""
    plan: list[tuple[tuple[int, int], list[tuple[int, int, int]]]] = []
    pieces: list[tuple[int, int, int]] = []
    start = pos = 0
    for i, n in enumerate(sizes):
        lo = 0
        while lo < n:
            take = min(n - lo, chunk - (pos - start))
            pieces.append((i, lo, lo + take))
            lo += take
            pos += take
            if pos - start >= chunk:
                plan.append(((start, pos), pieces))
                pieces, start = [], pos
    if pieces:
        plan.append(((start, pos), pieces))
    return plan


def _offsets(pieces: list[tuple[int, int, int]]) -> list[int]:
    """Where each piece starts inside its range."""
    out, pos = [], 0
    for _, lo, hi in pieces:
        out.append(pos)
        pos += hi - lo
    return out


class ExactSum:
    """Exact, order-independent sums of weighted float terms over segments of a flat vector.

    Args:
        sizes: the number of elements of each segment (a segment shares one grid exponent).
        device: where the accumulators live.

    Use: :meth:`set_references` (or the default exponent of a reference of 1) and :meth:`zero_` once per
    round, :meth:`add_` once per contribution, then :meth:`all_reduce` on every rank, which returns the float64
    sums.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu",
                 staging_bytes: int = 0) -> None:
        self.sizes = [int(s) for s in sizes]
        self.numel = sum(self.sizes)
        self.device = torch.device(device)
        # rows: the hi limbs, the lo limbs (integers held exactly in float64); the last element of the hi row
        # carries this rank's largest |hi| sum (the overflow check), of the lo row its number of terms
        self._acc = torch.zeros(2, self.numel + 1, dtype=torch.float64, device=self.device)
        self._stage = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        self._hi = torch.empty(self.numel, dtype=torch.float64, device=self.device)
        self._stage_views = list(torch.split(self._stage, self.sizes)) if self.sizes else []
        self.exponents = [grid_exponent(1.0)] * len(self.sizes)
        self._terms = 0
        self._plan = _chunk_plan(self.sizes, _CHUNK)
        # Staging (``staging_bytes`` > 0): terms are copied as float64 rows and split into limbs together when the
        # rows are full or the sums are needed (one vectorized pass instead of a dozen small ops per term).
        rows = min(int(staging_bytes) // max(8 * self.numel, 1), _MAX_STAGED_ROWS) if self.sizes else 0
        self._rows = torch.empty(rows, self.numel, dtype=torch.float64, device=self.device) if rows > 1 else None
        self._row_views = [list(torch.split(r, self.sizes)) for r in self._rows] if self._rows is not None else []
        self._row_scales: list[list[float]] = []
        self._scratch: Tensor | None = None

    def set_references(self, magnitudes: Sequence[float]) -> None:
        """Sets each segment's grid from a magnitude known identically on every rank."""
        if len(magnitudes) != len(self.sizes):
            raise ValueError(f"{len(magnitudes)} reference magnitudes for {len(self.sizes)} segments")
        self.exponents = [grid_exponent(m) for m in magnitudes]

    def zero_(self) -> None:
        self._acc.zero_()
        self._terms = 0
        self._row_scales = []

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
        scales = [math.ldexp(w, e) for w, e in zip(ws, self.exponents)]
        if self._rows is not None:
            self._stage_row(tensors, scales)
            return
        flat = [t.detach().reshape(-1) if t is not None else None for t in tensors]
        # Each chunk of about _CHUNK elements (small segments grouped, large ones split) is staged and split into
        # limbs while it is in cache: eight passes over a model-sized float64 vector would be memory-bound.
        for (a, b), pieces in self._plan:
            given = [(i, lo, hi, t) for i, lo, hi in pieces if (t := flat[i]) is not None]
            missing = [self._stage[a + o : a + o + hi - lo] for (i, lo, hi), o in zip(pieces, _offsets(pieces))
                       if flat[i] is None]
            if missing:
                torch._foreach_zero_(missing)
            if given:
                offsets = dict(zip(pieces, _offsets(pieces)))
                views = [self._stage[a + offsets[(i, lo, hi)] : a + offsets[(i, lo, hi)] + hi - lo]
                         for i, lo, hi, _ in given]
                torch._foreach_copy_(views, [t[lo:hi] for _, lo, hi, t in given])
                torch._foreach_mul_(views, [scales[i] for i, _, _, _ in given])
            self._split_into_limbs(a, b)
        self._terms += 1

    @torch.no_grad()
    def _stage_row(self, tensors: Sequence[Tensor | None], scales: list[float]) -> None:
        """Copies one term into the next staging row (its scales applied at the flush)."""
        assert self._rows is not None
        if len(self._row_scales) == len(self._rows):
            self.flush_()
        views = self._row_views[len(self._row_scales)]
        given = [(i, t) for i, t in enumerate(tensors) if t is not None]
        if len(given) < len(tensors):
            torch._foreach_zero_([views[i] for i, t in enumerate(tensors) if t is None])
        if given:
            torch._foreach_copy_([views[i] for i, _ in given], [t.reshape(-1) for _, t in given])  # no_grad
        self._row_scales.append(scales)
        self._terms += 1

    @torch.no_grad()
    def add_stacked_(self, blocks: Sequence[Tensor | None], weights: Sequence[Sequence[float]]) -> None:
        """Adds ``n`` terms at once: ``blocks[i]`` stacks the terms' values of segment ``i`` along dim 0 (``None``:
        nothing for that segment) and ``weights[j][i]`` is term ``j``'s weight on segment ``i``; the same bits as
        ``n`` calls of :meth:`add_`."""
        n = len(weights)
        if self._rows is None or n > len(self._rows):
            for j in range(n):
                self.add_([b[j] if b is not None else None for b in blocks], list(weights[j]))
            return
        if len(self._row_scales) + n > len(self._rows):
            self.flush_()
        r = len(self._row_scales)
        for block, view in zip(blocks, torch.split(self._rows[r : r + n], self.sizes, dim=1)):
            if block is None:
                view.zero_()
            else:
                view.copy_(block.reshape(n, -1))
        self._row_scales.extend([math.ldexp(w, e) for w, e in zip(ws, self.exponents)] for ws in weights)
        self._terms += n

    @torch.no_grad()
    def flush_(self) -> None:
        """Splits the staged terms into limbs and adds them to the sums (done by :meth:`all_reduce` and whenever
        the staging rows are full; the result is bitwise that of adding each term on its own)."""
        n = len(self._row_scales)
        if self._rows is None or n == 0:
            return
        q = self._rows[:n]
        scales = torch.tensor(self._row_scales, dtype=torch.float64, device=self.device)  # (n, segments)
        # x * ldexp(w, s): the same single rounding per element as in add_
        for i, view in enumerate(torch.split(q, self.sizes, dim=1)):
            view.mul_(scales[:, i : i + 1])
        self._add_limbs(q)
        self._row_scales = []

    def _add_limbs(self, q: Tensor) -> None:
        """Adds the limbs of the scaled rows ``q`` (overwritten), in column blocks that stay in cache."""
        cols = max(_CHUNK // len(q), 1024)
        need = len(q) * min(cols, self.numel)
        if self._scratch is None or self._scratch.numel() < need:  # kept: a fresh buffer costs page faults
            self._scratch = torch.empty(need, dtype=torch.float64, device=self.device)
        scratch = self._scratch
        for a in range(0, self.numel, cols):
            block = q[:, a : a + cols]
            hi = torch.mul(block, 1.0 / _LIMB, out=scratch[: block.numel()].view(block.shape)).floor_()
            lo = block.sub_(hi, alpha=_LIMB).round_()
            b = a + block.shape[1]
            self._acc[0, a:b].add_(hi.sum(0))
            self._acc[1, a:b].add_(lo.sum(0))

    @torch.no_grad()
    def add_rows_(self, rows: Tensor) -> None:
        """Adds every row of ``rows`` (shape ``(n, numel)``) as one term of weight 1 (vectorized over rows)."""
        q = rows.detach().to(self.device, torch.float64).reshape(len(rows), self.numel)
        if len(set(self.exponents)) == 1:
            q = q * math.ldexp(1.0, self.exponents[0])
        else:
            q = q * torch.cat([torch.full((n,), math.ldexp(1.0, s), dtype=torch.float64, device=self.device)
                               for n, s in zip(self.sizes, self.exponents)])
        self._add_limbs(q)
        self._terms += len(rows)

    def _split_into_limbs(self, a: int, b: int) -> None:
        stage, hi = self._stage[a:b], self._hi[a:b]
        torch.mul(stage, 1.0 / _LIMB, out=hi).floor_()  # exact: a power of two, then floor
        stage.sub_(hi, alpha=_LIMB).round_()  # lo, in [0, 2^32]: an integer
        self._acc[0, a:b].add_(hi)
        self._acc[1, a:b].add_(stage)

    def all_reduce(self, fabric: Any = None, out: Tensor | None = None) -> Tensor:
        """Sums the accumulators over ranks (one float64 all-reduce of integer limbs) and decodes them.

        Args:
            fabric: anything with ``world_size`` and ``all_reduce`` (``None``: a single process).
            out: an optional float tensor of :attr:`numel` elements that receives the sums.

        Returns:
            The sums as float64 (or ``out``).

        Raises:
            ExactSumOverflow: on every rank, when any rank saw a non-finite or out-of-range term.
        """
        from fedlt.engine.collectives import all_reduce_sum_

        self.flush_()
        # NaN/inf terms propagate into the limb sums; a term large enough to make a partial sum of hi limbs
        # inexact (>= 2^53) shows in this rank's sum too (one check per reduction, not per term).
        if self.numel:  # one pass over the hi limbs; a NaN/inf term makes its hi limb NaN/inf
            self._acc[0, -1] = torch.stack(torch.aminmax(self._acc[0, :-1])).abs().amax()
        self._acc[1, -1] = float(self._terms)
        acc = all_reduce_sum_(fabric, self._acc)
        bound, terms = float(acc[0, -1]), float(acc[1, -1])
        if not (math.isfinite(bound) and bound < 2.0**_EXACT_BITS and terms <= _MAX_TERMS):
            raise ExactSumOverflow(
                "a client contribution is not finite or too large for exact aggregation (more than about 2^30 "
                "times the global tensor's magnitude in all); the run diverged. Lower the learning rate, or set "
                "trainer.exact_reduction false to aggregate in float (results then depend on the number of ranks)."
            )
        hi, lo = acc[0, :-1], acc[1, :-1]
        carry = (lo * (1.0 / _LIMB)).floor_()
        value = (hi + carry).mul_(_LIMB).add_(lo.sub(carry, alpha=_LIMB))
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


def sum_host_rows(rows: Sequence[Sequence[float]], fabric: Any = None,
                  device: torch.device | str = "cpu") -> list[float]:
    """The exact sums of a few short rows of host floats over all ranks: bitwise what ``ExactSum([width])`` with
    ``add_rows_`` and ``all_reduce`` returns (reference 1), computed in Python integers (a per-round bookkeeping
    vector costs microseconds, not dozens of tiny tensor operations); one all-reduce of the limbs when
    distributed.

    Raises:
        ExactSumOverflow: as :meth:`ExactSum.all_reduce` (a non-finite or too large term on any rank).
    """
    width = len(rows[0]) if rows else 0
    s = grid_exponent(1.0)
    hi, lo = [0] * width, [0] * width
    try:
        for row in rows:
            for j, v in enumerate(row):
                q = math.ldexp(float(v), s)
                h = math.floor(q * (1.0 / _LIMB))
                hi[j] += h
                lo[j] += round(q - h * _LIMB)  # exact difference in [0, 2^32]; round half to even, as torch
        bound_ok = True
    except (OverflowError, ValueError):  # inf or NaN
        bound_ok = False
    bound = float(max((abs(h) for h in hi), default=0)) if bound_ok else math.inf
    terms = float(len(rows))
    if fabric is not None and fabric.world_size > 1:
        from fedlt.engine.collectives import all_reduce_sum_

        if not bound_ok:
            hi, lo = [0] * width, [0] * width
        buf = torch.tensor([*map(float, hi), bound, *map(float, lo), terms], dtype=torch.float64, device=device)
        vals = all_reduce_sum_(fabric, buf).tolist()
        hi, bound, lo, terms = vals[:width], vals[width], vals[width + 1 : -1], vals[-1]
    if not (math.isfinite(bound) and bound < 2.0**_EXACT_BITS and terms <= _MAX_TERMS):
        raise ExactSumOverflow(f"a bookkeeping sum is not finite or too large for exact aggregation (bound {bound})")
    out = []
    for high, low in zip(hi, lo):
        high_f, low_f = float(high), float(low)
        carry = math.floor(low_f * (1.0 / _LIMB))
        out.append(math.ldexp((high_f + carry) * _LIMB + (low_f - carry * _LIMB), -s))
    return out
