"""Pure accuracy math on per-class count tensors (docs/architecture.md section 6, docs/reference.md 1.4-1.7).

Every function here works on *counts* (correct / total per class, or per client and class) rather than on
predictions, so that the same numbers come out whether the counts were accumulated in one process or summed
over ranks (``dist_reduce_fx="sum"`` in :mod:`fedlt.metrics.classification`).

Class groups are an int64 tensor ``groups`` of shape (C,) with 0 = many, 1 = medium, 2 = few
(docs/reference.md 1.6; the convention that produced them is the data package's business).

Balancedness (FedPuReL, docs/reference.md 1.7 and Appendix R section 3): the definition is **unresolved** (the paper
gives
numbers but no formula, the official code computes none). Every candidate is therefore logged, all as fractions in
[0, 1] like the accuracies (the report prints them x 100, the scale of the paper's numbers), over the classes with
at least one test sample:

* (a) ``acc_worst_class``: min_c acc_c (the default definition, also logged under the alias ``balancedness``);
* (b) ``acc_minmax_ratio``: min_c acc_c / max_c acc_c (``nan`` if max_c acc_c = 0);
* (c) ``acc_worst10_classes``: mean of the ceil(10 %) lowest acc_c; plus ``acc_class_std``, the std of acc_c;
* (d) ``pred_minmax_ratio``: min_c p_c / max_c p_c where p_c counts the test samples *predicted* as class c
  (a prediction-bias measure); predictions of classes without test samples are ignored (they enter neither the
  min nor the max), ``nan`` if no prediction falls on a class with test samples or the predicted counts are
  unknown.

:func:`balancedness` selects one candidate by ``kind``; the summaries log them all (PM: per client on its local
test set, then the mean over clients, docs/reference.md 1.7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GROUP_NAMES: tuple[str, str, str] = ("many", "medium", "few")

# docs/reference.md 1.7 option (c): "mean accuracy of the worst 10 % of classes"; the same fraction is used for clients.
WORST_FRACTION: float = 0.1

# Balancedness candidates of docs/reference.md 1.7 / Appendix R section 3 -> summary key (definition pending).
BALANCEDNESS_KINDS: dict[str, str] = {
    "worst_class": "acc_worst_class",  # (a), the default
    "minmax_ratio": "acc_minmax_ratio",  # (b)
    "worst10_classes": "acc_worst10_classes",  # (c)
    "class_std": "acc_class_std",  # spread (lower is more balanced)
    "pred_minmax_ratio": "pred_minmax_ratio",  # (d)
}
DEFAULT_BALANCEDNESS: str = "worst_class"


def per_class_accuracy(correct: Tensor, total: Tensor) -> Tensor:
    """Per-class (or per-cell) accuracy ``correct / total``.

    Args:
        correct: correct-prediction counts, any shape.
        total: sample counts, same shape as ``correct``.

    Returns:
        float64 tensor of the same shape, ``nan`` where ``total == 0``.

    Raises:
        ValueError: if the shapes differ or a count is negative or ``correct > total``.
    """
    _check_counts(correct, total)
    correct64 = correct.to(torch.float64)
    total64 = total.to(torch.float64)
    nan = torch.full_like(total64, float("nan"))
    # where() keeps the 0/0 cells out of the division result instead of relying on IEEE nan propagation.
    return torch.where(total64 > 0, correct64 / total64.clamp_min(1.0), nan)


def classification_summary(
    correct: Tensor, total: Tensor, groups: Tensor, predicted: Tensor | None = None
) -> dict[str, float]:
    """Global-model (GM) accuracy summary from per-class counts (docs/reference.md 1.4, 1.6, 1.7).

    Args:
        correct: (C,) correct counts per class.
        total: (C,) test-sample counts per class.
        groups: (C,) group id per class, 0 = many, 1 = medium, 2 = few.
        predicted: optional (C,) counts of test samples predicted as each class (for candidate (d)).

    Returns:
        ``acc`` (micro: sum correct / sum total), ``acc_many`` / ``acc_medium`` / ``acc_few`` (micro inside the
        group, ``nan`` when the group has no test sample) and the balancedness candidates of the module docstring
        over classes with samples (definition pending, docs/reference.md 1.7): ``acc_worst_class`` (a),
        ``acc_minmax_ratio`` (b), ``acc_worst10_classes`` (c), ``acc_class_std`` (population std of acc_c),
        ``pred_minmax_ratio`` (d; ``nan`` without ``predicted``) and ``balancedness`` (alias of (a), the default).
        All ``nan`` when there is no test sample at all.

    Raises:
        ValueError: on shape mismatch, negative counts, ``correct > total``, group ids outside {0, 1, 2}, or
            ``predicted`` inconsistent with the counts.
    """
    if correct.dim() != 1:
        raise ValueError(f"correct and total must be 1-D (C,), got shape {tuple(correct.shape)}")
    _check_counts(correct, total)
    _check_groups(groups, correct.shape[-1])
    if predicted is not None:
        _check_predicted(predicted, correct, total)
    summary = {"acc": _micro(correct, total)}
    summary.update(_group_micro(correct, total, groups))
    summary.update(_balancedness_candidates(correct, total, predicted))
    summary["balancedness"] = summary[BALANCEDNESS_KINDS[DEFAULT_BALANCEDNESS]]
    return summary


def balancedness(
    correct: Tensor, total: Tensor, predicted: Tensor | None = None, kind: str = DEFAULT_BALANCEDNESS
) -> float:
    """One FedPuReL balancedness candidate (definition pending, docs/reference.md 1.7) from one row of counts.

    Args:
        correct: (C,) correct counts per class.
        total: (C,) test-sample counts per class; only classes with ``total > 0`` are considered.
        predicted: optional (C,) counts of samples predicted as each class (needed for ``"pred_minmax_ratio"``).
        kind: a key of :data:`BALANCEDNESS_KINDS`: ``"worst_class"`` (a, default), ``"minmax_ratio"`` (b),
            ``"worst10_classes"`` (c), ``"class_std"`` or ``"pred_minmax_ratio"`` (d).

    Returns:
        The candidate as a fraction (``nan`` when undefined, see the module docstring).

    Raises:
        ValueError: on an unknown ``kind`` or inconsistent counts.
    """
    if kind not in BALANCEDNESS_KINDS:
        raise ValueError(f"kind must be one of {sorted(BALANCEDNESS_KINDS)}, got {kind!r}")
    if correct.dim() != 1:
        raise ValueError(f"correct and total must be 1-D (C,), got shape {tuple(correct.shape)}")
    _check_counts(correct, total)
    if predicted is not None:
        _check_predicted(predicted, correct, total)
    return _balancedness_candidates(correct, total, predicted)[BALANCEDNESS_KINDS[kind]]


def personal_summary(
    correct: Tensor, total: Tensor, groups: Tensor, predicted: Tensor | None = None
) -> dict[str, float]:
    """Personalized-model (PM) summary from per-client, per-class counts (docs/reference.md 1.5, 1.7).

    A client's accuracy is the micro accuracy of its row; clients with no test sample are excluded from every
    statistic (they have no accuracy to report).

    Balancedness (definition pending, docs/reference.md 1.7): each candidate of the module docstring is computed per
    client on its own local test set (over the classes with >= 1 local test sample; for (d) only the predictions
    of those classes count, predictions of classes absent from the client's test set are ignored), then averaged
    over the evaluated clients for which it is defined (a client's (b) is undefined when all its classes are at
    0 %, its (d) when none of its predictions falls on one of its test classes): ``acc_worst_class_mean`` (a),
    ``acc_minmax_ratio_mean`` (b), ``acc_worst10_classes_mean`` (c), ``acc_class_std_mean``,
    ``pred_minmax_ratio_mean`` (d; ``nan`` without ``predicted``) and ``balancedness`` (alias of
    ``acc_worst_class_mean``). ``nan`` when no client defines the candidate.

    Args:
        correct: (K, C) correct counts, row k = client k on its local test set.
        total: (K, C) local test-sample counts.
        groups: (C,) group id per class, 0 = many, 1 = medium, 2 = few, shared by every client, or (K, C): row k
            holds client k's own groups (e.g. from its local test set, ``data.pm_group_source="local_test"``).
        predicted: optional (K, C) counts of client k's local test samples predicted as class c.

    Returns:
        ``acc_mean`` (unweighted mean over evaluated clients), ``acc_std`` (population std),
        ``acc_worst10`` (mean of the lowest ceil(10 % of evaluated clients) accuracies), ``acc_many`` /
        ``acc_medium`` / ``acc_few`` (mean, over clients with at least one test sample in the group, of the
        client's micro accuracy inside the group; ``nan`` if no such client) and ``num_clients`` (number of
        evaluated clients, as float), plus the balancedness keys above.

    Raises:
        ValueError: on shape mismatch, negative counts, ``correct > total``, group ids outside {0, 1, 2}, or
            ``predicted`` inconsistent with the counts.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct and total must be 2-D (K, C), got shape {tuple(correct.shape)}")
    _check_counts(correct, total)
    if groups.dim() == 2:
        if groups.shape != correct.shape:
            raise ValueError(f"per-client groups must have shape {tuple(correct.shape)}, got {tuple(groups.shape)}")
        _check_groups(groups.reshape(-1), groups.numel())
    else:
        _check_groups(groups, correct.shape[-1])
    if predicted is not None:
        _check_predicted(predicted, correct, total)
    client_acc = per_class_accuracy(correct.sum(dim=1), total.sum(dim=1))
    evaluated = client_acc[total.sum(dim=1) > 0]
    summary: dict[str, float] = {}
    if evaluated.numel() == 0:
        summary.update({"acc_mean": math.nan, "acc_std": math.nan, "acc_worst10": math.nan})
    else:
        summary["acc_mean"] = float(evaluated.mean())
        summary["acc_std"] = float(evaluated.std(correction=0))
        summary["acc_worst10"] = _worst_fraction_mean(evaluated)
    for gid, name in enumerate(GROUP_NAMES):
        mask = (groups == gid).to(correct.device).expand_as(correct)  # (K, C), the same row for shared groups
        group_correct, group_total = (correct * mask).sum(dim=1), (total * mask).sum(dim=1)
        group_acc = per_class_accuracy(group_correct, group_total)
        has_samples = group_total > 0
        summary[f"acc_{name}"] = float(group_acc[has_samples].mean()) if bool(has_samples.any()) else math.nan
    summary["num_clients"] = float(evaluated.numel())
    summary.update(_personal_balancedness(correct, total, predicted))
    return summary


def _micro(correct: Tensor, total: Tensor) -> float:
    """Micro accuracy sum(correct) / sum(total); nan if there is no sample."""
    n = int(total.sum())
    return int(correct.sum()) / n if n > 0 else math.nan


def _group_micro(correct: Tensor, total: Tensor, groups: Tensor) -> dict[str, float]:
    """Micro accuracy restricted to the test samples of each group (FedLoGe's definition, docs/reference.md 1.4)."""
    return {f"acc_{name}": _micro(correct[groups == gid], total[groups == gid]) for gid, name in enumerate(GROUP_NAMES)}


def _balancedness_candidates(correct: Tensor, total: Tensor, predicted: Tensor | None) -> dict[str, float]:
    """All balancedness candidates (module docstring) of one (C,) row, over the classes with ``total > 0``."""
    present = total > 0
    if not bool(present.any()):
        return {key: math.nan for key in BALANCEDNESS_KINDS.values()}
    acc_c = per_class_accuracy(correct, total)[present]
    pred_c = predicted[present] if predicted is not None else None
    return {
        "acc_worst_class": float(acc_c.min()),
        "acc_minmax_ratio": _minmax_ratio(acc_c),
        "acc_worst10_classes": _worst_fraction_mean(acc_c),
        "acc_class_std": float(acc_c.std(correction=0)),
        "pred_minmax_ratio": _minmax_ratio(pred_c.to(torch.float64)) if pred_c is not None else math.nan,
    }


def _personal_balancedness(correct: Tensor, total: Tensor, predicted: Tensor | None) -> dict[str, float]:
    """Per-client balancedness candidates averaged over the clients (with test samples) that define them.

    Vectorized over the clients (the (K, C) rows of :func:`_balancedness_candidates`, in float64): one pass over
    the table instead of a Python loop over K clients."""
    correct, total = correct.cpu(), total.cpu()
    rows = torch.nonzero(total.sum(dim=1) > 0).flatten()
    out: dict[str, float] = {}
    if rows.numel():
        correct, total = correct[rows], total[rows]
        present = total > 0
        n = present.sum(1)
        acc = per_class_accuracy(correct, total)
        inf = torch.full_like(acc, math.inf)
        worst = torch.where(present, acc, inf).min(1).values
        best = torch.where(present, acc, -inf).max(1).values
        mean = torch.where(present, acc, 0.0).sum(1) / n
        std = (torch.where(present, acc - mean[:, None], 0.0).pow(2).sum(1) / n).sqrt()
        ranked = torch.where(present, acc, inf).sort(1).values.nan_to_num(posinf=0.0)
        take = torch.ceil(WORST_FRACTION * n.to(torch.float64)).long()
        worst10 = ranked.cumsum(1).gather(1, (take - 1)[:, None]).squeeze(1) / take
        values = {
            "acc_worst_class": worst,
            "acc_minmax_ratio": torch.where(best > 0, worst / best, math.nan),
            "acc_worst10_classes": worst10,
            "acc_class_std": std,
        }
        if predicted is not None:
            pred = predicted.cpu()[rows].to(torch.float64)
            low = torch.where(present, pred, inf).min(1).values
            high = torch.where(present, pred, -inf).max(1).values
            values["pred_minmax_ratio"] = torch.where(high > 0, low / high, math.nan)
    for key in BALANCEDNESS_KINDS.values():
        v = values.get(key) if rows.numel() else None
        v = v[~torch.isnan(v)] if v is not None else None
        out[f"{key}_mean"] = float(v.sum()) / v.numel() if v is not None and v.numel() else math.nan
    out["balancedness"] = out[f"{BALANCEDNESS_KINDS[DEFAULT_BALANCEDNESS]}_mean"]
    return out


def _minmax_ratio(values: Tensor) -> float:
    """min / max of a non-empty 1-D tensor of non-negative values; nan if the max is 0."""
    high = float(values.max())
    return float(values.min()) / high if high > 0 else math.nan


def _worst_fraction_mean(acc: Tensor) -> float:
    """Mean of the ceil(WORST_FRACTION * n) smallest entries of a non-empty 1-D tensor."""
    k = math.ceil(WORST_FRACTION * acc.numel())
    return float(torch.topk(acc, k, largest=False).values.mean())


def _check_counts(correct: Tensor, total: Tensor) -> None:
    """Validates that two count tensors are compatible and consistent."""
    if correct.shape != total.shape:
        shapes = f"{tuple(correct.shape)} vs {tuple(total.shape)}"
        raise ValueError(f"correct and total must have the same shape, got {shapes}")
    if correct.is_floating_point() or total.is_floating_point():
        raise ValueError("correct and total must be integer count tensors")
    if bool((correct < 0).any()) or bool((correct > total).any()):
        raise ValueError("counts must satisfy 0 <= correct <= total elementwise")


def _check_predicted(predicted: Tensor, correct: Tensor, total: Tensor) -> None:
    """Validates predicted-class counts: same shape as the counts, integer, ``correct <= predicted`` (a correct
    prediction of c is a prediction of c) and, per row, as many predictions as test samples."""
    if predicted.shape != total.shape:
        raise ValueError(f"predicted must have shape {tuple(total.shape)}, got {tuple(predicted.shape)}")
    if predicted.is_floating_point():
        raise ValueError("predicted must be an integer count tensor")
    if bool((correct > predicted).any()):
        raise ValueError("counts must satisfy correct <= predicted elementwise")
    if not torch.equal(predicted.sum(dim=-1), total.sum(dim=-1)):
        raise ValueError("predicted and total must count the same number of samples (per row)")


def _check_groups(groups: Tensor, num_classes: int) -> None:
    """Validates a (C,) tensor of group ids in {0, 1, 2}."""
    if groups.shape != (num_classes,):
        raise ValueError(f"groups must have shape ({num_classes},), got {tuple(groups.shape)}")
    if bool(((groups < 0) | (groups >= len(GROUP_NAMES))).any()):
        raise ValueError(f"group ids must be in 0..{len(GROUP_NAMES) - 1} ({', '.join(GROUP_NAMES)})")
