"""FedRS invariants (fedlt/methods/fedrs.py): alpha = 1 is exactly FedAvg; the restricted softmax scales exactly
the logits of the classes a client does not have (hand computation); alpha = 0 leaves the missing classes'
classifier rows untouched; alpha < 1 changes the result; the released code's proportional scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg
from fedlt.methods.fedrs import FedRS, restriction
from fedlt.models import build_model
from fedlt.types import ClientContext, ServerMessage

KW = {"lr": 0.05, "batch_size": 16}


def _ctx(counts: torch.Tensor) -> ClientContext:
    return ClientContext(client_id=0, round=1, num_samples=int(counts.sum()), class_counts=counts,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         message=ServerMessage(round=1, state={}))


def _five_of_ten_classes(per_class: int = 8) -> FederatedDataset:
    """One client holding ``per_class`` samples of each of the classes 0-4 of 10 (classes 5-9 missing)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat(per_class)
    x = torch.randn(y.numel(), 32, generator=g) + y.float().unsqueeze(1)
    return FederatedDataset.from_tensors(x, y, x[:10], y[:10], [torch.arange(y.numel())], num_classes=10)


def _mlp_sim(method, data: FederatedDataset, rounds: int = 1) -> Simulator:
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=data.num_classes, in_features=data.train.x.shape[1])
    return Simulator(None, data, model, method, rounds=rounds, clients_per_round=1, seed=0).setup()


def test_restriction_by_hand():
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0, 6.0])
    torch.testing.assert_close(restriction(counts, 0.25), torch.tensor([1.0, 0.25, 1.0, 0.25, 1.0]))
    # The released code: alpha + (1 - alpha) n_c / max n.
    torch.testing.assert_close(restriction(counts, 0.25, "proportional"),
                               torch.tensor([0.625, 0.25, 0.375, 0.25, 1.0]))
    equal = torch.tensor([2.0, 0.0, 2.0, 2.0])
    assert torch.equal(restriction(equal, 0.3), restriction(equal, 0.3, "proportional"))
    assert torch.equal(restriction(counts, 1.0), torch.ones(5))
    with pytest.raises(ValueError):
        restriction(counts, 0.5, "soft")


def test_training_step_scales_exactly_the_logits_of_absent_classes():
    alpha = 0.3
    method = FedRS(alpha=alpha, **KW)
    sim = tiny_sim(method, rounds=1)
    counts = torch.tensor([5.0, 0.0, 2.0, 0.0, 0.0, 1.0, 7.0, 0.0, 3.0, 0.0])
    absent = counts == 0
    ctx = _ctx(counts)
    method.on_client_start(ctx)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, sim.data.in_channels, sim.data.image_size, sim.data.image_size, generator=g)
    y = torch.tensor([0, 2, 5, 6, 8, 0, 6, 2])
    with torch.no_grad():
        logits = sim.model(x)
        restricted = method.restricted_logits(logits, ctx)
    assert torch.equal(restricted[:, ~absent], logits[:, ~absent])
    assert torch.equal(restricted[:, absent], logits[:, absent] * alpha)
    by_hand = torch.stack([logits[:, c] * (alpha if counts[c] == 0 else 1.0) for c in range(10)], dim=1)
    out = method.training_step((x, y), ctx)
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(by_hand, y))
    assert not torch.allclose(out.loss.detach(), F.cross_entropy(logits, y))


def test_alpha_one_equals_fedavg_exactly():
    data = tiny_data()
    a = tiny_sim(FedAvg(**KW), data=data)
    b = tiny_sim(FedRS(alpha=1.0, **KW), data=data)
    run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k


def test_alpha_below_one_changes_the_result():
    data = tiny_data()
    data.setup("cpu")
    assert any(bool((torch.bincount(data.train.y[i], minlength=data.num_classes) == 0).any())
               for i in data.client_indices)  # some client misses a class
    a = tiny_sim(FedAvg(**KW), data=data)
    b = tiny_sim(FedRS(alpha=0.5, **KW), data=data)
    run(a), run(b)
    assert any(not torch.allclose(v, b.global_state[k]) for k, v in a.global_state.items())


class _Local(FedRS):
    """FedRS recording the client's trained local model (before the server's exact-sum aggregation rounds it)."""

    def on_client_end(self, ctx):
        self.local = {k: v.detach().clone() for k, v in self.shared_tensors.items()}
        return super().on_client_end(ctx)


def test_alpha_zero_leaves_the_missing_classes_classifier_rows_untouched():
    data = _five_of_ten_classes()
    rs, avg = _Local(alpha=0.0, lr=0.3, batch_size=8, local_epochs=2), _Local(alpha=1.0, lr=0.3, batch_size=8,
                                                                            local_epochs=2)
    sim_rs, sim_avg = _mlp_sim(rs, data), _mlp_sim(avg, data)
    start = global_copy(sim_rs)
    run(sim_rs), run(sim_avg)
    for key in ("head.weight", "head.bias"):
        # alpha = 0: the missing classes' logits are 0 whatever their weights: no gradient reaches them.
        assert torch.equal(rs.local[key][5:], start[key][5:]), key
        assert not torch.equal(rs.local[key][:5], start[key][:5]), key
        assert not torch.equal(avg.local[key][5:], start[key][5:]), key  # alpha = 1 (FedAvg) pushes them down


def test_proportional_scaling_equals_missing_with_equal_local_counts_and_differs_otherwise():
    data = _five_of_ten_classes()
    a = _mlp_sim(FedRS(alpha=0.4, lr=0.3, batch_size=8), data)
    b = _mlp_sim(FedRS(alpha=0.4, scaling="proportional", lr=0.3, batch_size=8), data)
    run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k
    tiny = tiny_data()
    c = tiny_sim(FedRS(alpha=0.4, **KW), data=tiny)
    d = tiny_sim(FedRS(alpha=0.4, scaling="proportional", **KW), data=tiny)
    run(c), run(d)
    assert any(not torch.allclose(v, d.global_state[k]) for k, v in c.global_state.items())


def test_arguments_are_checked_and_released_code_is_accepted():
    for bad in ({"alpha": -0.1}, {"alpha": 1.5}, {"scaling": "soft"}):
        with pytest.raises(ValueError):
            FedRS(**bad)
    assert FedRS(**FedRS.released_code).scaling == "proportional"
    assert (FedRS().alpha, FedRS().scaling) == (0.5, "missing")
