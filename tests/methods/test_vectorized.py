"""Vectorized cohorts (``trainer.vectorize_cohort``): every supported method trains to the sequential engine's
global model, client states and loss up to float rounding, with uneven client sizes; others are refused.

"Up to float rounding" over several rounds: the batched kernels sum in another order (differences of about 1e-8),
and in a ReLU / max-pool network such a difference now and then moves a pre-activation across 0 or swaps a
max-pool winner, which changes that step's gradient by far more than 1e-8. So the rounds are compared by the
size of the difference against the size of the update (below 1 %), and one step from identical parameters is
compared exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run, tiny_sim

from fedlt.cli import main
from fedlt.engine.vectorized import VectorizationError
from fedlt.methods.fedavg import FedAvg
from fedlt.methods.fedfocal import FedFocal
from fedlt.methods.fedlc import FedLC
from fedlt.methods.fedper import FedPer
from fedlt.methods.fedprox import FedProx
from fedlt.methods.fedrod import FedRoD
from fedlt.methods.ratioloss import RatioLoss

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

CASES = {
    "fedavg-momentum-wd": lambda: FedAvg(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=16),
    "fedavg-steps": lambda: FedAvg(lr=0.05, batch_size=16, local_steps=7),
    "fedprox-clip": lambda: FedProx(mu=0.5, lr=0.05, momentum=0.5, batch_size=16, grad_clip=0.5),
    "fedprox-mu0": lambda: FedProx(mu=0.0, lr=0.05, batch_size=16),  # a penalty method with no penalty
    "fedper": lambda: FedPer(lr=0.05, momentum=0.5, batch_size=16),
    "fedfocal": lambda: FedFocal(gamma=2.0, lr=0.05, batch_size=16),
    "fedlc": lambda: FedLC(tau=1.0, lr=0.05, batch_size=16),
}


@pytest.mark.parametrize("name, forward", [*((n, "stacked") for n in CASES), ("fedprox-clip", "vmap"),
                                           ("fedper", "vmap"), ("fedlc", "vmap")])
def test_vectorized_cohorts_equal_the_sequential_engine(name, forward, monkeypatch):
    """Both batched forwards: the model's own on stacked weights (the built-in MLP and CNN) and torch.func.vmap
    (any other model)."""
    import fedlt.engine.vectorized as vectorized

    if forward == "vmap":
        monkeypatch.setattr(vectorized, "stacked_forward_model", lambda model: None)
    seq = tiny_sim(CASES[name](), rounds=3, clients_per_round=5)
    vec = tiny_sim(CASES[name](), rounds=3, clients_per_round=5, vectorize_cohort=True)
    assert (vec._vectorized._stacked_model is not None) == (forward == "stacked")
    sizes = [int(i.numel()) for i in seq.data.client_indices]
    assert len(set(sizes)) > 1  # uneven clients: different step counts and last-batch sizes
    start = {k: v.clone() for k, v in vec.global_state.items()}
    want, got = run(seq), run(vec)
    assert all(not torch.equal(vec.global_state[k], v) for k, v in start.items())  # every tensor trained
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for key in (k for k in w if not k.startswith("time/")):
            assert g[key] == pytest.approx(w[key], rel=1e-3), key
    for key, value in seq.global_state.items():
        moved = (value - start[key]).norm()
        assert (vec.global_state[key] - value).norm() <= 0.01 * moved, key
    a, b = seq.store.state_dict()["states"], vec.store.state_dict()["states"]
    assert a.keys() == b.keys()
    for cid, state in a.items():
        for key, value in state.items():
            assert (b[cid][key] - value).norm() <= 0.01 * (value - seq._default_personal[key[6:]]).norm(), key
    assert seq.evaluate() == pytest.approx(vec.evaluate(), abs=0.02, nan_ok=True)


@pytest.mark.parametrize("make, model, match", [
    (lambda: FedRoD(lr=0.05), "cnn", "FedRoD does not declare support"),
    (lambda: RatioLoss(lr=0.05), "cnn", "RatioLoss does not declare support"),  # a FedAvg subclass: not inherited
    (lambda: FedAvg(lr=0.05), "resnet8", "BatchNorm"),
])
def test_unsupported_methods_and_models_are_refused(make, model, match):
    with pytest.raises(VectorizationError, match=match):
        tiny_sim(make(), model=model, rounds=1, vectorize_cohort=True)


def test_the_cli_refuses_with_exit_2_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", TINY, "--run_dir", str(run_dir), "--method", "FedRoD",
                 "--trainer.vectorize_cohort", "true", "--logging.wandb", "false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "vectorize_cohort" in err and "FedRoD" in err and "Traceback" not in err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_vectorized_cli_run_trains_what_the_sequential_one_does(tmp_path):
    import json

    reports = {}
    for flag in ("true", "false"):
        run_dir = tmp_path / flag
        code = main(["fit", "--config", TINY, "--run_dir", str(run_dir), "--method", "FedProx",
                     "--trainer.vectorize_cohort", flag, "--trainer.rounds", "2", "--logging.wandb", "false",
                     "--logging.progress_bar", "false"])
        assert code in (0, None)
        reports[flag] = json.loads((run_dir / "final.json").read_text())["final"]
    assert reports["true"]["test/global/acc"] == pytest.approx(reports["false"]["test/global/acc"], abs=0.02)
    assert reports["true"]["test/personal/acc_mean"] == pytest.approx(reports["false"]["test/personal/acc_mean"],
                                                                     abs=0.02)
    weights = {flag: torch.load(tmp_path / flag / "checkpoints" / "round_00002.ckpt",
                                weights_only=False)["simulator"]["reducer"]["global"] for flag in reports}
    for key, value in weights["false"].items():
        torch.testing.assert_close(weights["true"][key], value, rtol=1e-3, atol=1e-3, msg=key)


@pytest.mark.parametrize("name", ["fedprox-clip", "fedper"])
def test_one_vectorized_step_equals_the_sequential_step(name, monkeypatch):
    """From identical parameters, one local step of every client: the vectorized gradients, clipping, momentum
    and weight decay give the sequential engine's parameters to float rounding."""
    from fedlt.engine.vectorized import VectorizedCohort

    seq = tiny_sim(CASES[name](), rounds=1, clients_per_round=5)
    vec = tiny_sim(CASES[name](), rounds=1, clients_per_round=5, vectorize_cohort=True)
    for sim in (seq, vec):
        sim.method.local_steps = 1
    message = seq.reducer.broadcast(1)
    clients = [0, 2, 3, 5]
    after = {}
    for cid in clients:
        seq.train_client(cid, message)
        after[cid] = {n: p.detach().clone() for n, p in seq.model.named_parameters()}
    captured = {}
    real = VectorizedCohort._fold

    def fold(self, clients_, stacked, fixed, contexts, losses):
        captured.update({n: v.clone() for n, v in stacked.items()})
        return real(self, clients_, stacked, fixed, contexts, losses)

    monkeypatch.setattr(VectorizedCohort, "_fold", fold)
    vec._vectorized.train(clients, vec.reducer.broadcast(1))
    for row, cid in enumerate(clients):
        for n, value in after[cid].items():
            torch.testing.assert_close(captured[n][row], value, rtol=1e-5, atol=1e-7, msg=f"{cid} {n}")


