"""FedPuReL balancedness candidates (docs/reference.md 1.7, definition pending): hand-worked GM and PM values, nan
handling, the ``balancedness`` alias, the ``balancedness(kind=...)`` selector and exact sync of the count states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlt.metrics import (
    BALANCEDNESS_KINDS,
    DEFAULT_BALANCEDNESS,
    GroupedAccuracy,
    PersonalizedAccuracy,
    balancedness,
    classification_summary,
    personal_summary,
)

GM_CANDIDATES = ("acc_worst_class", "acc_minmax_ratio", "acc_worst10_classes", "acc_class_std", "pred_minmax_ratio")
PM_CANDIDATES = tuple(f"{key}_mean" for key in GM_CANDIDATES)


def _gm(preds: list[int], target: list[int], num_classes: int) -> dict[str, float]:
    metric = GroupedAccuracy(num_classes, [0] * num_classes)
    metric.update(torch.tensor(preds), torch.tensor(target))
    return {k: v.item() for k, v in metric.compute().items()}


def test_kinds_and_default() -> None:
    assert DEFAULT_BALANCEDNESS == "worst_class"
    assert tuple(BALANCEDNESS_KINDS.values()) == GM_CANDIDATES


def test_gm_hand_worked_all_candidates() -> None:
    # class 0: 4 samples, 3 right; class 1: 5 samples, 4 right (one predicted as class 3, which has no test
    # sample); class 2: 2 samples, 1 right; class 3: no test sample.
    target = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    preds = [0, 0, 0, 2, 1, 1, 1, 1, 3, 2, 0]
    out = _gm(preds, target, 4)
    assert out["acc"] == pytest.approx(8 / 11)
    assert out["acc_worst_class"] == pytest.approx(0.5)  # (a)
    assert out["acc_minmax_ratio"] == pytest.approx(0.5 / 0.8)  # (b)
    assert out["acc_worst10_classes"] == pytest.approx(0.5)  # (c): ceil(0.1 * 3) = 1 class
    assert out["acc_class_std"] == pytest.approx(float(np.std([0.75, 0.8, 0.5])), rel=1e-6)
    # (d): predicted counts (4, 4, 2, 1); class 3 has no test sample so its prediction is ignored -> 2 / 4.
    assert out["pred_minmax_ratio"] == pytest.approx(0.5)
    assert out["balancedness"] == out["acc_worst_class"]


def test_gm_class_with_zero_accuracy() -> None:
    # class 0: 3/4, class 1: 2/2, class 2: 0/2 (predicted as 1 and 3); class 3 no test sample.
    out = _gm([0, 0, 0, 1, 1, 1, 1, 3], [0, 0, 0, 0, 1, 1, 2, 2], 4)
    assert out["acc_worst_class"] == 0.0
    assert out["acc_minmax_ratio"] == 0.0
    assert out["acc_worst10_classes"] == 0.0
    assert out["pred_minmax_ratio"] == 0.0  # class 2 is never predicted
    assert out["balancedness"] == 0.0


def test_gm_all_wrong_ratio_is_nan_and_no_samples_all_nan() -> None:
    out = _gm([1, 0], [0, 1], 2)
    assert out["acc_worst_class"] == 0.0
    assert math.isnan(out["acc_minmax_ratio"])  # max_c acc_c = 0
    assert out["pred_minmax_ratio"] == pytest.approx(1.0)  # each class predicted once
    empty = GroupedAccuracy(3, [0, 1, 2]).compute()
    assert all(math.isnan(empty[key].item()) for key in (*GM_CANDIDATES, "balancedness"))


def test_gm_pred_ratio_nan_when_no_prediction_lands_on_a_test_class() -> None:
    out = _gm([1, 1], [0, 0], 2)
    assert math.isnan(out["pred_minmax_ratio"])  # class 0 (the only test class) is never predicted, max = 0


def test_balancedness_selector_matches_summary() -> None:
    correct, total, predicted = torch.tensor([3, 4, 1, 0]), torch.tensor([4, 5, 2, 0]), torch.tensor([4, 4, 2, 1])
    out = classification_summary(correct, total, torch.zeros(4, dtype=torch.long), predicted)
    for kind, key in BALANCEDNESS_KINDS.items():
        assert balancedness(correct, total, predicted, kind=kind) == pytest.approx(out[key]), kind
    assert balancedness(correct, total, predicted) == out["balancedness"] == out["acc_worst_class"]
    assert math.isnan(balancedness(correct, total, kind="pred_minmax_ratio"))  # no predicted counts
    with pytest.raises(ValueError, match="kind"):
        balancedness(correct, total, kind="entropy")


@pytest.mark.parametrize(
    "predicted",
    [
        torch.tensor([4, 4, 2]),  # wrong shape
        torch.tensor([4.0, 4.0, 2.0, 1.0]),  # float
        torch.tensor([2, 5, 3, 1]),  # correct[0] = 3 > predicted[0]
        torch.tensor([4, 4, 2, 2]),  # 12 predictions for 11 samples
    ],
)
def test_predicted_counts_are_validated(predicted: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        classification_summary(torch.tensor([3, 4, 1, 0]), torch.tensor([4, 5, 2, 0]), torch.zeros(4).long(), predicted)


def test_predicted_label_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="predicted labels"):
        GroupedAccuracy(3, [0, 1, 2]).update(torch.tensor([0, 3]), torch.tensor([0, 1]))


def _pm_hand_metric() -> PersonalizedAccuracy:
    metric = PersonalizedAccuracy(4, 3, [0, 1, 2])
    # client 0: classes 0 (1/2) and 1 (3/4); one prediction of class 2, absent from its test set.
    metric.update(torch.tensor([0, 1, 1, 1, 2, 1]), torch.tensor([0, 0, 1, 1, 1, 1]), 0)
    # client 1: no test sample. client 2: a single test class (2), 2/3 right.
    metric.update(torch.tensor([2, 0, 2]), torch.tensor([2, 2, 2]), 2)
    return metric


def test_pm_hand_worked_all_candidates() -> None:
    metric = _pm_hand_metric()
    assert metric.predicted.tolist() == [[1, 4, 1], [0, 0, 0], [1, 0, 2], [0, 0, 0]]
    out = {k: v.item() for k, v in metric.compute().items()}
    # client 0: acc_c (0.5, 0.75); client 2: acc_c (2/3).
    assert out["num_clients"] == 2.0
    assert out["acc_mean"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert out["acc_worst_class_mean"] == pytest.approx((0.5 + 2 / 3) / 2)  # (a)
    assert out["acc_minmax_ratio_mean"] == pytest.approx((0.5 / 0.75 + 1.0) / 2)  # (b): single class -> 1
    assert out["acc_worst10_classes_mean"] == pytest.approx((0.5 + 2 / 3) / 2)  # (c)
    assert out["acc_class_std_mean"] == pytest.approx((0.125 + 0.0) / 2)
    # (d) over the client's test classes only: client 0 (1, 4) -> 1/4; client 2 (2) -> 1 (its class-0 prediction
    # is ignored).
    assert out["pred_minmax_ratio_mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["balancedness"] == out["acc_worst_class_mean"]


def test_pm_zero_accuracy_single_class_client_is_left_out_of_undefined_ratios() -> None:
    metric = _pm_hand_metric()
    metric.update(torch.tensor([0]), torch.tensor([1]), 3)  # client 3: one sample of class 1, wrong
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out["num_clients"] == 3.0
    assert out["acc_worst_class_mean"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert out["acc_worst10_classes_mean"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert out["acc_class_std_mean"] == pytest.approx(0.125 / 3)
    # client 3: max acc = 0 and no prediction on class 1 -> both ratios undefined, averaged over clients 0 and 2.
    assert out["acc_minmax_ratio_mean"] == pytest.approx((0.5 / 0.75 + 1.0) / 2)
    assert out["pred_minmax_ratio_mean"] == pytest.approx((0.25 + 1.0) / 2)


def test_pm_no_clients_and_no_predicted_counts_are_nan() -> None:
    out = PersonalizedAccuracy(2, 3, [0, 1, 2]).compute()
    assert all(math.isnan(out[key].item()) for key in (*PM_CANDIDATES, "balancedness"))
    metric = _pm_hand_metric()
    without = personal_summary(metric.correct, metric.total, metric.groups)
    assert math.isnan(without["pred_minmax_ratio_mean"])
    assert without["acc_worst_class_mean"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_pm_existing_keys_unchanged_by_predicted_counts() -> None:
    metric = _pm_hand_metric()
    with_pred = personal_summary(metric.correct, metric.total, metric.groups, metric.predicted)
    without = personal_summary(metric.correct, metric.total, metric.groups)
    for key in ("acc_mean", "acc_std", "acc_worst10", "acc_many", "acc_medium", "acc_few", "num_clients"):
        assert with_pred[key] == pytest.approx(without[key], nan_ok=True), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pm_matches_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_clients, num_classes = 9, 6
    metric = PersonalizedAccuracy(num_clients, num_classes, rng.integers(0, 3, size=num_classes).tolist())
    per_client = {key: [] for key in PM_CANDIDATES}
    for k in range(num_clients):
        n = 0 if k == 4 else int(rng.integers(1, 40))
        present_classes = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
        y = rng.choice(present_classes, size=n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, num_classes, size=n))
        metric.update(torch.from_numpy(p), torch.from_numpy(y), k)
        if n == 0:
            continue
        classes = np.unique(y)
        acc = np.array([(p[y == c] == c).mean() for c in classes])
        freq = np.array([(p == c).sum() for c in classes], dtype=float)
        per_client["acc_worst_class_mean"].append(acc.min())
        per_client["acc_minmax_ratio_mean"].append(acc.min() / acc.max() if acc.max() > 0 else math.nan)
        per_client["acc_worst10_classes_mean"].append(np.sort(acc)[: math.ceil(0.1 * len(acc))].mean())
        per_client["acc_class_std_mean"].append(acc.std())
        per_client["pred_minmax_ratio_mean"].append(freq.min() / freq.max() if freq.max() > 0 else math.nan)
    out = metric.compute()
    for key, values in per_client.items():
        assert out[key].item() == pytest.approx(float(np.nanmean(values)), rel=1e-6), key


def _gm_pair_and_whole(seed: int) -> tuple[list[GroupedAccuracy], GroupedAccuracy]:
    gen = torch.Generator().manual_seed(seed)
    logits, target = torch.randn(60, 5, generator=gen), torch.randint(0, 5, (60,), generator=gen)
    halves = [GroupedAccuracy(5, [0, 0, 1, 1, 2]) for _ in range(2)]
    halves[0].update(logits[:25], target[:25])
    halves[1].update(logits[25:], target[25:])
    whole = GroupedAccuracy(5, [0, 0, 1, 1, 2])
    whole.update(logits, target)
    return halves, whole


def _pm_pair_and_whole(seed: int) -> tuple[list[PersonalizedAccuracy], PersonalizedAccuracy]:
    gen = torch.Generator().manual_seed(seed)
    logits, target = torch.randn(80, 5, generator=gen), torch.randint(0, 5, (80,), generator=gen)
    clients = torch.randint(0, 4, (80,), generator=gen)
    halves = [PersonalizedAccuracy(4, 5, [0, 0, 1, 1, 2]) for _ in range(2)]
    halves[0].update(logits[:30], target[:30], clients[:30])
    halves[1].update(logits[30:], target[30:], clients[30:])
    whole = PersonalizedAccuracy(4, 5, [0, 0, 1, 1, 2])
    whole.update(logits, target, clients)
    return halves, whole


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), nan_ok=True), key


@pytest.mark.parametrize("make", [_gm_pair_and_whole, _pm_pair_and_whole])
def test_merged_halves_equal_whole(make) -> None:
    (first, second), whole = make(3)
    assert first._reductions["predicted"].__name__ == "dim_zero_sum"
    first.merge_state(second)
    for state in ("correct", "total", "predicted"):
        assert torch.equal(getattr(first, state), getattr(whole, state)), state
    _assert_same(first.compute(), whole.compute())


@pytest.mark.parametrize("make", [_gm_pair_and_whole, _pm_pair_and_whole])
def test_simulated_two_rank_sync_equals_whole(make) -> None:
    """torchmetrics' own sync-on-compute path (gather every rank's states, then the sum reduction, then unsync)
    with a fake two-rank gather: rank 0's compute() must equal one metric updated on everything."""
    (first, second), whole = make(4)
    mine = {name: getattr(first, name).clone() for name in ("correct", "total", "predicted")}

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        name = next(n for n, t in mine.items() if t.shape == tensor.shape and torch.equal(t, tensor))
        return [tensor, getattr(second, name)]

    first.dist_sync_fn = gather
    first.distributed_available_fn = lambda: True
    _assert_same(first.compute(), whole.compute())
    for name, local in mine.items():  # unsynced afterwards: the local shard is kept, still integer counts
        assert torch.equal(getattr(first, name), local) and local.dtype == torch.long, name


def test_vectorized_personal_balancedness_equals_the_per_client_candidates():
    """The (K, C) table's per-client candidates, computed for all clients at once, equal the one-row function's
    averaged over the clients that define them (random tables with absent classes and clients)."""
    import math

    from fedlt.metrics.functional import BALANCEDNESS_KINDS, _balancedness_candidates, _personal_balancedness

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        k, c = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 25, (1,), generator=g))
        total = torch.randint(0, 6, (k, c), generator=g) * (torch.rand(k, c, generator=g) > 0.4)
        correct = (total * torch.rand(k, c, generator=g)).floor().long()
        predicted = torch.randint(0, 5, (k, c), generator=g) if trial % 3 else None
        rows = [_balancedness_candidates(correct[i], total[i], None if predicted is None else predicted[i])
                for i in range(k) if total[i].sum() > 0]
        got = _personal_balancedness(correct, total, predicted)
        for key in BALANCEDNESS_KINDS.values():
            values = [r[key] for r in rows if not math.isnan(r[key])]
            want = sum(values) / len(values) if values else math.nan
            assert (math.isnan(want) and math.isnan(got[f"{key}_mean"])) or got[f"{key}_mean"] == pytest.approx(
                want, rel=1e-12, abs=1e-15), (trial, key)
