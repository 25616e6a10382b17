"""Helpers shared by methods that fine-tune locally or keep fixed tensors (FedBABU, FedETF, FedRoD, FedLoGe).

* :func:`trainable_only`: temporarily makes exactly the given tensors trainable.
* :func:`finetune`: epochs of local SGD on one client's training split through the engine's trainer (so precision
  and clipping stay correct), used by ``prepare_personal`` (PM fine-tuning is never stored).
* :func:`client_features`: a client's frozen-body features, for fine-tuning a head on them.
* :class:`FrozenKeysReducer`: FedAvg that keeps some global tensors bit-for-bit (frozen heads, fixed ETFs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from fedlt.methods.base import Reducer
from fedlt.types import ClientContext, ServerMessage, StepOutput

if TYPE_CHECKING:
    from fedlt.methods.base import FedMethod


@contextmanager
def trainable_only(model: nn.Module, tensors: Iterable[Tensor]) -> Iterator[list[Tensor]]:
    """Within the block exactly ``tensors`` require gradients (model parameters or buffers such as a fixed
    classifier that a personalisation stage fine-tunes); every ``requires_grad`` flag is restored afterwards."""
    chosen = list(tensors)
    saved = [(p, p.requires_grad) for p in model.parameters()] + [(t, t.requires_grad) for t in chosen]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in chosen:
            t.requires_grad_(True)
        yield chosen
    finally:
        for t, flag in saved:
            t.requires_grad_(flag)


def finetune(
    method: FedMethod,
    client_id: int,
    params: Sequence[Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epochs: int,
    lr: float,
    generator: torch.Generator,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    cached: tuple[Tensor, Tensor] | None = None,
    batch_size: int | None = None,
) -> int:
    """``epochs`` shuffled passes of mini-batch SGD over ``params`` on client ``client_id``'s data, with the
    method's batch size and gradient clipping and the model in train mode, through the engine's trainer.

    Args:
        method: the method (its model, data, trainer, batch size and clipping are used).
        client_id: the client.
        params: tensors to optimise; they must require gradients (see :func:`trainable_only`).
        loss_fn: ``(inputs, labels) -> loss``.
        epochs: number of passes.
        lr, momentum, weight_decay: the SGD settings.
        generator: shuffles the batches and draws the augmentations.
        cached: ``(inputs, labels)`` of the client precomputed by the caller (e.g. frozen-body features, or
            server-side virtual features); by default the client's training split is read with augmentation, as
            in local training.
        batch_size: the mini-batch size; None: the method's ``batch_size``.

    Returns:
        The number of optimizer steps taken.
    """
    data, trainer = method.data, method.trainer
    indices = data.client_indices[client_id]
    if cached is not None:
        indices = torch.arange(cached[1].shape[0], device=cached[1].device)
    ctx = ClientContext(
        client_id=client_id, round=0, num_samples=int(indices.numel()),
        class_counts=torch.zeros(method.num_classes, device=indices.device), generator=generator,
        device=indices.device, message=ServerMessage(round=0, state={}),
    )
    optimizer = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    method.model.train()
    order = trainer.batch_indices(indices, ctx, batch_size or method.batch_size, epochs)
    if cached is None:
        batches = (data.get_batch(data.train, idx, generator, train=True)[:2] for idx in order)
    else:
        batches = ((cached[0][idx], cached[1][idx]) for idx in order)
    records = trainer.run(batches, lambda b: StepOutput(loss=loss_fn(b[0], b[1])), [optimizer], method.grad_clip)
    return len(records)


def client_counts(method: FedMethod, client_id: int) -> Tensor:
    """(C,) float tensor: client ``client_id``'s training label histogram, on the data's device."""
    counts = np.asarray(method.data.client_class_counts[client_id])
    return torch.as_tensor(counts, dtype=torch.float32, device=method.data.client_indices[client_id].device)


@torch.no_grad()
def client_features(method: FedMethod, client_id: int) -> tuple[Tensor, Tensor]:
    """The workspace backbone's features (eval mode, no augmentation) and labels of a client's training split,
    for fine-tuning a head on a frozen body (FedETF stage 2, FedLoGe's LA-FR fine-tuning)."""
    data, idx = method.data, method.data.client_indices[client_id]
    method.model.eval()
    with method.trainer.autocast():
        feats = [method.model.forward_features(data.get_batch(data.train, part, None)[0]) for part in idx.split(512)]
    return torch.cat(feats).float(), data.train.y[idx]


class FrozenKeysReducer(Reducer):
    """FedAvg's reducer, except that the global tensors whose keys satisfy ``is_frozen`` never change.

    A weighted mean of identical tensors is not bit-exact in floating point, so tensors that the method keeps
    fixed (FedBABU's head, FedETF's simplex ETF) are held at their current value instead of re-averaged. They are
    still summed by the all-reduce (the base layout covers every shared key); they are small.

    Args:
        is_frozen: predicate on state-dict keys.
        extras: as :class:`fedlt.methods.base.Reducer`.
    """

    def __init__(self, is_frozen: Callable[[str], bool], extras: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(extras)
        self.is_frozen = is_frozen

    def weighted_mean(self) -> dict[str, Tensor] | None:
        mean = super().weighted_mean()
        if mean is None:
            return None
        for k, v in self.global_state.items():
            if self.is_frozen(k):
                mean[k] = v  # copying a tensor onto itself leaves it bit-identical
        return mean