@pytest.mark.parametrize("exact", [True, False])
def test_stacked_accumulation_equals_one_call_per_client(exact):
    """The vectorized fold's one accumulation of all clients gives the per-client accumulations' sums (bit for bit
    with the exact reduction)."""
    from fedlt.methods.base import Reducer
    from fedlt.types import ClientUpdate

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    clients = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(4)]
    weights = [13.0, 7.0, 31.0, 2.0]
    one, many = Reducer(), Reducer()
    for r in (one, many):
        r.exact = exact
        r.setup({k: v.clone() for k, v in state.items()}, torch.device("cpu"))
        r.begin_round(1)
    for c, w in zip(clients, weights):
        one.accumulate(ClientUpdate(client_id=0, weight=w, tensors=c))
    many.accumulate_stacked(torch.tensor(weights, dtype=torch.float64),
                            {k: torch.stack([c[k] for c in clients]) for k in state})
    for r in (one, many):
        r.reduce(None)
        r.server_step(1)
    for k in state:
        if exact:
            assert torch.equal(one.global_state[k], many.global_state[k]), k
        else:
            torch.testing.assert_close(one.global_state[k], many.global_state[k])


@pytest.mark.parametrize("groups, stride, padding", [(1, 1, 2), (2, 2, 1)])
def test_stacked_layers_equal_each_clients_own_layer(groups, stride, padding):
    from fedlt.engine.vectorized import _StackedConv2d, _StackedLinear

    g = torch.Generator().manual_seed(0)
    k, b = 3, 4
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups)
    weights = torch.randn(k, *conv.weight.shape, generator=g)
    biases = torch.randn(k, 6, generator=g)
    x = torch.randn(k * b, 4, 9, 9, generator=g)
    stacked = _StackedConv2d(conv)
    stacked.weight, stacked.bias = weights, biases
    want = torch.cat([torch.nn.functional.conv2d(x[i * b:(i + 1) * b], weights[i], biases[i], stride, padding, 1,
                                                 groups) for i in range(k)])
    torch.testing.assert_close(stacked(x), want, rtol=1e-5, atol=1e-5)
    linear = _StackedLinear()
    linear.weight, linear.bias = torch.randn(k, 5, 7, generator=g), torch.randn(k, 5, generator=g)
    h = torch.randn(k * b, 7, generator=g)
    want = torch.cat([torch.nn.functional.linear(h[i * b:(i + 1) * b], linear.weight[i], linear.bias[i])
                      for i in range(k)])
    torch.testing.assert_close(linear(h), want, rtol=1e-5, atol=1e-5)


def test_models_without_a_declared_per_sample_forward_use_vmap():
    from fedlt.engine.vectorized import stacked_forward_model
    from fedlt.models import build_model

    assert stacked_forward_model(build_model("mlp", num_classes=10, in_features=64)) is not None
    assert stacked_forward_model(build_model("cnn", num_classes=10, in_channels=1, image_size=16)) is not None
    assert stacked_forward_model(build_model("resnet8", num_classes=10, in_channels=1, image_size=16)) is None


@pytest.mark.parametrize("loss", ["ce", "calibrated", "focal"])
def test_per_client_losses_equal_one_call_per_client(loss):
    from fedlt.losses import CalibratedCE, CrossEntropy, Focal

    fn = {"ce": CrossEntropy(), "calibrated": CalibratedCE(tau=1.0), "focal": Focal(gamma=2.0)}[loss]
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 5, 4, generator=g), torch.randint(0, 4, (3, 5), generator=g)
    counts = torch.tensor([[5.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0], [0.0, 9.0, 2.0, 0.0]])
    want = torch.stack([fn(logits[i], target[i], counts[i]) for i in range(3)])
    torch.testing.assert_close(fn.per_client(logits, target, counts), want, rtol=1e-6, atol=1e-6)
