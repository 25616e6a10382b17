"""The single local loop: batching semantics, step counting, manual optimization helpers."""

from __future__ import annotations

import torch

from fedlt.engine.local_loop import LocalTrainer
from fedlt.types import ClientContext, ServerMessage


def _ctx(seed: int = 0) -> ClientContext:
    return ClientContext(client_id=0, round=1, num_samples=0, class_counts=torch.zeros(2),
                         generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                         message=ServerMessage(round=1, state={}))


def test_epochs_are_permutations_of_the_client_indices():
    idx = torch.arange(100, 123)  # 23 samples
    batches = LocalTrainer(None).batch_indices(idx, _ctx(), batch_size=5, epochs=3)
    assert [b.numel() for b in batches] == [5, 5, 5, 5, 3] * 3
    for e in range(3):
        epoch = torch.cat(batches[5 * e : 5 * e + 5])
        assert torch.equal(epoch.sort().values, idx)


def test_reference_order_matches_plain_randperm():
    """The first epoch is ``idx[randperm(n, generator)]`` cut in order (the reference loop of the round benchmark)."""
    idx = torch.arange(20)
    batches = LocalTrainer(None).batch_indices(idx, _ctx(7), batch_size=10, epochs=1)
    ref = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat(batches), ref)


def test_steps_mode_counts_steps_across_epochs_and_drops_singletons():
    idx = torch.arange(11)  # batches of 5, 5, 1 -> the singleton is dropped
    batches = LocalTrainer(None).batch_indices(idx, _ctx(), batch_size=5, epochs=1, steps=7)
    assert len(batches) == 7 and all(b.numel() == 5 for b in batches)
    assert LocalTrainer(None).batch_indices(idx[:0], _ctx(), batch_size=5, epochs=2) == []
    single = LocalTrainer(None).batch_indices(idx[:1], _ctx(), batch_size=5, epochs=2)
    assert [b.tolist() for b in single] == [[0], [0]]


def test_step_helper_clips_the_global_gradient_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.full((4,), 10.0)  # norm 20
    LocalTrainer(None).step(opt, grad_clip=1.0)
    assert torch.allclose(p.detach().norm(), torch.tensor(1.0)) and p.grad is None
