"""Private helpers for methods that distil a frozen CLIP teacher into an ordinary backbone (CLIP2FL, FedSM).

CLIP2FL's client loss (Shi et al., AAAI 2024, arXiv:2312.08648; official code ``shijiangming1/CLIP2FL``, ``KDLoss``)
is ``CE(s, y) + mu * T^2 * KL(softmax(z / T) || softmax(s / T))`` with the student logits s, the teacher's
zero-shot logits ``z = 100 * cos(CLIP_img(x), CLIP_text("a photo of a {class}"))`` and T = 3 (batch-mean KL).

The teacher is a :class:`fedlt.models.clip.ClipModel` without PEFT, built by the method in ``setup`` and held
*outside* the workspace model: it is never aggregated, stored per client or checkpointed (it is rebuilt, identical,
by every rank and on resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlt.models.clip import CLIP_MEAN, CLIP_STD, ClipModel

CLIP2FL_TEMPLATE = "a photo of a {}"
"""The teacher prompt of CLIP2FL's code (no final period)."""

_RANDOM_TEACHER_SEED = 0x0C11F  # a random-weight teacher (tests, offline runs) is the same function everywhere


def build_clip_teacher(
    class_names: Sequence[str],
    dataset: str | None,
    clip_model: str = "ViT-B-32",
    clip_pretrained: bool = True,
    clip_tag: str | None = "openai",
    clip_checkpoint: str | None = None,
    device: torch.device | str | None = None,
    templates: Sequence[str] | None = None,
) -> ClipModel:
    """A frozen zero-shot CLIP classifier (no PEFT branch in use, no trainable tensor), in eval mode on ``device``.

    Random-weight teachers (``clip_pretrained=False`` without a checkpoint, e.g. ``fedlt-tiny-clip`` in tests) are
    initialised under a fixed seed inside a forked RNG: the global RNG is left untouched and every rank (and a
    resumed run) builds the same teacher.

    Args:
        class_names: the C class names (text prompts).
        dataset: the data source's name (selects the zero-shot templates when ``templates`` is None).
        clip_model: open_clip model name (CLIP2FL: ViT-B/32).
        clip_pretrained: load the pretrained weights ``clip_tag``.
        clip_tag: open_clip pretrained tag.
        clip_checkpoint: a local checkpoint file instead of a download.
        device: where the teacher lives (the training device).
        templates: prompt templates with one ``{}`` (CLIP2FL: ``("a photo of a {}",)``); None: the dataset's.

    Raises:
        fedlt.models.clip.ClipWeightsUnavailable: the pretrained weights could not be loaded.
    """
    kwargs: dict[str, Any] = dict(class_names=list(class_names), dataset=dataset, pretrained=clip_pretrained,
                                  tag=clip_tag, checkpoint_path=clip_checkpoint, templates=templates,
                                  peft="none", head="text")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_TEACHER_SEED)
        teacher = ClipModel(clip_model, len(class_names), **kwargs)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device) if device is not None else teacher


def clip_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T^2 * mean_batch KL(softmax(teacher / T) || softmax(student / T))`` (teacher first).

    Gradients flow only into ``student_logits`` (the teacher is detached).

    Args:
        student_logits: (B, C).
        teacher_logits: (B, C).
        temperature: T > 0.
    """
    t = float(temperature)
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def to_clip_input(x: Tensor, stats: tuple[Sequence[float], Sequence[float]] | None) -> Tensor:
    """Re-normalises a batch normalised with ``stats`` = (mean, std) of x / 255 to CLIP's mean and std.

    Single-channel batches are repeated to three channels; ``stats=None`` returns ``x`` unchanged (already CLIP
    input). The teacher resizes to its input size itself.
    """
    if stats is None:
        return x
    mean = torch.tensor(stats[0], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    raw = x * std + mean  # back to x / 255
    if raw.shape[1] == 1:
        raw = raw.expand(-1, 3, -1, -1)
    cmean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    cstd = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (raw - cmean) / cstd


def data_normalization(data: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) the federated dataset normalises its batches with, or ``None`` when its batches are already
    CLIP-normalised (``normalization: clip``) or not normalised by it (tensor datasets)."""
    if getattr(data, "normalization", None) == "clip":
        return None
    return getattr(data, "_stats", None)


@torch.no_grad()
def teacher_logits(teacher: ClipModel, x: Tensor, stats: tuple[Sequence[float], Sequence[float]] | None,
                   scale: float = 100.0) -> Tensor:
    """Zero-shot teacher logits ``scale * cos(CLIP_img(x), t_c)`` of a batch normalised with ``stats``.

    Args:
        teacher: from :func:`build_clip_teacher`.
        x: (B, C_in, H, W) batch as the student sees it.
        stats: the batch's normalisation (:func:`data_normalization`).
        scale: the logit scale (CLIP2FL's code: a fixed 100, CLIP's ``logit_scale.exp()`` for pretrained weights).
    """
    feats = teacher.encode(to_clip_input(x, stats), None)
    return scale * feats.float() @ teacher.zs_text.float().t()
