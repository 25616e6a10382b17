"""FedETF invariants: a fixed simplex ETF (bit-identical forever), aggregated projection and temperature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.losses import balanced_softmax
from fedlt.methods import METHODS
from fedlt.methods.fedetf import simplex_etf
from fedlt.types import ClientContext, ServerMessage

FedETF = METHODS.get("fedetf")


def _fast(**kwargs) -> object:
    return FedETF(lr=0.1, batch_size=16, personal_rounds=1, personal_epochs=1, **kwargs)


@pytest.mark.parametrize(("classes", "dim"), [(2, 2), (10, 10), (10, 32), (7, 64)])
def test_simplex_etf_geometry(classes, dim):
    m = simplex_etf(classes, dim, torch.Generator().manual_seed(3))
    assert m.shape == (dim, classes)
    torch.testing.assert_close(m.norm(dim=0), torch.ones(classes), rtol=0, atol=1e-5)
    gram = m.T @ m
    off = gram[~torch.eye(classes, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (classes - 1)), rtol=0, atol=1e-5)
    assert torch.equal(m, simplex_etf(classes, dim, torch.Generator().manual_seed(3)))
    assert not torch.equal(m, simplex_etf(classes, dim, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError):
        simplex_etf(classes, classes - 1, torch.Generator())


def test_model_head_is_scaled_cosine_against_the_etf():
    sim = tiny_sim(_fast(proj_dim=16, beta_init=2.5), rounds=1)
    head = sim.model.head
    assert head.etf.shape == (16, sim.data.num_classes) and not head.etf.requires_grad
    h = torch.randn(5, sim.model.num_features)
    u = F.normalize(head.proj(h), dim=1)
    torch.testing.assert_close(head(h), 2.5 * u @ head.etf)
    assert head(h).abs().max() <= 2.5 + 1e-5
    assert "head.weight" not in sim.global_state  # the linear head is replaced


def test_etf_bit_identical_and_projection_aggregated_through_training_and_evaluation():
    sim = tiny_sim(_fast(), rounds=2, clients_per_round=4)
    start = global_copy(sim)
    sim.run_round(1)
    metrics = sim.evaluate()  # PM fine-tunes the ETF in the workspace: it must not leak
    assert 0.0 <= metrics["test/personal/acc_mean"] <= 1.0
    sim.run_round(2)
    assert torch.equal(sim.global_state["head.etf"], start["head.etf"])
    for k in ("head.proj.weight", "head.proj.bias", "head.beta"):
        assert not torch.equal(sim.global_state[k], start[k]), k
    sim.load_client(0)
    assert torch.equal(sim.model.head.etf, start["head.etf"])


def test_local_training_uses_the_balanced_loss_of_the_local_histogram():
    sim = tiny_sim(_fast(), rounds=1)
    cid = 0
    idx = sim.data.client_indices[cid][:16]
    x, y = sim.data.get_batch(sim.data.train, idx)
    counts = sim._class_counts[cid]
    ctx = ClientContext(cid, 1, 16, counts, torch.Generator(), torch.device("cpu"), ServerMessage(1, {}))
    out = sim.method.training_step((x, y), ctx)
    torch.testing.assert_close(out.loss, balanced_softmax(sim.model(x), y, counts))


def test_personal_adaptation_moves_etf_and_projection_deterministically():
    sim = tiny_sim(_fast(), rounds=1)
    run(sim)
    before = global_copy(sim)

    def adapted(cid: int) -> dict[str, torch.Tensor]:
        sim.load_client(cid)
        with torch.enable_grad():
            sim.method.prepare_personal(cid)
        return {k: v.detach().clone() for k, v in sim.model.state_dict().items()}

    first = adapted(3)
    for k in ("head.etf", "head.proj.weight", "features.0.weight"):
        assert not torch.equal(first[k], before[k]), k
    again = adapted(3)
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not sim.model.head.etf.requires_grad
    for k, v in before.items():
        assert torch.equal(sim.global_state[k], v), k
    assert FedETF(adapt_epochs=0, personal_rounds=0).personalizes is False


# -- released code: the count of an absent class in the balanced loss --------------------------------------------
def _balanced_loss_by_hand(logits, y, counts, absent):
    """CE(z_c + log n'_c) with n'_c = n_c, or ``absent`` for a class the client lacks (the normaliser of the prior
    cancels in the softmax)."""
    n = [float(c) if c > 0 else absent for c in counts.tolist()]
    return F.cross_entropy(logits + torch.tensor(n).log(), y)


@pytest.mark.parametrize(("absent", "kwargs"), [(1e-8, {}), (1.0, {"absent_class_count": 1.0})])
def test_calibrated_loss_counts_an_absent_class_as_documented(absent, kwargs):
    """Default: an absent class gets count 1e-8 (it drops out of the softmax); released code: count 1."""
    sim = tiny_sim(_fast(**kwargs), rounds=1)
    cid = next(k for k in range(sim.data.num_clients) if bool((sim._class_counts[k] == 0).any()))
    counts = sim._class_counts[cid]
    idx = sim.data.client_indices[cid][:16]
    x, y = sim.data.get_batch(sim.data.train, idx)
    ctx = ClientContext(cid, 1, 16, counts, torch.Generator(), torch.device("cpu"), ServerMessage(1, {}))
    out = sim.method.training_step((x, y), ctx)
    logits = sim.model(x).detach()
    torch.testing.assert_close(out.loss.detach(), _balanced_loss_by_hand(logits, y, counts, absent),
                               rtol=1e-5, atol=1e-6)
    other = 1.0 if absent < 1.0 else 1e-8
    assert abs(float(out.loss) - float(_balanced_loss_by_hand(logits, y, counts, other))) > 1e-4
    assert FedETF.released_code == {"absent_class_count": 1.0, "etf_basis": "uniform"}


def test_absent_class_count_reaches_the_local_adaptation_and_is_validated():
    """Stage 1 of the local adaptation gets the same counts as local training."""
    seen = []

    class Spy:
        def __call__(self, logits, target, class_counts, round=1):
            seen.append(class_counts.clone())
            return balanced_softmax(logits, target, class_counts)

    method = FedETF(lr=0.1, batch_size=16, loss=Spy(), absent_class_count=1.0, adapt_epochs=1, personal_rounds=0)
    sim = tiny_sim(method, rounds=1)
    cid = next(k for k in range(sim.data.num_clients) if bool((sim._class_counts[k] == 0).any()))
    sim.load_client(cid)
    with torch.enable_grad():
        sim.method.prepare_personal(cid)
    counts = sim._class_counts[cid].float()
    assert seen and all(torch.equal(c.cpu(), torch.where(counts > 0, counts, 1.0)) for c in seen)
    for bad in (0.0, -1.0, float("inf"), 1e-9, True):
        with pytest.raises(ValueError, match="absent_class_count"):
            FedETF(absent_class_count=bad)


@pytest.mark.parametrize("basis", ["gaussian", "uniform"])
def test_fedetf_etf_is_built_on_the_chosen_basis(basis):
    """The head's ETF is sqrt(C/(C-1)) U (I - 11^T/C) with U the QR of the chosen draw (hand-written here)."""
    from fedlt.engine.sharding import seeded_generator

    sim = tiny_sim(_fast(proj_dim=16, etf_basis=basis), rounds=1)
    c = sim.data.num_classes
    gen = seeded_generator(sim.method.run.seed, "fedetf")
    # The head draws the projection's weight and bias first, then the basis (same generator).
    torch.empty(16, sim.model.num_features).uniform_(generator=gen)
    torch.empty(16).uniform_(generator=gen)
    draw = (torch.randn if basis == "gaussian" else torch.rand)(16, c, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(draw)
    ref = (c / (c - 1)) ** 0.5 * u @ (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    torch.testing.assert_close(sim.model.head.etf, ref.float(), rtol=1e-5, atol=1e-6)
    other = tiny_sim(_fast(proj_dim=16, etf_basis="uniform" if basis == "gaussian" else "gaussian"), rounds=1)
    assert not torch.allclose(other.model.head.etf, sim.model.head.etf, atol=1e-3)
    with pytest.raises(ValueError, match="etf_basis"):
        FedETF(etf_basis="sobol")
