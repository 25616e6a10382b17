"""Class-group sources of the evaluation protocol: GM groups from the summed local-test quotas and per-client PM
groups (the released FedLoGe evaluation), checked against a hand-written reference of that evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt.data.federated import FederatedDataset
from fedlt.data.longtail import class_groups
from fedlt.data.partition import Dirichlet
from fedlt.data.sources import EmbeddedDigits
from fedlt.metrics import PersonalizedAccuracy
from fedlt.metrics.functional import personal_summary

_SMALL = {"image_size": 16, "train_per_class": 300, "test_per_class": 40}


def reference_shot_split(counts, head=75.0, medium=95.0) -> dict[str, list[int]]:
    """The released FedLoGe rule, written out: sort the classes by count (descending, ties by class id), walk the
    cumulative percentage; the class whose interval (previous %, this %] holds 75 closes "head", the one holding 95
    closes "middle", the rest is "tail"."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    total = float(sum(counts))
    cut1 = cut2 = 0
    prev = 0.0
    for i, c in enumerate(order):
        cur = prev + counts[c] / total * 100.0
        if prev < head <= cur:
            cut1 = i
        if prev < medium <= cur:
            cut2 = i
        prev = cur
    return {"head": order[: cut1 + 1], "middle": order[cut1 + 1 : cut2 + 1], "tail": order[cut2 + 1 :]}


def _as_ids(split: dict[str, list[int]], num_classes: int) -> np.ndarray:
    out = np.zeros(num_classes, dtype=np.int64)
    for gid, key in enumerate(("head", "middle", "tail")):
        out[split[key]] = gid
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedlt_cache")


def _dataset(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, **kwargs) -> FederatedDataset:
    monkeypatch.setenv("FEDLT_CACHE", str(cache_dir))
    ds = FederatedDataset(EmbeddedDigits(**_SMALL), num_clients=6, imbalance_factor=10.0,
                          partition=Dirichlet(0.5, min_size=5), seed=2, group_convention="cumulative", **kwargs)
    ds.setup("cpu")
    return ds


def test_reference_rule_matches_class_groups_cumulative() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 60, size=12)
        counts[0] = max(counts[0], 1)
        np.testing.assert_array_equal(class_groups(counts, "cumulative"), _as_ids(reference_shot_split(counts), 12))


def test_gm_groups_from_summed_local_test_quotas(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = _dataset(cache_dir, monkeypatch)
    quotas = _dataset(cache_dir, monkeypatch, group_source="local_test")
    # The same split; only where the GM groups come from differs.
    assert all(torch.equal(a, b) for a, b in zip(train.client_test_indices, quotas.client_test_indices))
    summed = np.zeros(10, dtype=np.int64)
    for idx in quotas.client_test_indices:
        summed += np.bincount(quotas.test.y[idx].numpy(), minlength=10)
    np.testing.assert_array_equal(quotas.client_test_counts.sum(0), summed)
    np.testing.assert_array_equal(quotas.groups, _as_ids(reference_shot_split(summed.tolist()), 10))
    np.testing.assert_array_equal(train.groups, _as_ids(reference_shot_split(train.class_counts.tolist()), 10))
    assert train.client_groups is None and quotas.client_groups is None


def test_pm_groups_per_client_match_the_released_local_evaluation(cache_dir, monkeypatch) -> None:
    data = _dataset(cache_dir, monkeypatch, pm_group_source="local_test")
    k_clients, c = data.num_clients, data.num_classes
    for k in range(k_clients):
        np.testing.assert_array_equal(data.client_groups[k],
                                      _as_ids(reference_shot_split(data.client_test_counts[k].tolist()), c))
    # Predictions: right on even-indexed test samples, a fixed wrong class elsewhere.
    g = torch.Generator().manual_seed(0)
    metric = PersonalizedAccuracy(k_clients, c, torch.as_tensor(data.client_groups))
    ref = {"head": [], "middle": [], "tail": []}
    for k, idx in enumerate(data.client_test_indices):
        y = data.test.y[idx]
        wrong = torch.rand(y.shape, generator=g) < 0.4
        pred = torch.where(wrong, (y + 1) % c, y)
        metric.update(pred, y, k)
        split = reference_shot_split(data.client_test_counts[k].tolist())
        for key in ref:  # the released code: a group counts for a client only when it has test samples there
            in_group = torch.isin(y, torch.as_tensor(split[key], dtype=torch.long))
            if int(in_group.sum()):
                ref[key].append(float((pred[in_group] == y[in_group]).float().mean()))
    out = metric.compute()
    for key, name in zip(ref, ("many", "medium", "few")):
        assert float(out[f"acc_{name}"]) == pytest.approx(float(np.mean(ref[key])), rel=1e-6)
    # With the global groups the same predictions give other group accuracies.
    shared = PersonalizedAccuracy(k_clients, c, torch.as_tensor(data.groups))
    shared.correct, shared.total, shared.predicted = metric.correct, metric.total, metric.predicted
    assert any(float(shared.compute()[f"acc_{n}"]) != pytest.approx(float(out[f"acc_{n}"]), rel=1e-6)
               for n in ("many", "medium", "few"))


def test_personal_summary_shared_groups_equal_a_repeated_table() -> None:
    g = torch.Generator().manual_seed(3)
    total = torch.randint(0, 6, (5, 7), generator=g)
    correct = (total.float() * torch.rand(5, 7, generator=g)).floor().long()
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    a = personal_summary(correct, total, groups)
    b = personal_summary(correct, total, groups.expand(5, 7).clone())
    assert a == pytest.approx(b, nan_ok=True)
    with pytest.raises(ValueError, match="per-client groups"):
        personal_summary(correct, total, groups.expand(4, 7).clone())


def test_group_sources_are_validated(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="group_source"):
        FederatedDataset(EmbeddedDigits(root=str(cache_dir)), group_source="test")
    with pytest.raises(ValueError, match="pm_group_source"):
        FederatedDataset(EmbeddedDigits(root=str(cache_dir)), pm_group_source="clients")
    with pytest.raises(ValueError, match="need local test sets"):
        FederatedDataset(EmbeddedDigits(root=str(cache_dir)), local_test="none", pm_group_source="local_test")
