"""Exact, order-independent sums (fedlt.engine.exact): what makes 1, 2 or N ranks agree bit for bit."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedlt.engine.exact import ExactSum, ExactSumOverflow, grid_exponent, magnitudes, sum_host_rows
from fedlt.engine.local_loop import NonFiniteLossError


def _terms(n: int = 16, size: int = 700, seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    # values spread over many binades (as model weights are), weights as client sizes are
    return [(torch.randn(size, generator=g) * torch.logspace(-6, 1, size), float(rnd.randint(1, 5000)))
            for _ in range(n)]


def _sum_over_ranks(terms, groups, sizes=(400, 300), refs=(3.0, 0.5), staging_bytes=0) -> torch.Tensor:
    """Each group plays one rank; the integer accumulators are summed as an all-reduce would."""
    ranks = []
    for group in groups:
        acc = ExactSum(sizes, staging_bytes=staging_bytes)
        acc.set_references(refs)
        acc.zero_()
        for i in group:
            t, w = terms[i]
            acc.add_(list(torch.split(t, list(sizes))), w)
            acc.flush_()
        ranks.append(acc)
    total = sum(r._acc for r in ranks)
    ranks[0]._acc.copy_(total)
    ranks[0]._terms = sum(r._terms for r in ranks)
    return ranks[0].all_reduce(None)


def test_the_sum_does_not_depend_on_the_order_or_the_split_where_float_does():
    terms = _terms()
    one = _sum_over_ranks(terms, [list(range(16))])
    rnd = random.Random(1)
    for world in (2, 3, 5):
        order = list(range(16))
        rnd.shuffle(order)
        groups = [order[r::world] for r in range(world)]
        assert torch.equal(_sum_over_ranks(terms, groups), one), world
    # the premise: a float32 sum of the same terms does depend on the order
    forward = sum(w * t for t, w in terms)
    backward = sum(w * t for t, w in reversed(terms))
    assert not torch.equal(forward, backward)


@pytest.mark.parametrize("rows", [2, 3, 64])
def test_staged_terms_give_the_same_bits_as_terms_added_one_by_one(rows):
    terms = _terms()
    one = _sum_over_ranks(terms, [list(range(16))])
    staged = _sum_over_ranks(terms, [list(range(16))], staging_bytes=rows * 700 * 8)  # 16 terms: several flushes
    assert torch.equal(staged, one)
    split = _sum_over_ranks(terms, [list(range(0, 16, 3)), [i for i in range(16) if i % 3]],
                            staging_bytes=rows * 700 * 8)
    assert torch.equal(split, one)
    assert not torch.equal(one, _sum_over_ranks(terms[1:], [list(range(15))], staging_bytes=rows * 700 * 8))


@pytest.mark.parametrize("staging_rows", [0, 3, 8])
def test_stacked_terms_give_the_same_bits_as_terms_added_one_by_one(staging_rows):
    terms = _terms(n=5)
    blocks = [torch.stack([t[:400] for t, _ in terms]), None, torch.stack([t[400:] for t, _ in terms])]
    weights = [[w, 3.0, 1.0] for _, w in terms]
    one, stacked = ExactSum([400, 2, 300]), ExactSum([400, 2, 300], staging_bytes=staging_rows * 702 * 8)
    for acc in (one, stacked):
        acc.set_references([3.0, 1.0, 0.5])
    stacked.add_([torch.ones(400), torch.ones(2), None], 2.0)  # staged rows before the block (3 rows: a flush)
    one.add_([torch.ones(400), torch.ones(2), None], 2.0)
    for t, w in terms:
        one.add_([t[:400], None, t[400:]], [w, 3.0, 1.0])
    stacked.add_stacked_(blocks, weights)
    assert torch.equal(stacked.all_reduce(None), one.all_reduce(None))


def test_staging_keeps_missing_segments_weights_and_the_overflow_check():
    acc = ExactSum([3, 2], staging_bytes=2 * 5 * 8)
    acc.add_([torch.ones(3), None], [2.0, 5.0])
    acc.add_([None, torch.full((2,), 0.25)], [2.0, 4.0])
    acc.add_([torch.ones(3), torch.ones(2)], 0.5)  # a third term: the two rows are flushed first
    assert acc.all_reduce(None).tolist() == [2.5, 2.5, 2.5, 1.5, 1.5]
    acc.zero_()
    acc.add_([torch.tensor([1.0, float("nan"), 0.0]), torch.zeros(2)], 1.0)
    with pytest.raises(ExactSumOverflow):
        acc.all_reduce(None)


def test_the_sum_is_accurate():
    terms = _terms()
    exact = sum(w * t.double() for t, w in terms)
    got = _sum_over_ranks(terms, [list(range(16))])
    # the grid is 2^-52 of max(reference, 1) per term: far below float32's resolution of the values
    bound = 16 * math.ldexp(1.0, -grid_exponent(3.0))
    assert float((got - exact).abs().max()) <= bound
    assert float((got.float().double() - exact).abs().max()) <= float(exact.abs().max()) * 2**-23


def test_rows_equal_terms_added_one_by_one():
    rows = torch.randn(7, 50, dtype=torch.float64) * 100
    a, b = ExactSum([50]), ExactSum([50])
    a.add_rows_(rows)
    for r in rows:
        b.add_([r])
    assert torch.equal(a.all_reduce(None), b.all_reduce(None))


def test_missing_segments_and_per_segment_weights():
    acc = ExactSum([3, 2])
    acc.add_([torch.ones(3), None], [2.0, 5.0])
    acc.add_([None, torch.full((2,), 0.25)], [2.0, 4.0])
    assert acc.all_reduce(None).tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_a_non_finite_or_huge_term_is_refused(bad):
    acc = ExactSum([4])
    acc.add_([torch.tensor([1.0, 2.0, bad, 3.0])], 10.0)
    with pytest.raises(ExactSumOverflow, match="exact_reduction") as err:
        acc.all_reduce(None)
    assert isinstance(err.value, NonFiniteLossError)  # reported like a diverged loss


def test_references_set_the_grid():
    assert grid_exponent(0.0) == grid_exponent(1.0) == 51  # 1.0 = 0.5 * 2^1
    assert grid_exponent(1024.0) == 52 - 11
    assert magnitudes([torch.tensor([-3.0, 2.0]), torch.zeros(0), torch.tensor([7], dtype=torch.long)]) == [3, 0, 7]
    with pytest.raises(ValueError):
        ExactSum([2, 2]).set_references([1.0])


def test_a_server_step_before_the_reduction_is_refused():
    from fedlt.methods.base import Reducer
    from fedlt.types import ClientUpdate

    red = Reducer()
    red.setup({"w": torch.zeros(3)}, torch.device("cpu"))
    red.begin_round(1)
    red.accumulate(ClientUpdate(client_id=0, weight=2.0, tensors={"w": torch.ones(3)}))
    with pytest.raises(RuntimeError, match="before reduce"):
        red.server_step(1)
    red.reduce(None)
    red.server_step(1)
    assert red.global_state["w"].tolist() == [1.0, 1.0, 1.0]


def test_host_row_sums_give_the_bits_of_the_tensor_path():
    rnd = random.Random(0)
    for _ in range(200):
        n, width = rnd.randint(1, 12), rnd.randint(1, 9)
        rows = [[rnd.choice([0.0, -1.0, 0.5, 2.5, -2.5 * 2**-51, float(rnd.randint(0, 5000)),
                             rnd.uniform(-1, 1) * 10 ** rnd.uniform(-20, 6)]) for _ in range(width)] for _ in range(n)]
        acc = ExactSum([width])
        acc.add_rows_(torch.tensor(rows, dtype=torch.float64))
        assert sum_host_rows(rows) == acc.all_reduce(None).tolist()
    for bad in (float("nan"), float("inf"), 1e300):
        with pytest.raises(ExactSumOverflow):
            sum_host_rows([[1.0, bad]])
