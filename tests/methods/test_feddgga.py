"""Invariants of FedDG-GA (fedlt/methods/feddgga.py): the weight refinement and the step schedule by hand,
step_size = 0 is FedAvg, the gaps of round r reported in round r + 1 equal hand-computed ones and steer the weights
used by round r + 1's aggregation, slot aggregation over a partial cohort, staleness, validation data, checkpoints."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_data, tiny_sim

from fedlt.data import FederatedDataset, TensorSplit
from fedlt.engine.simulator import Simulator
from fedlt.methods import FedAvg
from fedlt.methods.feddgga import _LOCAL, _ROUND, FedDGGA, FedDGGAReducer, ga_step, refine_weights
from fedlt.models import build_model
from fedlt.types import ClientContext, ClientUpdate, ServerMessage

C, D_IN = 3, 5


def tensor_data(sizes: list[int], seed: int = 0, val_per_client: int = 0) -> FederatedDataset:
    """Clients with the given sample counts on Gaussian blobs (no augmentation); optional validation split."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, D_IN, generator=g) + y[:, None].float()
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    parts = [torch.arange(int(bounds[i]), int(bounds[i + 1])) for i in range(len(sizes))]
    data = FederatedDataset.from_tensors(x, y, x[:8], y[:8], parts, num_classes=C)
    if val_per_client:
        m = val_per_client * len(sizes)
        yv = torch.randint(0, C, (m,), generator=g)
        data.val = TensorSplit(torch.randn(m, D_IN, generator=g) + yv[:, None].float(), yv)
        data.client_val_indices = [torch.arange(k * val_per_client, (k + 1) * val_per_client)
                                   for k in range(len(sizes))]
    return data


def tensor_sim(method, data: FederatedDataset, clients_per_round: int, rounds: int = 3) -> Simulator:
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=C, in_features=D_IN, hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Simulator(None, data, model, method, rounds=rounds, clients_per_round=clients_per_round,
                         client_state="memory").setup()


# -- pure functions -----------------------------------------------------------------------------------------------
def test_refine_weights_by_hand_with_clipping_and_renormalisation():
    # max |G| = 1: a + 0.2 G = (0.7, -0.1 -> 0, 0.35), sum 1.05.
    got = refine_weights(torch.tensor([0.6, 0.1, 0.3]), torch.tensor([0.5, -1.0, 0.25]), 0.2)
    torch.testing.assert_close(got, torch.tensor([0.7 / 1.05, 0.0, 0.35 / 1.05], dtype=torch.float64))
    # Upper clip: (0.95 + 0.2, 0.05 - 0.2) -> (1, 0).
    got = refine_weights(torch.tensor([0.95, 0.05]), torch.tensor([3.0, -3.0]), 0.2)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # Accuracy gaps flip the sign: a - 0.1 G / max|G| = (0.5 - 0.1, 0.5 + 0.05).
    got = refine_weights(torch.tensor([0.5, 0.5]), torch.tensor([0.4, -0.2]), 0.1, fair_metric="acc")
    torch.testing.assert_close(got, torch.tensor([0.4 / 0.95, 0.55 / 0.95], dtype=torch.float64))


def test_refine_weights_mask_and_degenerate_cases():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # Only client 1 reports (G = -2, normalised to -1): 0.2 - 0.1; the others keep their weight, then renormalise.
    got = refine_weights(w, torch.tensor([9.0, -2.0, 9.0, 9.0]), 0.1, mask=torch.tensor([False, True, False, False]))
    torch.testing.assert_close(got, torch.tensor([0.1, 0.1, 0.3, 0.4], dtype=torch.float64) / 0.9)
    assert torch.equal(refine_weights(w, torch.zeros(4), 0.1), w)  # all gaps 0 (official: 0/0)
    assert torch.equal(refine_weights(w, torch.ones(4), 0.1, mask=torch.zeros(4, dtype=torch.bool)), w)
    with pytest.raises(ValueError):
        refine_weights(w, torch.ones(4), 0.1, fair_metric="f1")


def test_step_schedule():
    # Official: i = r - 1, d = (step - (i - 1) step / R) / M.
    assert ga_step(1, 0.2, 3, 40) == pytest.approx((0.2 + 0.2 / 40) / 3)
    assert ga_step(2, 0.2, 3, 40) == pytest.approx(0.2 / 3)
    assert ga_step(41, 0.2, 3, 40) == pytest.approx((0.2 - 39 * 0.2 / 40) / 3)
    assert ga_step(42, 0.2, 3, 40) == pytest.approx(0.0)
    assert ga_step(100, 0.2, 3, 40) == 0.0  # clamped, never negative
    assert ga_step(100, 0.2, 4, None) == pytest.approx(0.05)


