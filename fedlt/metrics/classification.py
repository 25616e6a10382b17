"""torchmetrics classes keeping per-class correct/total/predicted counts (docs/architecture.md section 6).

The states are integer counts with ``dist_reduce_fx="sum"``, so synchronising over ranks is exact and every
reported number (overall, many / medium / few, and the FedPuReL balancedness candidates -- worst class, min/max
ratio, worst 10 %, std, predicted-class min/max ratio; definition pending, docs/reference.md 1.7) is computed from the
same state by the pure functions of :mod:`fedlt.metrics.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchmetrics
from torch import Tensor

from fedlt.metrics.functional import GROUP_NAMES, classification_summary, personal_summary


class GroupedAccuracy(torchmetrics.Metric):
    """Global-model accuracy with many / medium / few and per-class spread (docs/reference.md 1.4, 1.6, 1.7).

    Args:
        num_classes: C.
        groups: (C,) group id per class, 0 = many, 1 = medium, 2 = few.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    ``compute()`` returns the keys of :func:`~fedlt.metrics.functional.classification_summary` as 0-dim float
    tensors, including every balancedness candidate (the definition is unresolved, docs/reference.md 1.7;
    ``balancedness``
    is an alias of the default candidate (a), ``acc_worst_class``). States: ``correct`` / ``total`` per true class
    and ``predicted`` (how many samples were predicted as each class, for candidate (d)), all (C,) long.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    correct: Tensor
    total: Tensor
    predicted: Tensor
    groups: Tensor

    def __init__(self, num_classes: int, groups: Tensor | Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_positive(num_classes, "num_classes")
        # A non-persistent buffer follows .to(device) but stays out of state_dict: it is configuration, not state.
        self.register_buffer("groups", _as_groups(groups, num_classes), persistent=False)
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulates one batch.

        Args:
            preds: logits (B, C) (the argmax is taken) or predicted labels (B,).
            target: true labels (B,).
        """
        labels, target = _as_labels(preds, target, self.num_classes)
        hits = target[labels == target]
        self.correct += torch.bincount(hits, minlength=self.num_classes)
        self.total += torch.bincount(target, minlength=self.num_classes)
        self.predicted += torch.bincount(labels, minlength=self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        """Returns the summary of :func:`~fedlt.metrics.functional.classification_summary` as 0-dim tensors."""
        summary = classification_summary(self.correct, self.total, self.groups, self.predicted)
        return _to_tensors(summary, self.correct.device)


class PersonalizedAccuracy(torchmetrics.Metric):
    """Personalized-model accuracy: each client's model on its own local test set (docs/reference.md 1.5).

    Args:
        num_clients: K.
        num_classes: C.
        groups: (C,) group id per class, 0 = many, 1 = medium, 2 = few, or (K, C) per-client groups (row k: client
            k's own groups, averaged per group over the clients that have test samples in it).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.

    ``compute()`` returns the keys of :func:`~fedlt.metrics.functional.personal_summary` as 0-dim float tensors,
    including the per-client balancedness candidates averaged over clients (definition pending, docs/reference.md 1.7;
    ``balancedness`` is an alias of ``acc_worst_class_mean``). States: ``correct`` / ``total`` per (client, true
    class) and ``predicted`` per (client, predicted class), all (K, C) long.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    correct: Tensor
    total: Tensor
    predicted: Tensor
    groups: Tensor

    def __init__(self, num_clients: int, num_classes: int, groups: Tensor | Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_clients = _check_positive(num_clients, "num_clients")
        self.num_classes = _check_positive(num_classes, "num_classes")
        self.register_buffer("groups", _as_groups(groups, num_classes, num_clients), persistent=False)
        shape = (num_clients, num_classes)
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, client_id: int | Tensor) -> None:
        """Accumulates one batch evaluated by one client's (or several clients') personalized model.

        Args:
            preds: logits (B, C) or predicted labels (B,).
            target: true labels (B,).
            client_id: one id for the whole batch, or a (B,) tensor of ids.
        """
        labels, target = _as_labels(preds, target, self.num_classes)
        clients = _as_client_ids(client_id, target, self.num_clients)
        # One bincount over the flattened (client, class) cell index k*C + c fills the whole (K, C) table at once.
        cell = clients * self.num_classes + target
        size = self.num_clients * self.num_classes
        self.correct += torch.bincount(cell[labels == target], minlength=size).view(self.correct.shape)
        self.total += torch.bincount(cell, minlength=size).view(self.total.shape)
        pred_cell = clients * self.num_classes + labels
        self.predicted += torch.bincount(pred_cell, minlength=size).view(self.predicted.shape)

    def compute(self) -> dict[str, Tensor]:
        """Returns the summary of :func:`~fedlt.metrics.functional.personal_summary` as 0-dim tensors."""
        summary = personal_summary(self.correct, self.total, self.groups, self.predicted)
        return _to_tensors(summary, self.correct.device)


def _check_positive(value: int, name: str) -> int:
    """Returns ``value`` if it is a positive int, else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _as_groups(groups: Tensor | Sequence[int], num_classes: int, num_clients: int | None = None) -> Tensor:
    """Converts and validates a (C,) group-id vector (0 = many, 1 = medium, 2 = few), or with ``num_clients`` also
    a (K, C) table of per-client groups."""
    out = torch.as_tensor(groups, dtype=torch.long).detach().clone().cpu()
    shapes = [(num_classes,)] + ([(num_clients, num_classes)] if num_clients is not None else [])
    if tuple(out.shape) not in shapes:
        raise ValueError(f"groups must have shape {' or '.join(map(str, shapes))}, got {tuple(out.shape)}")
    if bool(((out < 0) | (out >= len(GROUP_NAMES))).any()):
        raise ValueError(f"group ids must be in 0..{len(GROUP_NAMES) - 1} ({', '.join(GROUP_NAMES)})")
    return out


def _as_labels(preds: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Turns logits (B, C) or labels (B,) into (predicted labels, validated long targets)."""
    if target.dim() != 1 or target.is_floating_point():
        raise ValueError(f"target must be a 1-D integer tensor of labels, got {target.dtype} {tuple(target.shape)}")
    if preds.dim() == 2:
        if preds.shape[1] != num_classes:
            raise ValueError(f"logits must have {num_classes} columns, got shape {tuple(preds.shape)}")
        labels = preds.argmax(dim=1)
    elif preds.dim() == 1 and not preds.is_floating_point():
        labels = preds
    else:
        raise ValueError(f"preds must be logits (B, C) or integer labels (B,), got {preds.dtype} {tuple(preds.shape)}")
    if labels.shape[0] != target.shape[0]:
        raise ValueError(f"preds and target disagree on batch size: {labels.shape[0]} vs {target.shape[0]}")
    target = target.long()
    _check_range(target, num_classes, "target labels")
    labels = labels.long()
    _check_range(labels, num_classes, "predicted labels")  # would alias another cell of the predicted counts
    return labels, target


def _as_client_ids(client_id: int | Tensor, target: Tensor, num_clients: int) -> Tensor:
    """Broadcasts a scalar client id to the batch, or validates a (B,) id tensor."""
    ids = torch.as_tensor(client_id, dtype=torch.long, device=target.device)
    if ids.dim() == 0:
        ids = ids.expand(target.shape[0])
    if ids.shape != target.shape:
        raise ValueError(f"client_id must be a scalar or have shape {tuple(target.shape)}, got {tuple(ids.shape)}")
    _check_range(ids, num_clients, "client ids")
    return ids


def _check_range(values: Tensor, upper: int, what: str) -> None:
    """Raises ValueError unless every entry lies in [0, upper); an out-of-range label would alias another cell."""
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= upper:
        raise ValueError(f"{what} must lie in [0, {upper}), got values in [{low}, {high}]")


def _to_tensors(summary: dict[str, float], device: torch.device) -> dict[str, Tensor]:
    """Wraps a float summary into 0-dim float32 tensors on ``device`` (what Lightning / loggers expect)."""
    return {key: torch.tensor(value, dtype=torch.float32, device=device) for key, value in summary.items()}
