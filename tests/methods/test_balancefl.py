"""BalanceFL invariants: with its three components off it is exactly FedAvg; the knowledge-inheritance terms equal
hand computations (only the missing classes, at temperature T; zero while the local model is the global one); the
balanced sampler draws every present class equally often, deterministically per seed; the feature augmentation adds
N(0, Sigma_k) noise exactly to the rows it selects, with the per-class rates and the shared covariance it claims."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import global_copy, run, tiny_sim

from fedlt.data import FederatedDataset
from fedlt.engine.simulator import Simulator
from fedlt.losses import Focal
from fedlt.methods import FedAvg
from fedlt.methods.balancefl import (
    BalanceFL,
    augment_features,
    augmentation_probabilities,
    balanced_positions,
    gaussian_factor,
    missing_class_kd,
    present_class_ce,
    present_class_entropy_sum,
    shared_covariance,
)
from fedlt.models import build_model

OFF = {"knowledge_inheritance": False, "balanced_sampling": False, "feature_augmentation": False}


def _data(client_counts: list[list[int]], shape: tuple[int, ...] = (16,), seed: int = 0) -> FederatedDataset:
    """Gaussian inputs of ``shape`` shifted by the label; client k holds ``client_counts[k][c]`` samples of class c."""
    g = torch.Generator().manual_seed(seed)
    labels = [torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]) for counts in client_counts]
    y = torch.cat(labels)
    x = torch.randn(len(y), *shape, generator=g) + y.float().view(-1, *([1] * len(shape)))
    starts = np.cumsum([0] + [len(lab) for lab in labels])
    parts = [torch.arange(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    return FederatedDataset.from_tensors(x, y, x[:20], y[:20], parts, num_classes=len(client_counts[0]))


def _sim(method, data: FederatedDataset, rounds: int = 1, clients: int = 1, model: str = "mlp") -> Simulator:
    torch.manual_seed(0)
    net = build_model(model, num_classes=data.num_classes, in_features=data.train.x.shape[1])
    return Simulator(None, data, net, method, rounds=rounds, clients_per_round=clients, seed=0).setup()


def _in_client(sim: Simulator, client: int, body):
    """Runs ``body(ctx)`` inside a client pass of round 1 (the workspace holds the global model)."""
    return sim.client_pass(client, sim.reducer.broadcast(1), 1234, body)


# -- FedAvg and the switches -----------------------------------------------------------------------------------------
def test_defaults_follow_the_paper_and_arguments_are_checked():
    m = BalanceFL()
    assert (m.knowledge_inheritance, m.balanced_sampling, m.feature_augmentation) == (True, True, True)
    assert (m.lam, m.temperature, m.missing_classes, m.teacher_mode, m.noise_pool, m.entropy_weight) == \
        (1.0, 2.0, "client", "eval", None, 0.0)
    BalanceFL(**BalanceFL.released_code, batch_size=64)
    for bad in ({"lam": -1.0}, {"temperature": 0.0}, {"missing_classes": "round"}, {"teacher_mode": "frozen"},
                {"noise_pool": 8, "batch_size": 16}, {"entropy_weight": -0.1}):
        with pytest.raises(ValueError):
            BalanceFL(**bad)
    with pytest.raises(ValueError, match="loss"):
        BalanceFL(loss=Focal())
    BalanceFL(knowledge_inheritance=False, loss=Focal())  # the plain loss applies without inheritance


@pytest.mark.parametrize("model", ["cnn", "resnet8"])
def test_all_components_off_is_exactly_fedavg(model):
    a = tiny_sim(FedAvg(lr=0.05, momentum=0.5, batch_size=16), model=model)
    b = tiny_sim(BalanceFL(lr=0.05, momentum=0.5, batch_size=16, **OFF), model=model)
    ma, mb = run(a), run(b)
    for k, v in global_copy(a).items():
        assert torch.equal(v, b.global_state[k]), k
    assert [m["train/loss"] for m in ma] == [m["train/loss"] for m in mb]


@pytest.mark.parametrize("component", ["knowledge_inheritance", "balanced_sampling", "feature_augmentation"])
def test_each_component_alone_changes_the_result(component):
    base = tiny_sim(BalanceFL(lr=0.05, batch_size=16, **OFF))
    one = tiny_sim(BalanceFL(lr=0.05, batch_size=16, **{**OFF, component: True}))
    run(base), run(one)
    assert any(not torch.equal(v, one.global_state[k]) for k, v in global_copy(base).items())
    assert all(torch.isfinite(v.float()).all() for v in one.global_state.values())


def test_defaults_and_released_code_train_finitely_on_a_batchnorm_model():
    for kwargs in ({}, BalanceFL.released_code):
        sim = tiny_sim(BalanceFL(lr=0.05, batch_size=16, **kwargs), model="resnet8")
        for metrics in run(sim):
            assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/loss_kd"])
        assert 0.0 <= sim.evaluate()["test/global/acc"] <= 1.0


# -- knowledge inheritance -------------------------------------------------------------------------------------------
def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_kd_is_the_hand_kl_over_the_missing_classes_at_temperature_t():
    student = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.0, 1.0, -2.0, 0.5, 1.5]])
    teacher = torch.tensor([[1.0, 0.0, 2.0, -1.0, 1.0], [-1.0, 2.0, 0.0, 1.0, -0.5]])
    missing = torch.tensor([1, 3, 4])
    for t in (1.0, 2.0, 4.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            p_s = _softmax([s_row[c] / t for c in (1, 3, 4)])
            p_t = _softmax([t_row[c] / t for c in (1, 3, 4)])
            expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)) / 2
        assert missing_class_kd(student, teacher, missing, t).item() == pytest.approx(expected, rel=1e-6)
    # The present classes (0, 2) do not enter; the code's soft cross-entropy is the KL plus the teacher's entropy.
    other = student.clone()
    other[:, [0, 2]] += torch.tensor([5.0, -7.0])
    assert torch.equal(missing_class_kd(other, teacher, missing, 2.0), missing_class_kd(student, teacher, missing, 2.0))
    log_s = F.log_softmax(student[:, missing] / 2, 1)
    p_t = F.softmax(teacher[:, missing] / 2, 1)
    soft_ce = -(p_t * log_s).sum(1).mean()
    entropy = -(p_t * p_t.log()).sum(1).mean()
    torch.testing.assert_close(missing_class_kd(student, teacher, missing, 2.0), soft_ce - entropy)


def test_kd_is_zero_when_the_local_model_agrees_on_the_missing_classes_or_none_is_missing():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=g)
    student = teacher.clone()
    student[:, [0, 2]] = torch.randn(6, 2, generator=g)  # differs only on the present classes
    assert missing_class_kd(student, teacher, torch.tensor([1, 3, 4]), 2.0).item() == 0.0
    assert missing_class_kd(student, teacher, torch.tensor([], dtype=torch.long), 2.0).item() == 0.0
    assert missing_class_kd(student, teacher, torch.tensor([1]), 2.0).item() == 0.0  # one class: one outcome


def test_present_class_ce_and_entropy_are_the_hand_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.0, 1.0, -2.0, 0.5, 1.5]])
    y = torch.tensor([0, 2])
    present = torch.tensor([0, 2, 4])
    expected = -(math.log(_softmax([2.0, 0.5, 0.0])[0]) + math.log(_softmax([0.0, -2.0, 1.5])[1])) / 2
    assert present_class_ce(logits, y, present).item() == pytest.approx(expected, rel=1e-6)
    ent = sum(-sum(p * math.log(p) for p in _softmax([r[c] for c in (0, 2, 4)])) for r in logits.tolist())
    assert present_class_entropy_sum(logits, present).item() == pytest.approx(ent, rel=1e-6)


def test_one_full_batch_step_is_sgd_on_the_hand_written_inheritance_loss():
    data = _data([[30, 0, 12, 2, 0]])  # classes 1 and 4 missing on the client
    x, y = data.train.x, data.train.y
    method = BalanceFL(balanced_sampling=False, feature_augmentation=False, lam=0.7, temperature=3.0, lr=0.5,
                       batch_size=len(y))
    sim = _sim(method, data)
    reference = copy.deepcopy(sim.model)
    teacher = copy.deepcopy(sim.model).eval()
    metrics = sim.run_round(1).metrics
    logits = reference(x)
    with torch.no_grad():
        t_logits = teacher(x)
    missing = torch.tensor([1, 4])
    ce = present_class_ce(logits, y, torch.tensor([0, 2, 3]))
    kd = missing_class_kd(logits, t_logits, missing, 3.0)
    (ce + 0.7 * kd).backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(sim.global_state[k], v, rtol=1e-5, atol=1e-6)
    assert metrics["train/loss_kd"] == 0.0  # the only step starts from the global model
    assert metrics["train/loss_ce"] == pytest.approx(ce.item(), rel=1e-5)


def test_kd_of_the_first_step_is_zero_and_later_steps_are_not():
    data = _data([[40, 0, 25, 6, 0]])
    sim = _sim(BalanceFL(balanced_sampling=False, feature_augmentation=False, lr=0.5, batch_size=8), data)
    method = sim.method
    batch = (data.train.x[:8], data.train.y[:8])

    def body(ctx):
        method.on_client_start(ctx)
        first = method.training_step(batch, ctx)
        with torch.no_grad():
            for p in method.model.parameters():
                p.add_(0.1)
        return first, method.training_step(batch, ctx)

    first, later = _in_client(sim, 0, body)
    assert first.parts["kd"].item() == 0.0 and later.parts["kd"].item() > 0.0


def test_missing_classes_per_client_or_per_batch():
    data = _data([[10, 0, 6, 3, 0]])
    y = torch.tensor([0, 2, 2])
    got = {}
    for where in ("client", "batch"):
        method = BalanceFL(missing_classes=where, balanced_sampling=False, feature_augmentation=False)
        sim = _sim(method, data)
        got[where] = _in_client(sim, 0, lambda ctx, m=method: (m.on_client_start(ctx), m.step_classes(y))[1])
    assert [t.tolist() for t in got["client"]] == [[0, 2, 3], [1, 4]]
    assert [t.tolist() for t in got["batch"]] == [[0, 2], [1, 3, 4]]


# -- balanced sampling -----------------------------------------------------------------------------------------------
def test_balanced_positions_draw_every_present_class_and_sample_equally_often():
    labels = torch.tensor([0] * 500 + [2] * 50 + [3] * 5)  # class 1 absent
    pos = balanced_positions(labels, 60_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels[pos], minlength=4).double() / 60_000
    assert freq[1] == 0.0
    torch.testing.assert_close(freq[[0, 2, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)
    tail = torch.bincount(pos[labels[pos] == 3] - 550, minlength=5).double() / 60_000  # each of class 3's samples
    torch.testing.assert_close(tail, torch.full((5,), 1 / 15, dtype=torch.float64), atol=0.005, rtol=0)
    again = balanced_positions(labels, 60_000, torch.Generator().manual_seed(0))
    other = balanced_positions(labels, 60_000, torch.Generator().manual_seed(1))
    assert torch.equal(pos, again) and not torch.equal(pos, other)


def test_the_local_batches_are_class_balanced_and_deterministic():
    data = _data([[200, 0, 20, 4, 0]])
    method = BalanceFL(knowledge_inheritance=False, feature_augmentation=False, batch_size=32)
    sim = _sim(method, data)

    def draws(ctx):
        method.on_client_start(ctx)
        return torch.cat([method.balanced_batch(32, ctx.generator)[1] for _ in range(300)])

    labels = _in_client(sim, 0, draws)
    freq = torch.bincount(labels, minlength=5).double() / labels.numel()
    assert freq[1] == 0.0 and freq[4] == 0.0
    torch.testing.assert_close(freq[[0, 2, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)
    assert torch.equal(labels, _in_client(sim, 0, draws))


def test_balanced_sampling_keeps_the_engines_step_count():
    data = _data([[45, 0, 10, 3, 0]])  # 58 samples, batches of 16: 4 steps per epoch
    counts = []
    for kwargs in (OFF, {**OFF, "balanced_sampling": True}):
        method = BalanceFL(batch_size=16, local_epochs=2, **kwargs)
        calls = []
        step = method.training_step
        method.training_step = lambda b, c, step=step, calls=calls: calls.append(len(b[1])) or step(b, c)
        _sim(method, data).run_round(1)
        counts.append(calls)
    assert counts[0] == counts[1] == [16, 16, 16, 10] * 2


# -- feature augmentation --------------------------------------------------------------------------------------------
def test_augment_features_adds_the_noise_to_the_selected_rows_only():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, requires_grad=True)
    mask = torch.tensor([True, False, True, False, False])
    noise = torch.randn(2, 3, generator=g)
    out = augment_features(h, mask, noise)
    assert torch.equal(out[mask], h[mask] + noise) and torch.equal(out[~mask], h[~mask])
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones(5, 3))  # the gradient reaches the features unchanged


def test_augmentation_probabilities_are_one_minus_the_ratio_to_the_local_head():
    probs = augmentation_probabilities(torch.tensor([10.0, 5.0, 0.0, 1.0]))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5, 1.0, 0.9]))


def test_shared_covariance_is_the_count_weighted_mean_of_the_class_covariances():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 7 + [2] * 4 + [3])  # class 3 has one sample (zero covariance), class 1 none
    z = torch.randn(len(y), 3, generator=g, dtype=torch.float64)
    covs = [np.cov(z[y == c].numpy().T) if (y == c).sum() > 1 else np.zeros((3, 3)) for c in (0, 2, 3)]
    expected = np.average(np.stack(covs), axis=0, weights=[7, 4, 1])
    np.testing.assert_allclose(shared_covariance(z, y).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_gaussian_factor_reproduces_a_singular_covariance_and_its_draws_have_it():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2, generator=g, dtype=torch.float64)
    cov = a @ a.T  # rank 2
    factor = gaussian_factor(cov)
    torch.testing.assert_close(factor @ factor.T, cov)
    eps = torch.randn(200_000, 4, generator=g, dtype=torch.float64) @ factor.T
    torch.testing.assert_close(eps.T @ eps / eps.shape[0], cov, atol=0.05 * cov.abs().max().item(), rtol=0)


def test_augmentation_rates_follow_the_local_counts():
    data = _data([[40, 0, 20, 4, 0]])
    method = BalanceFL(knowledge_inheritance=False, balanced_sampling=False)
    sim = _sim(method, data)
    y = torch.tensor([0, 2, 3]).repeat(4000)

    def body(ctx):
        method.on_client_start(ctx)
        h = torch.zeros(len(y), method.model.num_features)
        return (method.augment(h, y, ctx.generator) != 0).any(1)

    changed = _in_client(sim, 0, body)
    rates = torch.stack([changed[y == c].double().mean() for c in (0, 2, 3)])
    torch.testing.assert_close(rates, torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64), atol=0.03, rtol=0)


def test_the_released_codes_noise_pool_is_handed_out_in_order_and_restarts():
    data = _data([[40, 0, 20, 4, 0]])
    method = BalanceFL(knowledge_inheritance=False, balanced_sampling=False, noise_pool=16, batch_size=16)
    sim = _sim(method, data)

    def body(ctx):
        method.on_client_start(ctx)
        pool = method._pool.clone()
        return pool, [method.noise(n, ctx.generator) for n in (6, 6, 4)]

    pool, noise = _in_client(sim, 0, body)
    assert pool.shape == (16, method.model.num_features)
    assert torch.equal(noise[0], pool[:6]) and torch.equal(noise[1], pool[6:12])
    assert torch.equal(noise[2], pool[:4])  # 12 + 4 >= 16: the code restarts from the first vector


def test_statistics_pass_uses_the_global_model_and_leaves_the_workspace_untouched():
    data = _data([[30, 0, 12, 2, 0]], shape=(3, 16, 16))
    for mode in ("eval", "train"):
        method = BalanceFL(knowledge_inheritance=False, balanced_sampling=False, teacher_mode=mode, batch_size=8)
        torch.manual_seed(0)
        net = build_model("resnet8", num_classes=5, in_channels=3, image_size=16)
        sim = Simulator(None, data, net, method, rounds=1, clients_per_round=1, seed=0).setup()
        before = global_copy(sim)

        def body(ctx, method=method):
            method.on_client_start(ctx)
            state = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
            return method._factor @ method._factor.T, state

        cov, after = _in_client(sim, 0, body)
        for k, v in before.items():
            assert torch.equal(after[k], v), (mode, k)
        if mode == "eval":
            teacher = copy.deepcopy(sim.model).eval()
            with torch.no_grad():
                feats = teacher.forward_features(data.train.x[data.client_indices[0]])
            expected = shared_covariance(feats.double(), data.train.y[data.client_indices[0]])
            torch.testing.assert_close(cov, expected, atol=1e-6 * expected.abs().max().item(), rtol=0)
