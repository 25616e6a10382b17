"""CCVR: pooled class Gaussians equal the central statistics, the sampler draws from them, and the calibration
re-trains only the head (after FedAvg training, which it leaves untouched)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.methods._finetune import client_features
from fedlt.methods.ccvr import CCVR, class_statistics, pooled_gaussians, sample_gaussian
from fedlt.methods.fedavg import FedAvg

LOCAL = {"lr": 0.05, "momentum": 0.5, "batch_size": 16}


def test_class_statistics_are_the_mean_and_unbiased_covariance():
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(30, 4, generator=gen), torch.tensor([0] * 12 + [2] * 17 + [3])
    n, mu, cov = class_statistics(z, y, range(4))
    assert n.tolist() == [12, 0, 17, 1]
    assert torch.allclose(mu[0], z[:12].double().mean(0)) and torch.allclose(cov[0], torch.cov(z[:12].double().T))
    assert torch.allclose(cov[2], torch.cov(z[12:29].double().T))
    assert mu[1].abs().sum() == 0 and cov[1].abs().sum() == 0 and cov[3].abs().sum() == 0  # absent / single
    assert torch.equal(mu[3], z[29].double())


def test_pooled_gaussians_of_client_uploads_equal_the_union_statistics():
    """The paper's server formula on per-client (N, mu, Sigma) gives the mean and covariance of all clients'
    features together."""
    gen = torch.Generator().manual_seed(1)
    parts = [(torch.randn(n, 3, generator=gen) * s + s, torch.randint(0, 2, (n,), generator=gen))
             for n, s in ((9, 1.0), (14, 3.0), (1, 0.5), (6, 2.0))]
    sums = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
            torch.zeros(2, 3, 3, dtype=torch.float64)]
    for z, y in parts:
        n, mu, cov = class_statistics(z, y, range(2))
        sums[0] += n
        sums[1] += n[:, None] * mu
        sums[2] += (n - 1).clamp(min=0)[:, None, None] * cov + n[:, None, None] * mu[:, :, None] * mu[:, None, :]
    mu, cov = pooled_gaussians(*sums)
    z_all, y_all = torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts])
    for c in range(2):
        assert torch.allclose(mu[c], z_all[y_all == c].mean(0), atol=1e-12)
        assert torch.allclose(cov[c], torch.cov(z_all[y_all == c].T), atol=1e-10)


def test_sampler_draws_from_the_gaussian_even_when_singular():
    a = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    cov = a.T @ a  # rank 2 in 3 dimensions
    mean = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    draws = sample_gaussian(mean, cov, 200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.05)
    assert torch.allclose(draws[:, 2], torch.full((200_000,), 2.0, dtype=torch.float64))  # no spread off the span
    again = sample_gaussian(mean, cov, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws)


@pytest.fixture(scope="module")
def trained():
    sim = tiny_sim(CCVR(virtual_per_class=50, calibration_epochs=2, **LOCAL), rounds=2)
    run(sim)
    return sim


def test_training_is_fedavg():
    ccvr, fedavg = tiny_sim(CCVR(**LOCAL), rounds=2), tiny_sim(FedAvg(**LOCAL), rounds=2)
    run(ccvr), run(fedavg)
    a, b = global_copy(ccvr), global_copy(fedavg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gathered_gaussians_equal_central_statistics_of_the_clients_features(trained):
    sim, method = trained, trained.method
    counts, means, covs = method.gather_gaussians(sim)
    sim.load_global()
    feats = [client_features(method, k) for k in range(sim.data.num_clients)]
    z, y = torch.cat([f for f, _ in feats]).double(), torch.cat([t for _, t in feats])
    assert counts.tolist() == torch.bincount(y, minlength=sim.data.num_classes).double().tolist()
    for c in range(sim.data.num_classes):
        zc = z[y == c]
        assert torch.allclose(means[c], zc.mean(0), rtol=1e-9, atol=1e-9)
        assert torch.allclose(covs[c], torch.cov(zc.T), rtol=1e-7, atol=1e-9)


def test_calibration_changes_only_the_head_and_fits_the_virtual_features(trained):
    sim, method = trained, trained.method
    before = global_copy(sim)
    counts, means, covs = method.gather_gaussians(sim)
    feats, labels = method.virtual_features(counts, means, covs)
    assert feats.shape == (50 * int((counts > 0).sum()), int(sim.model.num_features))
    assert torch.equal(labels.unique(), (counts > 0).nonzero().flatten())
    sim.load_global()
    loss_before = float(F.cross_entropy(sim.model.head(feats), labels))
    assert method.on_fit_end(sim) is True
    after = global_copy(sim)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("head.")}
    sim.load_global()
    assert float(F.cross_entropy(sim.model.head(feats), labels)) < loss_before


def test_calibration_is_deterministic():
    def calibrated() -> dict[str, torch.Tensor]:
        sim = tiny_sim(CCVR(virtual_per_class=20, **LOCAL), rounds=1)
        run(sim)
        sim.method.on_fit_end(sim)
        return global_copy(sim)

    a, b = calibrated(), calibrated()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, match", [({"virtual_per_class": 0}, "virtual_per_class"),
                                           ({"calibration_lr": 0.0}, "calibration_lr"),
                                           ({"calibration_batch_size": 0}, "calibration_batch_size")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CCVR(**kwargs)
