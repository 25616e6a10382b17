"""Tests of the torchmetrics classes GroupedAccuracy and PersonalizedAccuracy."""

from __future__ import annotations

import math

import pytest
import torch

from fedlt.metrics import GroupedAccuracy, PersonalizedAccuracy, classification_summary, personal_summary

C = 7
GROUPS = [0, 0, 0, 1, 1, 2, 2]


def _batch(seed: int, n: int = 50, num_classes: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=gen)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    # Make about half the predictions right so that accuracies are far from 0 and 1.
    boost = torch.rand(n, generator=gen) < 0.5
    logits[boost, target[boost]] += 10.0
    return logits, target


def _reference_counts(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    hit = logits.argmax(1) == target
    correct = torch.tensor([int((hit & (target == c)).sum()) for c in range(num_classes)])
    total = torch.tensor([int((target == c).sum()) for c in range(num_classes)])
    return correct, total


def _reference_predicted(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = logits.argmax(1)
    return torch.tensor([int((labels == c).sum()) for c in range(num_classes)])


def _assert_matches(out: dict[str, torch.Tensor], ref: dict[str, float]) -> None:
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert out[key].dim() == 0 and out[key].is_floating_point()
        assert out[key].item() == pytest.approx(value, nan_ok=True, rel=1e-6), key


def test_grouped_accuracy_batches_equal_one_shot() -> None:
    batches = [_batch(seed) for seed in range(4)]
    metric = GroupedAccuracy(C, GROUPS)
    for logits, target in batches:
        metric.update(logits, target)
    logits = torch.cat([b[0] for b in batches])
    target = torch.cat([b[1] for b in batches])
    correct, total = _reference_counts(logits, target, C)
    predicted = _reference_predicted(logits, C)
    assert torch.equal(metric.correct, correct) and torch.equal(metric.total, total)
    assert torch.equal(metric.predicted, predicted)
    ref = classification_summary(correct, total, torch.tensor(GROUPS), predicted)
    assert not math.isnan(ref["pred_minmax_ratio"])
    _assert_matches(metric.compute(), ref)
    assert 0.3 < ref["acc"] < 0.9


def test_grouped_accuracy_labels_equal_logits() -> None:
    logits, target = _batch(11)
    from_logits = GroupedAccuracy(C, GROUPS)
    from_labels = GroupedAccuracy(C, torch.tensor(GROUPS))
    from_logits.update(logits, target)
    from_labels.update(logits.argmax(1), target)
    assert torch.equal(from_logits.correct, from_labels.correct)
    assert torch.equal(from_logits.total, from_labels.total)


def test_grouped_accuracy_hand_example() -> None:
    metric = GroupedAccuracy(3, [0, 1, 2])
    metric.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]))
    out = metric.compute()
    assert out["acc"].item() == pytest.approx(0.5)
    assert out["acc_many"].item() == pytest.approx(0.5)
    assert out["acc_medium"].item() == pytest.approx(0.5)
    assert math.isnan(out["acc_few"].item())


def test_grouped_accuracy_reset_and_reductions() -> None:
    metric = GroupedAccuracy(C, GROUPS)
    metric.update(*_batch(0))
    assert int(metric.total.sum()) == 50
    metric.reset()
    assert int(metric.total.sum()) == 0 and int(metric.correct.sum()) == 0
    assert metric.correct.dtype == torch.long and metric.correct.shape == (C,)
    assert metric._reductions["correct"] is not None and metric._reductions["total"] is not None
    # torchmetrics maps dist_reduce_fx="sum" to its dim_zero_sum reducer.
    assert metric._reductions["correct"].__name__ == "dim_zero_sum"
    assert metric._reductions["total"].__name__ == "dim_zero_sum"
    assert GroupedAccuracy.full_state_update is False
    assert GroupedAccuracy.higher_is_better is True


def test_grouped_accuracy_groups_follow_to_and_stay_out_of_state_dict() -> None:
    metric = GroupedAccuracy(C, GROUPS)
    moved = metric.to(torch.device("meta"))
    assert moved.groups.device.type == "meta" and moved.correct.device.type == "meta"
    fresh = GroupedAccuracy(C, GROUPS).to(torch.float64)
    assert fresh.groups.dtype == torch.long and torch.equal(fresh.groups, torch.tensor(GROUPS))
    assert "groups" not in GroupedAccuracy(C, GROUPS).state_dict()


