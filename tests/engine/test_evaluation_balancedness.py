"""The Evaluator feeds predicted labels to the GM and PM metrics so that the balancedness candidates (docs/reference.md
1.7) come out of every path: the fast PM path (global predictions read off by index), the per-client path and the
per-client masked path (FedLoGe's mask_absent_classes). A stub simulator with a fixed prediction table is enough."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlt.engine.comm import Comm
from fedlt.engine.evaluation import Evaluator

C = 3
TEST_Y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
GLOBAL_PRED = torch.tensor([0, 1, 1, 1, 2, 0, 0, 2])  # GM: class 0 2/3, class 1 2/3, class 2 1/2
CLIENT_IDX = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]), torch.tensor([], dtype=torch.long)]

GM_KEYS = ("balancedness", "acc_worst_class", "acc_minmax_ratio", "acc_worst10_classes", "acc_class_std",
           "pred_minmax_ratio")
PM_KEYS = ("balancedness", "acc_worst_class_mean", "acc_minmax_ratio_mean", "acc_worst10_classes_mean",
           "acc_class_std_mean", "pred_minmax_ratio_mean")


class _Method:
    has_global_model = True

    def __init__(self, personalizes: bool, personal_bias: float) -> None:
        self.personalizes = personalizes
        self.personal_bias = personal_bias

    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(GLOBAL_PRED[x], C).float()

    def predict_personal(self, x: torch.Tensor, k: int) -> torch.Tensor:
        # The global logits plus a bias towards class 2 (only visible when it is not masked away).
        logits = self.predict_global(x)
        logits[:, 2] += self.personal_bias
        return logits

    def prepare_personal(self, k: int) -> None:
        pass


def _evaluator(personalizes: bool = False, masking: bool = False, personal_bias: float = 0.0) -> Evaluator:
    split = type("Split", (), {"__len__": lambda self: int(TEST_Y.numel()), "y": TEST_Y, "domain": None})()
    data = SimpleNamespace(
        groups=[0, 1, 2],
        num_classes=C,
        num_clients=len(CLIENT_IDX),
        mask_absent_classes=masking,
        test=split,
        client_test_indices=CLIENT_IDX,
        client_test_classes=[torch.bincount(TEST_Y[i], minlength=C) > 0 for i in CLIENT_IDX],
        get_batch=lambda s, idx, _aug, train: (idx, s.y[idx]),
    )
    model = SimpleNamespace(eval=lambda: None, train=lambda: None)
    sim = SimpleNamespace(
        data=data,
        device=torch.device("cpu"),
        eval_batch_size=3,
        rank=0,
        world_size=1,
        comm=Comm(),
        model=model,
        method=_Method(personalizes, personal_bias),
        trainer=SimpleNamespace(autocast=contextlib.nullcontext),
        load_client=lambda k: None,
    )
    ev = Evaluator(sim)
    ev._load_global = lambda: None
    return ev


def test_gm_candidates_hand_worked() -> None:
    out = _evaluator().run()
    assert out["test/global/acc"] == pytest.approx(5 / 8)
    assert out["test/global/acc_worst_class"] == pytest.approx(0.5)
    assert out["test/global/acc_minmax_ratio"] == pytest.approx(0.5 / (2 / 3))
    assert out["test/global/acc_worst10_classes"] == pytest.approx(0.5)
    assert out["test/global/acc_class_std"] == pytest.approx(float(np.std([2 / 3, 2 / 3, 0.5])), rel=1e-6)
    assert out["test/global/pred_minmax_ratio"] == pytest.approx(2 / 3)  # predicted counts (3, 3, 2)
    assert out["test/global/balancedness"] == out["test/global/acc_worst_class"]


def test_pm_fast_path_hand_worked_and_equal_to_per_client_path() -> None:
    fast = _evaluator().run()
    # client 0 (classes 0, 1): acc_c (1/2, 1), predicted (1, 3); client 1 (class 2 only): acc 1/2, predicted
    # (class 2) 1 -- its class-0 prediction is ignored; client 2 has no test sample.
    assert fast["test/personal/num_clients"] == 2.0
    assert fast["test/personal/acc_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert fast["test/personal/acc_worst_class_mean"] == pytest.approx(0.5)
    assert fast["test/personal/acc_minmax_ratio_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert fast["test/personal/acc_worst10_classes_mean"] == pytest.approx(0.5)
    assert fast["test/personal/acc_class_std_mean"] == pytest.approx((0.25 + 0.0) / 2)
    assert fast["test/personal/pred_minmax_ratio_mean"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert fast["test/personal/balancedness"] == fast["test/personal/acc_worst_class_mean"]
    per_client = _evaluator(personalizes=True).run()
    assert per_client == pytest.approx(fast, nan_ok=True)
    assert set(GM_KEYS) <= {k.removeprefix("test/global/") for k in fast}
    assert set(PM_KEYS) <= {k.removeprefix("test/personal/") for k in fast}


def test_pm_masked_path_counts_masked_predictions() -> None:
    # The personal bias makes every unmasked prediction class 2; masking keeps client 0 on its classes (0, 1),
    # where the global predictions are unchanged, and client 1 (class 2 only) now predicts 2 twice.
    out = _evaluator(personalizes=True, masking=True, personal_bias=5.0).run()
    assert out["test/personal/acc_worst_class_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["test/personal/acc_minmax_ratio_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["test/personal/pred_minmax_ratio_mean"] == pytest.approx((1 / 3 + 1.0) / 2)
    unmasked = _evaluator(personalizes=True, personal_bias=5.0).run()
    # Without the mask client 0 predicts only class 2 (absent from its test set): (d) undefined for it.
    assert unmasked["test/personal/pred_minmax_ratio_mean"] == pytest.approx(1.0)
    assert unmasked["test/personal/acc_worst_class_mean"] == pytest.approx((0.0 + 1.0) / 2)
