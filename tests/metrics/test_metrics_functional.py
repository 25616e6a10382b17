"""Tests of fedlt.metrics.functional against sklearn / numpy references and hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

from fedlt.metrics.functional import GROUP_NAMES, classification_summary, per_class_accuracy, personal_summary


def _counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class counts computed with numpy only (independent of the code under test)."""
    correct = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    total = np.bincount(y_true, minlength=num_classes)
    return torch.from_numpy(correct).long(), torch.from_numpy(total).long()


def _worst_fraction(values: np.ndarray) -> float:
    k = math.ceil(0.1 * len(values))
    return float(np.sort(values)[:k].mean())


def _random_case(seed: int, num_classes: int = 13, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Long-tailed labels so that some classes are rare or absent, and predictions that are right ~60 % of the time.
    probs = 0.7 ** np.arange(num_classes)
    y_true = rng.choice(num_classes, size=n, p=probs / probs.sum())
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, num_classes, size=n))
    groups = np.sort(rng.integers(0, 3, size=num_classes))
    return y_true, y_pred, groups


def test_group_names() -> None:
    assert GROUP_NAMES == ("many", "medium", "few")


def test_hand_worked_classification_summary() -> None:
    correct = torch.tensor([5, 3, 0, 1])
    total = torch.tensor([10, 5, 0, 4])
    groups = torch.tensor([0, 0, 1, 2])
    out = classification_summary(correct, total, groups)
    assert out["acc"] == pytest.approx(9 / 19)
    assert out["acc_many"] == pytest.approx(8 / 15)
    assert math.isnan(out["acc_medium"])  # the medium group has no test sample
    assert out["acc_few"] == pytest.approx(0.25)
    assert out["acc_worst_class"] == pytest.approx(0.25)
    assert out["acc_class_std"] == pytest.approx(float(np.std([0.5, 0.6, 0.25])))
    assert out["acc_worst10_classes"] == pytest.approx(0.25)  # ceil(0.1 * 3) = 1 class
    assert set(out) == {
        "acc",
        "acc_many",
        "acc_medium",
        "acc_few",
        "acc_worst_class",
        "acc_class_std",
        "acc_worst10_classes",
        "acc_minmax_ratio",
        "pred_minmax_ratio",
        "balancedness",
    }
    assert out["acc_minmax_ratio"] == pytest.approx(0.25 / 0.6)
    assert math.isnan(out["pred_minmax_ratio"])  # no predicted counts given
    assert out["balancedness"] == out["acc_worst_class"]


def test_per_class_accuracy_nan_where_empty() -> None:
    acc = per_class_accuracy(torch.tensor([1, 0, 2]), torch.tensor([2, 0, 2]))
    assert acc[0].item() == pytest.approx(0.5)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_per_class_accuracy_matches_sklearn_recall(seed: int) -> None:
    y_true, y_pred, _ = _random_case(seed)
    correct, total = _counts(y_true, y_pred, 13)
    ref = recall_score(y_true, y_pred, labels=np.arange(13), average=None, zero_division=np.nan)
    np.testing.assert_allclose(per_class_accuracy(correct, total).numpy(), ref, equal_nan=True)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_classification_summary_matches_references(seed: int) -> None:
    y_true, y_pred, groups = _random_case(seed)
    correct, total = _counts(y_true, y_pred, 13)
    out = classification_summary(correct, total, torch.from_numpy(groups))
    assert out["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    for gid, name in enumerate(GROUP_NAMES):
        in_group = np.isin(y_true, np.flatnonzero(groups == gid))
        expected = accuracy_score(y_true[in_group], y_pred[in_group]) if in_group.any() else math.nan
        assert out[f"acc_{name}"] == pytest.approx(expected, nan_ok=True)
    present = np.unique(y_true)
    recalls = recall_score(y_true, y_pred, labels=present, average=None)
    # balanced accuracy = mean per-class recall over classes present in y_true: cross-checks `present`.
    assert recalls.mean() == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert out["acc_worst_class"] == pytest.approx(recalls.min())
    assert out["acc_class_std"] == pytest.approx(np.std(recalls))
    assert out["acc_worst10_classes"] == pytest.approx(_worst_fraction(recalls))


def test_worst10_uses_ceil_of_ten_percent() -> None:
    # 11 evaluated classes -> ceil(1.1) = 2 worst classes; accuracies 0/10, 1/10, ..., 10/10.
    total = torch.full((11,), 10)
    correct = torch.arange(11)
    out = classification_summary(correct, total, torch.zeros(11, dtype=torch.long))
    assert out["acc_worst10_classes"] == pytest.approx(0.05)
    assert out["acc_worst_class"] == pytest.approx(0.0)


def test_classification_summary_no_samples_is_nan() -> None:
    zeros = torch.zeros(4, dtype=torch.long)
    out = classification_summary(zeros, zeros, torch.tensor([0, 1, 2, 2]))
    assert all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize(
    ("correct", "total", "groups"),
    [
        (torch.tensor([1, 2]), torch.tensor([1, 2, 3]), torch.tensor([0, 0])),  # shape mismatch
        (torch.tensor([2, 0]), torch.tensor([1, 1]), torch.tensor([0, 0])),  # correct > total
        (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 3])),  # bad group id
        (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0])),  # groups wrong length
        (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 0])),  # float counts
    ],
)
def test_classification_summary_rejects_bad_input(
    correct: torch.Tensor, total: torch.Tensor, groups: torch.Tensor
) -> None:
    with pytest.raises(ValueError):
        classification_summary(correct, total, groups)