@pytest.mark.parametrize(
    ("preds", "target"),
    [
        (torch.randn(4, C + 1), torch.zeros(4, dtype=torch.long)),  # wrong number of classes
        (torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)),  # batch mismatch
        (torch.zeros(4), torch.zeros(4, dtype=torch.long)),  # float 1-D preds are not labels
        (torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, C])),  # label out of range
    ],
)
def test_grouped_accuracy_rejects_bad_batches(preds: torch.Tensor, target: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        GroupedAccuracy(C, GROUPS).update(preds, target)


def test_grouped_accuracy_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match="shape"):
        GroupedAccuracy(C, [0, 1])
    with pytest.raises(ValueError, match="group ids"):
        GroupedAccuracy(3, [0, 1, 5])


def test_personalized_accuracy_scalar_and_tensor_ids_match_functional() -> None:
    num_clients = 5
    scalar = PersonalizedAccuracy(num_clients, C, GROUPS)
    vector = PersonalizedAccuracy(num_clients, C, GROUPS)
    correct = torch.zeros(num_clients, C, dtype=torch.long)
    total = torch.zeros(num_clients, C, dtype=torch.long)
    predicted = torch.zeros(num_clients, C, dtype=torch.long)
    for k in [0, 1, 3, 4]:  # client 2 never evaluated -> excluded
        for part in range(2):
            logits, target = _batch(10 * k + part, n=20 + k)
            scalar.update(logits, target, k)
            vector.update(logits.argmax(1), target, torch.full((target.numel(),), k))
            c, t = _reference_counts(logits, target, C)
            correct[k] += c
            total[k] += t
            predicted[k] += _reference_predicted(logits, C)
    assert torch.equal(scalar.correct, correct) and torch.equal(scalar.total, total)
    assert torch.equal(vector.correct, correct) and torch.equal(vector.total, total)
    assert torch.equal(scalar.predicted, predicted) and torch.equal(vector.predicted, predicted)
    ref = personal_summary(correct, total, torch.tensor(GROUPS), predicted)
    assert ref["num_clients"] == 4.0
    _assert_matches(scalar.compute(), ref)


def test_personalized_accuracy_mixed_client_batch() -> None:
    metric = PersonalizedAccuracy(3, 2, [0, 2])
    # client 0: labels (0, 1) predicted (0, 0) -> 1/2; client 2: label 1 predicted 1 -> 1/1.
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 2]))
    assert metric.total.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert metric.correct.tolist() == [[1, 0], [0, 0], [0, 1]]
    out = metric.compute()
    assert out["acc_mean"].item() == pytest.approx(0.75)
    assert out["acc_many"].item() == pytest.approx(1.0)
    assert out["acc_few"].item() == pytest.approx(0.5)
    assert math.isnan(out["acc_medium"].item())
    metric.reset()
    assert int(metric.total.sum()) == 0 and metric.total.shape == (3, 2)


def test_personalized_accuracy_reductions_and_bad_ids() -> None:
    metric = PersonalizedAccuracy(2, C, GROUPS)
    assert metric._reductions["correct"].__name__ == "dim_zero_sum"
    assert metric._reductions["total"].__name__ == "dim_zero_sum"
    logits, target = _batch(0, n=4)
    with pytest.raises(ValueError, match="client ids"):
        metric.update(logits, target, 2)
    with pytest.raises(ValueError, match="client_id"):
        metric.update(logits, target, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_clients"):
        PersonalizedAccuracy(0, C, GROUPS)


def test_grouped_accuracy_forward_returns_batch_value_and_accumulates() -> None:
    metric = GroupedAccuracy(3, [0, 1, 2])
    first = metric(torch.tensor([0, 0]), torch.tensor([0, 1]))  # 1/2 on this batch
    second = metric(torch.tensor([2, 2]), torch.tensor([2, 2]))  # 2/2 on this batch
    assert first["acc"].item() == pytest.approx(0.5) and second["acc"].item() == pytest.approx(1.0)
    assert metric.compute()["acc"].item() == pytest.approx(0.75)
    assert metric.total.tolist() == [1, 1, 2]
