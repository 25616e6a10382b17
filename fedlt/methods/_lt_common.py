"""Private helpers shared by the long-tail baselines (Ratio Loss, CLIMB, CReFF, Fed-GraB).

Server-side randomness must be identical on every rank and independent of the world size, so every generator
here is seeded from ``(seed, tag, ...)`` through ``numpy.random.SeedSequence`` (never the global RNG, never
the rank). The tags keep the streams of different methods and purposes apart.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_


def balanced_indices(labels: Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> Tensor:
    """Up to ``per_class`` indices of every class, drawn without replacement (all of a class with fewer).

    Args:
        labels: (N,) int64 labels (any device).
        num_classes: C.
        per_class: how many samples per class.
        generator: CPU generator of the draw.

    Returns:
        int64 indices on ``labels``' device, grouped by class in ascending class order.
    """
    y = labels.cpu()
    picks = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        perm = torch.randperm(int(idx.numel()), generator=generator)[:per_class]
        picks.append(idx[perm])
    return torch.cat(picks).to(labels.device)


_M = TypeVar("_M", bound=nn.Module)


def frozen_copy(model: _M) -> _M:
    """A copy of ``model`` without gradients, made once per rank at setup (a teacher, the global or a previous
    model held next to the workspace; never one copy per client)."""
    net = copy.deepcopy(model)
    net.requires_grad_(False)
    return net


def load_global_into_workspace(method: Any, global_state: dict[str, Tensor]) -> None:
    """Copies the reducer's global tensors into the workspace model (server-side computation on the global
    model; the next client or evaluation reloads the workspace anyway)."""
    keys = list(method.shared_tensors)
    copy_tensors_([method.shared_tensors[k] for k in keys], [global_state[k] for k in keys])


def classifier_grad(features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradient of the mean cross-entropy of ``features @ weight.T + bias`` w.r.t. (weight, bias), in closed form:
    ``((softmax(z) - onehot(y))^T h / n, mean(softmax(z) - onehot(y)))``.

    Args:
        features: (n, d) features (no gradient needed).
        targets: (n,) int64 labels.
        weight: (C, d) classifier weight.
        bias: (C,) bias or ``None``.

    Returns:
        (grad_weight (C, d), grad_bias (C,)).
    """
    z = features @ weight.t()
    if bias is not None:
        z = z + bias
    err = torch.softmax(z.float(), dim=1)
    err[torch.arange(targets.numel(), device=targets.device), targets] -= 1.0
    n = max(int(targets.numel()), 1)
    return err.t() @ features.float() / n, err.sum(0) / n