# -- the method in the simulator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cohort", [4, 2])
def test_step_size_zero_is_fedavg_on_equal_clients(cohort):
    data = tensor_data([24, 24, 24, 24])
    a = tensor_sim(FedAvg(lr=0.1, batch_size=8), data, cohort)
    b = tensor_sim(FedDGGA(step_size=0.0, lr=0.1, batch_size=8), data, cohort)
    run(a), run(b)
    assert torch.equal(b.reducer.weights, torch.full((4,), 0.25, dtype=torch.float64))
    for k, v in global_copy(a).items():
        torch.testing.assert_close(b.global_state[k], v, msg=k)


def test_step_size_zero_with_sample_weights_is_fedavg_with_batchnorm_and_partial_cohorts():
    """init_weights="samples": the cohort's renormalised weights are n_k / sum_S n; the gap evaluations (eval mode,
    no grad) leave the BN statistics untouched."""
    data = tiny_data()
    a = tiny_sim(FedAvg(lr=0.05, batch_size=16), model="resnet8", data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = tiny_sim(FedDGGA(step_size=0.0, init_weights="samples", lr=0.05, batch_size=16), model="resnet8",
                     data=data)
    for r in (1, 2):
        if r == 2:  # BN nets amplify float rounding chaotically: restart round 2 from the same global state
            for k, v in a.global_state.items():
                b.global_state[k].copy_(v)
        a.run_round(r), b.run_round(r)
        for k, v in global_copy(a).items():
            torch.testing.assert_close(b.global_state[k].float(), v.float(), msg=k)
    assert bool(b.reducer.last_reported.any())  # round 2 evaluated the global model on returning clients


def _train_round(sim: Simulator, round: int) -> dict[int, dict[str, torch.Tensor]]:
    """One full-participation round by hand (as Simulator.run_round); returns every client's local model."""
    message = sim.reducer.broadcast(round)
    sim.reducer.begin_round(round)
    sim.model.train()
    models = {}
    for cid in range(sim.data.num_clients):
        sim.train_client(cid, message)
        models[cid] = {k: v.detach().clone() for k, v in sim.method.shared_tensors.items()}
    sim.reducer.reduce(None)
    sim.reducer.server_step(round)
    sim.round = round
    return models


def _val_loss(sim: Simulator, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    net = build_model("mlp", num_classes=C, in_features=D_IN, hidden=8)
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def _mean(models: dict[int, dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weights / weights.sum()
    return {k: sum(float(w[c]) * models[c][k] for c in models) for k in models[0]}


@pytest.mark.parametrize("gap_data", ["val", "train"])
def test_gaps_by_hand_steer_the_next_aggregation(gap_data):
    step_size, decay = 0.3, 5
    data = tensor_data([30, 12, 20], val_per_client=10)
    sim = tensor_sim(FedDGGA(step_size=step_size, decay_rounds=decay, gap_data=gap_data, lr=0.2, batch_size=8),
                     data, clients_per_round=3)
    assert sim.method.gap_source == gap_data
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)

    def client_xy(cid):
        if gap_data == "val":
            idx = data.client_val_indices[cid]
            return data.val.x[idx], data.val.y[idx]
        idx = data.client_indices[cid]
        return data.train.x[idx], data.train.y[idx]

    local1 = _train_round(sim, 1)
    theta1 = global_copy(sim)
    assert torch.equal(sim.reducer.weights, uniform)  # no gap exists in round 1
    for k, v in _mean(local1, uniform).items():
        torch.testing.assert_close(theta1[k], v)
    before = torch.tensor([_val_loss(sim, local1[c], *client_xy(c)) for c in range(3)], dtype=torch.float64)
    for c in range(3):  # "before avg" L_k(theta_k) is stored with the client at the end of round 1
        torch.testing.assert_close(sim.store.get(c)[_LOCAL][0].double(), before[c])
        assert float(sim.store.get(c)[_ROUND]) == 1.0
    after = torch.tensor([_val_loss(sim, theta1, *client_xy(c)) for c in range(3)], dtype=torch.float64)
    gaps = after - before

    local2 = _train_round(sim, 2)
    assert bool(sim.reducer.last_reported.all())
    torch.testing.assert_close(sim.reducer.last_gaps, gaps, rtol=1e-5, atol=1e-6)
    expected = refine_weights(uniform, gaps, ga_step(1, step_size, 3, decay))
    torch.testing.assert_close(sim.reducer.weights, expected, rtol=1e-5, atol=1e-7)
    # The client with the largest gap gains weight, the one with the smallest loses it.
    assert int(sim.reducer.weights.argmax()) == int(gaps.argmax())
    assert sim.reducer.weights[gaps.argmax()] > 1 / 3 > sim.reducer.weights[gaps.argmin()]
    # Round 2 was aggregated with the refined weights (the official order).
    for k, v in _mean(local2, sim.reducer.weights).items():
        torch.testing.assert_close(sim.global_state[k], v, rtol=1e-5, atol=1e-6)


def test_acc_fair_metric_runs_and_reports_accuracy_gaps():
    data = tensor_data([30, 12, 20])
    sim = tensor_sim(FedDGGA(fair_metric="acc", lr=0.2, batch_size=8), data, clients_per_round=3)
    run(sim)
    gaps = sim.reducer.last_gaps
    assert bool(sim.reducer.last_reported.all()) and bool((gaps.abs() <= 1).all())
    torch.testing.assert_close(sim.reducer.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_val_falls_back_to_training_data_with_a_warning():
    data = tensor_data([10, 10])
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=C, in_features=D_IN, hidden=8)
    with pytest.warns(UserWarning, match="no validation split"):
        sim = Simulator(None, data, model, FedDGGA(), rounds=1, clients_per_round=2).setup()
    assert sim.method.gap_source == "train"


def test_multi_domain_data_uses_the_source_domain_validation_split():
    """Domain data (batches carry domain ids): the gaps are measured on data.val / data.client_val_indices."""
    import fedlt.data as dg

    if not hasattr(dg, "EmbeddedDigitDomains"):
        pytest.skip("no multi-domain source in this tree")
    source = dg.EmbeddedDigitDomains(image_size=16, per_class=20, val_per_class=5)
    data = FederatedDataset(source, target_domain=source.domains[1], imbalance_factor=1)
    data.setup("cpu")
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, channels=(8, 16), hidden=32)
    sim = Simulator(None, data, model, FedDGGA(lr=0.05, batch_size=16), rounds=2,
                    clients_per_round=data.num_clients, client_state="memory").setup()
    assert sim.method.gap_source == "val" and len(data.get_batch(data.val, data.client_val_indices[0][:2])) == 3
    run(sim)
    assert bool(sim.reducer.last_reported.all())
    uniform = torch.full((data.num_clients,), 1 / data.num_clients, dtype=torch.float64)
    assert not torch.allclose(sim.reducer.weights, uniform)
    torch.testing.assert_close(sim.reducer.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    for cid in range(data.num_clients):  # the evaluation reads the client's validation images, in eval mode
        x, y = data.get_batch(data.val, data.client_val_indices[cid])[:2]
        sim.load_client(cid)
        got = sim.method.gap_metrics(cid)
        assert sim.model.training
        sim.model.eval()
        with torch.no_grad():
            logits = sim.model(x)
        sim.model.train()
        acc = (logits.argmax(1) == y).float().mean()
        torch.testing.assert_close(got, torch.stack([F.cross_entropy(logits, y), acc]))


def _ctx(sim: Simulator, cid: int, round: int, state: dict[str, torch.Tensor]) -> ClientContext:
    sim.load_client(cid)
    sim.model.train()
    return ClientContext(client_id=cid, round=round, num_samples=10, class_counts=torch.ones(C),
                         generator=torch.Generator(), device=torch.device("cpu"),
                         message=ServerMessage(round=round, state=sim.global_state), state=state)


@pytest.mark.parametrize(("max_staleness", "last_round", "reports"),
                         [(0, 2, True), (0, 1, False), (1, 1, True), (None, 1, True), (0, 0, False)])
def test_staleness_of_the_before_avg_measurement(max_staleness, last_round, reports):
    sim = tensor_sim(FedDGGA(max_staleness=max_staleness), tensor_data([10, 10]), clients_per_round=2)
    ctx = _ctx(sim, 0, 3, {_LOCAL: torch.tensor([0.25, 0.5]), _ROUND: torch.tensor([float(last_round)])})
    sim.method.on_client_start(ctx)
    assert sim.model.training
    update = sim.method.on_client_end(ctx)
    assert sim.model.training
    assert ("gap" in update.extras) == reports
    if reports:
        after = sim.method.gap_metrics(0)  # the workspace still holds the global model (no training ran)
        torch.testing.assert_close(update.extras["gap"], (after[0] - 0.25).reshape(1))
    assert float(ctx.state[_ROUND]) == 3.0  # this participation's measurement replaces the old one


def test_reducer_aggregates_the_slots_of_a_partial_cohort():
    state = {"w": torch.zeros(2, 3), "n": torch.tensor(0, dtype=torch.int64)}
    reducer = FedDGGAReducer(4, 7, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), step_size=0.4,
                             decay_rounds=None)
    reducer.setup(state, torch.device("cpu"))
    t1 = {"w": torch.full((2, 3), 1.0), "n": torch.tensor(3)}
    t3 = {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(8)}
    reducer.begin_round(1)
    reducer.accumulate(ClientUpdate(client_id=3, weight=5.0, tensors=t3))
    reducer.accumulate(ClientUpdate(client_id=1, weight=50.0, tensors=t1))
    reducer.reduce(None)
    reducer.server_step(1)
    torch.testing.assert_close(state["w"], (0.2 * t1["w"] + 0.4 * t3["w"]) / 0.6)  # weights a_k, not n_k
    assert int(state["n"]) == round((0.2 * 3 + 0.4 * 8) / 0.6)
    assert torch.equal(reducer.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    # Round 2: client 1 (absent from round 1's store here, but reporting) and client 2 upload; only 1 has a gap.
    reducer.begin_round(2)
    reducer.accumulate(ClientUpdate(client_id=2, weight=1.0, tensors=t3))
    reducer.accumulate(ClientUpdate(client_id=1, weight=1.0, tensors=t1, extras={"gap": torch.tensor([0.7])}))
    reducer.reduce(None)
    reducer.server_step(2)
    d = ga_step(1, 0.4, 4, None)  # 0.1
    expected = torch.tensor([0.1, 0.2 + d, 0.3, 0.4], dtype=torch.float64) / (1 + d)
    torch.testing.assert_close(reducer.weights, expected)
    a1, a2 = float(expected[1]), float(expected[2])
    torch.testing.assert_close(state["w"], (a1 * t1["w"] + a2 * t3["w"]) / (a1 + a2))
    # Checkpoint round trip.
    other = FedDGGAReducer(4, 7, torch.full((4,), 0.25), step_size=0.4)
    other.setup({"w": torch.zeros(2, 3), "n": torch.tensor(0)}, torch.device("cpu"))
    other.load_state_dict(reducer.state_dict())
    assert torch.equal(other.weights, reducer.weights) and torch.equal(other.last_gaps, reducer.last_gaps)
    assert torch.equal(other.global_state["w"], state["w"])


def test_all_cohort_weights_clipped_to_zero_average_uniformly():
    state = {"w": torch.zeros(2)}
    reducer = FedDGGAReducer(3, 2, torch.tensor([1.0, 0.0, 0.0]), step_size=0.0)
    reducer.setup(state, torch.device("cpu"))
    reducer.begin_round(1)
    for cid, v in ((1, 1.0), (2, 3.0)):
        reducer.accumulate(ClientUpdate(client_id=cid, weight=1.0, tensors={"w": torch.full((2,), v)}))
    reducer.reduce(None)
    reducer.server_step(1)
    torch.testing.assert_close(state["w"], torch.full((2,), 2.0))


def test_checkpoint_restores_the_weights():
    data = tensor_data([30, 12, 20])
    a = tensor_sim(FedDGGA(lr=0.2, batch_size=8), data, clients_per_round=3)
    run(a, 2)
    assert not torch.allclose(a.reducer.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    b = tensor_sim(FedDGGA(lr=0.2, batch_size=8), data, clients_per_round=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.reducer.weights, a.reducer.weights)
    run(a), run(b)
    assert torch.equal(b.reducer.weights, a.reducer.weights)
    for k, v in a.global_state.items():
        assert torch.equal(b.global_state[k], v), k


@pytest.mark.parametrize(("decay_rounds", "expected"), [(None, 3), (0, None), (7, 7)])
def test_decay_horizon_defaults_to_the_run_length(decay_rounds, expected):
    sim = tensor_sim(FedDGGA(decay_rounds=decay_rounds), tensor_data([10, 10]), clients_per_round=2, rounds=3)
    assert sim.reducer.decay_rounds == expected


def test_server_memory_limit_is_enforced_at_setup():
    with pytest.raises(ValueError, match="max_server_floats"):
        tensor_sim(FedDGGA(max_server_floats=100), tensor_data([10, 10]), clients_per_round=2)


@pytest.mark.parametrize("kwargs", [{"step_size": -0.1}, {"fair_metric": "f1"}, {"init_weights": "x"},
                                    {"gap_data": "test"}, {"decay_rounds": -1}, {"max_staleness": -1}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        FedDGGA(**kwargs)


def test_paper_reference():
    assert FedDGGA.paper.venue == "CVPR 2023" and not FedDGGA.paper.arxiv
    assert math.isclose(ga_step(2, 0.2, 1, None), 0.2)