def test_hand_worked_personal_summary() -> None:
    # client 0: 3/4 overall (many 2/2, few 1/2); client 1: no samples (excluded); client 2: 1/4 (medium 1/4).
    correct = torch.tensor([[2, 0, 1], [0, 0, 0], [0, 1, 0]])
    total = torch.tensor([[2, 0, 2], [0, 0, 0], [0, 4, 0]])
    groups = torch.tensor([0, 1, 2])
    out = personal_summary(correct, total, groups)
    assert out["num_clients"] == 2.0
    assert out["acc_mean"] == pytest.approx(0.5)
    assert out["acc_std"] == pytest.approx(0.25)
    assert out["acc_worst10"] == pytest.approx(0.25)
    assert out["acc_many"] == pytest.approx(1.0)
    assert out["acc_medium"] == pytest.approx(0.25)
    assert out["acc_few"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_personal_summary_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    num_clients, num_classes = 23, 9
    groups = rng.integers(0, 3, size=num_classes)
    correct = np.zeros((num_clients, num_classes), dtype=np.int64)
    total = np.zeros_like(correct)
    client_acc, group_acc = [], {name: [] for name in GROUP_NAMES}
    for k in range(num_clients):
        n = 0 if k % 7 == 3 else int(rng.integers(1, 60))  # some clients have no local test sample
        y_true = rng.integers(0, num_classes, size=n)
        y_pred = np.where(rng.random(n) < rng.random(), y_true, rng.integers(0, num_classes, size=n))
        c, t = _counts(y_true, y_pred, num_classes)
        correct[k], total[k] = c.numpy(), t.numpy()
        if n == 0:
            continue
        client_acc.append(accuracy_score(y_true, y_pred))
        for gid, name in enumerate(GROUP_NAMES):
            mask = groups[y_true] == gid
            if mask.any():
                group_acc[name].append(accuracy_score(y_true[mask], y_pred[mask]))
    out = personal_summary(torch.from_numpy(correct), torch.from_numpy(total), torch.from_numpy(groups))
    assert out["num_clients"] == float(len(client_acc))
    assert out["acc_mean"] == pytest.approx(np.mean(client_acc))
    assert out["acc_std"] == pytest.approx(np.std(client_acc))
    assert out["acc_worst10"] == pytest.approx(_worst_fraction(np.array(client_acc)))
    for name in GROUP_NAMES:
        expected = np.mean(group_acc[name]) if group_acc[name] else math.nan
        assert out[f"acc_{name}"] == pytest.approx(expected, nan_ok=True)


def test_personal_summary_empty_group_and_no_clients() -> None:
    correct = torch.tensor([[1, 0], [0, 0]])
    total = torch.tensor([[2, 0], [0, 0]])
    out = personal_summary(correct, total, torch.tensor([0, 2]))
    assert out["acc_mean"] == pytest.approx(0.5)
    assert math.isnan(out["acc_medium"]) and math.isnan(out["acc_few"])
    empty = personal_summary(
        torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 2])
    )
    assert empty["num_clients"] == 0.0
    assert math.isnan(empty["acc_mean"]) and math.isnan(empty["acc_worst10"])


def test_personal_summary_rejects_1d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        personal_summary(torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
