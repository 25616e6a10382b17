"""FedLoGe invariants (docs/reference.md 2.7): SSE-C geometry, frozen SSE-C, detached heads, local heads never uploaded,
GA-FR / LA-FR norms, PM logits, the post-training realignment and absent-class masking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.sharding import seeded_generator
from fedlt.engine.simulator import Simulator
from fedlt.methods.fedetf import etf_basis, simplex_etf
from fedlt.methods.fedloge import FedLoGe, build_sse_c, ga_fr, la_fr, sparsity_mask, sse_loss
from fedlt.models import build_model
from fedlt.types import ClientUpdate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _angles(w: torch.Tensor) -> torch.Tensor:
    unit = w / w.norm(dim=0)
    c = w.shape[1]
    iu = torch.triu_indices(c, c, 1)
    return torch.rad2deg(torch.arccos((unit.t() @ unit)[iu[0], iu[1]].clamp(-1, 1)))


@pytest.mark.parametrize("dim,c", [(512, 10), (64, 7)])
def test_dense_etf_geometry(dim, c):
    m = simplex_etf(c, dim, torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(m.norm(dim=0), torch.ones(c, dtype=torch.float64), atol=1e-6, rtol=0)
    cos = m.t() @ m
    off = cos[~torch.eye(c, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-6, rtol=0)
    assert float(m.sum(1).abs().max()) < 1e-6


def test_mask_zeroes_exactly_floor_beta_d_c_entries_globally():
    mask = sparsity_mask(50, 7, 0.6, torch.Generator().manual_seed(0))
    assert int((mask == 0).sum()) == math.floor(0.6 * 50 * 7)
    # Global, not per column: the per-column zero counts differ.
    assert len(set((mask == 0).sum(0).tolist())) > 1


@pytest.mark.parametrize("c", [10, pytest.param(100, marks=pytest.mark.slow)])
def test_sse_c_after_optimisation_paper_geometry(c):
    """d = 512 (the CIFAR ResNets), beta = 0.6, gamma = 1, the code's 10,000 Adam steps at lr 1e-4.
    Tolerances of docs/reference.md 2.7, calibrated once on these (d, C): norms within 1e-3 of gamma, mean angle
    within 1 degree of the ETF angle, angle std <= 1.5 degrees, minimum angle >= ETF - 3 degrees."""
    w, mask = build_sse_c(512, c, beta=0.6, gamma=1.0, steps=10_000, lr=1e-4,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(w == 0, mask == 0)  # the zero pattern is exactly the mask
    assert float((w.norm(dim=0) - 1.0).abs().max()) < 1e-3
    etf = math.degrees(math.acos(-1.0 / (c - 1)))
    ang = _angles(w)
    assert abs(float(ang.mean()) - etf) < 1.0
    assert float(ang.std()) <= 1.5
    assert float(ang.min()) >= etf - 3.0
    # The optimisation did something: it starts from the masked dense ETF (same generator stream) whose column
    # norms are about sqrt(1 - beta), far from gamma, and lowers the objective.
    g = torch.Generator().manual_seed(0)
    dense = simplex_etf(c, 512, g)
    start = dense * sparsity_mask(512, c, 0.6, g)
    assert torch.equal(start == 0, mask == 0)
    assert float((start.norm(dim=0) - 1.0).abs().min()) > 0.2
    assert float(sse_loss(w, 1.0)) < float(sse_loss(start, 1.0)) - 1.0


def test_gamma_sets_the_column_norms():
    w, _ = build_sse_c(64, 5, beta=0.3, gamma=1.6, steps=2000, lr=3e-3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.norm(dim=0), torch.full((5,), 1.6), atol=1e-3, rtol=0)


def _fedloge(**kw):
    kw.setdefault("sse_steps", 50)
    kw.setdefault("lr", 0.05)
    kw.setdefault("batch_size", 16)
    kw.setdefault("local_epochs", 1)
    return FedLoGe(**kw)


def test_sse_c_is_frozen_and_never_averaged():
    sim = tiny_sim(_fedloge(), rounds=2, clients_per_round=4)
    before = sim.model.sse.weight.clone()
    assert not sim.model.sse.weight.requires_grad
    assert not any(p is sim.model.sse.weight for p in sim.model.parameters())
    run(sim)
    assert torch.equal(sim.global_state["sse.weight"], before)  # bit-identical after local steps and averaging
    assert torch.equal(sim.model.sse.weight, before)
    assert sim.model.sse.bias is None


def test_heads_learn_from_detached_features_only():
    """dL_psi/dtheta = dL_phi/dtheta = 0, and psi/phi updates leave theta unchanged (the backbone only follows the
    SSE-C loss): the global backbone is identical whatever the initial heads are."""
    a = tiny_sim(_fedloge(), rounds=2, clients_per_round=6)
    b = tiny_sim(_fedloge(), rounds=2, clients_per_round=6)
    with torch.no_grad():
        for t in (b.global_state["head.weight"], b.global_state["head.bias"], b.model.l_head.weight):
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))
    b._default_personal = {k: v.clone() for k, v in b._default_personal.items()}
    b._default_personal["l_head.weight"] = b.model.l_head.weight.detach().clone()
    run(a), run(b)
    for k, v in global_copy(a).items():
        if k.startswith(("head.", "sse.")):
            continue
        assert torch.equal(v, b.global_state[k]), k
    assert not torch.equal(a.global_state["head.weight"], b.global_state["head.weight"])
    # Directly: the heads' losses have no gradient path into the backbone.
    m = a.model
    x = a.data.get_batch(a.data.train, torch.arange(8))[0]
    h = m.forward_features(x).detach()
    loss = F.cross_entropy(m.head(h), torch.zeros(8, dtype=torch.long)) + m.l_head(h).sum()
    loss.backward()
    body = [p for n, p in m.named_parameters() if not n.startswith(("head.", "l_head."))]
    assert all(p.grad is None for p in body)
    m.zero_grad(set_to_none=True)


def test_local_heads_stay_on_clients_and_psi_is_the_weighted_mean():
    data = tiny_data()
    sim = tiny_sim(_fedloge(), rounds=1, clients_per_round=6, data=data)
    assert not any(k.startswith("l_head.") for k in sim.global_state)
    assert "head.weight" in sim.global_state  # psi is shared
    # Reducer: psi after the server step equals the n_k-weighted mean of the uploads.
    reducer = sim.reducer
    reducer.begin_round(1)
    uploads = []
    for k, n in ((0, 10.0), (1, 30.0)):
        t = {key: v.clone() for key, v in sim.global_state.items()}
        t["head.weight"] = torch.full_like(t["head.weight"], float(k + 1))
        uploads.append((n, t["head.weight"]))
        reducer.accumulate(ClientUpdate(client_id=k, weight=n, tensors=t))
    reducer.reduce(None)
    reducer.server_step(1)
    expected = (10.0 * uploads[0][1] + 30.0 * uploads[1][1]) / 40.0
    torch.testing.assert_close(sim.global_state["head.weight"], expected)
    run(sim)
    heads = {c: sim.store.get(c)["model.l_head.weight"] for c in range(data.num_clients)}
    assert not torch.equal(heads[0], heads[1])


def test_ga_fr_and_la_fr_norms_and_directions():
    g = torch.Generator().manual_seed(0)
    psi, phi = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    for scale in (1.0, 1.7):
        torch.testing.assert_close(ga_fr(psi, scale).norm(dim=1), torch.full((6,), scale))
    raw = la_fr(psi, phi)
    torch.testing.assert_close(F.cosine_similarity(raw, psi, dim=1), torch.ones(6))
    torch.testing.assert_close(raw.norm(dim=1), phi.norm(dim=1) * psi.norm(dim=1))
    unit = la_fr(ga_fr(psi), phi)
    torch.testing.assert_close(unit.norm(dim=1), phi.norm(dim=1))


@pytest.mark.parametrize("pm_logits,source", [("local_plus_realigned", "raw_psi"), ("realigned_only", "ga_fr_psi")])
def test_gm_and_pm_logits_follow_the_documented_formulas(pm_logits, source):
    sim = tiny_sim(_fedloge(pm_logits=pm_logits, la_fr_source=source, ga_fr_scale=1.7), rounds=1)
    run(sim)
    m, method = sim.model, sim.method
    sim.load_client(1)  # the global backbone and psi, client 1's local head
    m.eval()
    x = sim.data.get_batch(sim.data.test, torch.arange(8))[0]
    with torch.no_grad():
        h = m.forward_features(x)
        psi_w, psi_b = m.head.weight, m.head.bias
        gm = h @ (1.7 * psi_w / psi_w.norm(dim=1, keepdim=True)).t() + psi_b
        torch.testing.assert_close(method.predict_global(x), gm)
        method.prepare_personal(1)
        src = psi_w if source == "raw_psi" else 1.7 * psi_w / psi_w.norm(dim=1, keepdim=True)
        phi = m.l_head.weight
        realigned = h @ (src * phi.norm(dim=1, keepdim=True)).t() + psi_b
        expected = realigned + m.l_head(h) if pm_logits == "local_plus_realigned" else realigned
        torch.testing.assert_close(method.predict_personal(x, 1), expected)
        # The universal model and the unrealigned heads stay available.
        torch.testing.assert_close(method.global_logits(h, "sse"), h @ m.sse.weight.t())
        torch.testing.assert_close(method.global_logits(h, "aux"), m.head(h))


def test_post_training_realignment_logs_like_the_code_then_realigns(tmp_path):
    from fedlt.cli import main

    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "method" / "fedloge.yaml"),
            "--method.init_args.sse_steps", "20", "--method.init_args.realign", "post_training",
            "--method.init_args.local_epochs", "1", "--method.init_args.batch_size", "32",
            "--data.num_clients", "6", "--data.source.init_args.train_per_class", "100", "--trainer.rounds", "2",
            "--trainer.clients_per_round", "3", "--run_dir", str(tmp_path / "run"), "--logging.wandb", "false",
            "--logging.progress_bar", "false"]
    assert main(args) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    post = final["post_training"]
    assert set(post) >= {"test/global/acc", "test/personal/acc_mean"}
    during = final["final"]
    # Different classifiers (SSE-C vs GA-FR; unrealigned vs LA-FR) give different PM numbers on this run.
    assert post["test/personal/acc_mean"] != during["test/personal/acc_mean"] or \
        post["test/global/acc"] != during["test/global/acc"]


def test_la_fr_fine_tuning_changes_only_the_personal_prediction():
    sim = tiny_sim(_fedloge(la_fr_finetune_epochs=2), rounds=1)
    run(sim)
    method, m = sim.method, sim.model
    sim.load_client(0)
    body = {k: v.clone() for k, v in m.state_dict().items()}
    method.prepare_personal(0)
    _, w_tuned, _ = method._pm_cache
    w0, _ = method.realigned_local_head()
    assert not torch.allclose(w_tuned, w0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, body[k]), k  # nothing in the model (backbone, psi, phi_k) was modified
    assert all(p.grad is None or not p.grad.abs().sum() for p in m.parameters())


def test_mask_absent_classes_restricts_pm_predictions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 4
    tx, ty = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 4
    local_test = [torch.nonzero(ty < 2).flatten(), torch.nonzero(ty >= 1).flatten()]
    results = {}
    for mask in (False, True):
        data = FederatedDataset.from_tensors(x, y, tx, ty, [torch.arange(20), torch.arange(20, 40)], num_classes=4,
                                             client_test_indices=local_test, mask_absent_classes=mask)
        torch.manual_seed(0)
        net = build_model("mlp", 4, in_features=64)
        with torch.no_grad():  # a model that always predicts class 3
            net.head.weight.zero_()
            net.head.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        sim = Simulator(None, data, net, FedLoGe(sse_steps=0, gm_head="aux", pm_head="unrealigned"), rounds=1,
                        clients_per_round=2, eval_every=1).setup()
        with torch.no_grad():
            sim.model.l_head.weight.zero_()
            sim.model.l_head.bias.zero_()
        results[mask] = sim.evaluate()
    # Unmasked: every PM prediction is class 3 -> client 0 (classes 0, 1) gets 0, client 1 gets its class-3 share.
    assert results[False]["test/personal/acc_mean"] == pytest.approx((0.0 + 4 / 12) / 2)
    # Masked: client 0 can only predict 0 or 1 -> predicts 1 (higher bias): 4 of its 8 right; client 1 unchanged.
    assert results[True]["test/personal/acc_mean"] == pytest.approx((4 / 8 + 4 / 12) / 2)
    assert results[True]["test/global/acc"] == results[False]["test/global/acc"]  # GM is never masked


# -- released code: the random matrix behind the ETF basis --------------------------------------------------------
def _hand_basis(dim: int, c: int, seed_or_gen, basis: str) -> torch.Tensor:
    gen = seed_or_gen if isinstance(seed_or_gen, torch.Generator) else torch.Generator().manual_seed(seed_or_gen)
    a = (torch.randn if basis == "gaussian" else torch.rand)(dim, c, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q


@pytest.mark.parametrize("basis", ["gaussian", "uniform"])
def test_etf_basis_is_the_qr_of_a_gaussian_or_uniform_draw(basis):
    """P = Q of the QR of torch.randn (default) or torch.rand (U[0, 1), the official code) from the generator; it
    is orthonormal either way and the dense ETF and SSE-C (no sparsity, no steps) are built on it."""
    dim, c = 32, 6
    u = etf_basis(c, dim, torch.Generator().manual_seed(7), basis)
    expected = _hand_basis(dim, c, 7, basis)
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.t() @ u, torch.eye(c, dtype=torch.float64), rtol=0, atol=1e-10)
    etf = math.sqrt(c / (c - 1)) * expected @ (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    torch.testing.assert_close(simplex_etf(c, dim, torch.Generator().manual_seed(7), basis), etf.float())
    w, mask = build_sse_c(dim, c, beta=0.0, steps=0, generator=torch.Generator().manual_seed(7), basis=basis)
    assert bool(mask.all())
    torch.testing.assert_close(w, etf.float())
    # The uniform draw's first column is one-signed (all entries of U[0, 1) are positive); a Gaussian's is not.
    first = expected[:, 0]
    assert bool((first > 0).all() or (first < 0).all()) == (basis == "uniform")
    other = "uniform" if basis == "gaussian" else "gaussian"
    assert not torch.allclose(u, etf_basis(c, dim, torch.Generator().manual_seed(7), other))


@pytest.mark.parametrize("basis", ["gaussian", "uniform"])
def test_fedloge_builds_its_sse_c_on_the_chosen_basis(basis):
    sim = tiny_sim(_fedloge(sse_steps=0, beta=0.0, etf_basis=basis), rounds=1)
    d, c = sim.model.num_features, sim.data.num_classes
    u = _hand_basis(d, c, seeded_generator(sim.method.run.seed, "fedloge-sse-c"), basis)
    etf = math.sqrt(c / (c - 1)) * u @ (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    torch.testing.assert_close(sim.model.sse.weight, etf.float().t())
    assert FedLoGe.released_code == {"etf_basis": "uniform", "gamma": 0.1, "sse_bias": "random_frozen",
                                     "ga_fr_scale": 1.7, "la_fr_source": "raw_psi",
                                     "pm_logits": "local_plus_realigned"}
    default = FedLoGe()
    assert (default.la_fr_source, default.pm_logits_mode) == ("ga_fr_psi", "realigned_only")  # the paper's Algorithm 1
    with pytest.raises(ValueError, match="etf_basis"):
        FedLoGe(etf_basis="normal")


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pm_logits"):
        FedLoGe(pm_logits="sum")
    with pytest.raises(ValueError, match="beta"):
        FedLoGe(beta=1.0)
    data = tiny_data()
    data.setup("cpu")
    net = build_model("cnn", data.num_classes, data.in_channels, data.image_size, channels=(4, 8), hidden=8)
    with pytest.raises(ValueError, match="d >= C"):
        Simulator(None, data, net, FedLoGe(sse_steps=0), rounds=1, clients_per_round=1).setup()


def test_random_frozen_sse_bias_is_a_fixed_default_init_bias_drawn_after_the_sse_c():
    """``sse_bias="random_frozen"`` (the released code's untrained nn.Linear bias): U(-1/sqrt(d), 1/sqrt(d)) drawn
    from the SSE-C generator right after the SSE-C, used in the SSE-C logits and never trained or averaged."""
    sim = tiny_sim(_fedloge(sse_bias="random_frozen"), rounds=2, clients_per_round=4)
    d, c = sim.model.num_features, sim.data.num_classes
    gen = seeded_generator(sim.method.run.seed, "fedloge-sse-c")
    build_sse_c(d, c, 0.6, 1.0, 50, 1e-4, gen, torch.device("cpu"), "gaussian")
    bound = 1.0 / math.sqrt(d)
    ref = torch.rand(c, generator=gen) * 2 * bound - bound
    bias = sim.model.sse.bias.clone()
    torch.testing.assert_close(bias, ref)
    assert float(bias.abs().max()) <= bound
    h = torch.randn(3, d)
    torch.testing.assert_close(sim.model.sse(h), h @ sim.model.sse.weight.t() + bias)
    run(sim)
    assert torch.equal(sim.global_state["sse.bias"], bias) and torch.equal(sim.model.sse.bias, bias)
    assert tiny_sim(_fedloge(), rounds=1).model.sse.bias is None  # the paper's SSE-C has no bias
