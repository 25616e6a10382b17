"""Private helpers for methods that distil a frozen CLIP teacher into an ordinary backbone (CLIP2FL, FedSM).

CLIP2FL's client loss (Shi et al., AAAI 2024, arXiv:2312.08648; official code ``shijiangming1/CLIP2FL``, ``KDLoss``)
is ``CE(s, y) + mu * T^2 * KL(softmax(z / T) || softmax(s / T))`` with the student logits s, the teacher's
zero-shot logits ``z = 100 * cos(CLIP_img(x), CLIP_text("a photo of a {class}"))`` and T = 3 (batch-mean KL).

The teacher is a :class:`fedlt.models.clip.ClipModel` without PEFT, built by the method in ``setup`` and held
*outside* the workspace model: it is never aggregated, stored per client or checkpointed (it is rebuilt, identical,
by every rank and on resume). :class:`ClipKDClient` holds what both methods share: the teacher's arguments, its
construction in ``setup`` and the client's ``CE + mu * KD`` training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.models.clip import CLIP_MEAN, CLIP_STD, ClipModel, cosine_logits
from fedlt.types import ClientContext, StepOutput

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
        torch.random.default_generator.manual_seed(_RANDOM_TEACHER_SEED)  # CPU only: fork_rng restores it
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
    return getattr(data, "normalization_stats", None)


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
    return cosine_logits(scale, teacher.encode(to_clip_input(x, stats), None), teacher.zs_text)


class ClipKDClient:
    """Mixin of the methods whose clients distil the frozen CLIP teacher into their backbone (CLIP2FL, FedSM).

    It stores the teacher's arguments (``_init_clip_kd``), builds the teacher and records the batches' normalisation
    in ``setup`` (``_setup_teacher``) and provides the clients' ``training_step``. List it before the
    :class:`~fedlt.methods.base.FedMethod` base class, so that its ``training_step`` is the one used.
    """

    model: FedModel
    loss: Any
    teacher: ClipModel | None
    norm_stats: tuple[tuple[float, ...], tuple[float, ...]] | None

    def _init_clip_kd(self, kd_weight: float, kd_temperature: float, teacher_scale: float, clip_model: str,
                      clip_pretrained: bool, clip_tag: str | None, clip_checkpoint: str | None,
                      clip_template: str) -> None:
        """Stores the distillation and teacher arguments (documented by the method classes)."""
        self.kd_weight, self.kd_temperature, self.teacher_scale = kd_weight, kd_temperature, teacher_scale
        self.clip_model, self.clip_pretrained, self.clip_tag = clip_model, clip_pretrained, clip_tag
        self.clip_checkpoint, self.clip_template = clip_checkpoint, clip_template

    def _setup_teacher(self, model: nn.Module, data: Any, build: bool = True) -> list[str]:
        """Sets ``teacher`` (None unless ``build``) on the model's device and ``norm_stats``; returns the class names.

        The teacher is a plain attribute of the method, never a submodule of the workspace model, so it is never
        aggregated or stored.
        """
        names = list(getattr(data, "class_names", None) or [str(c) for c in range(data.num_classes)])
        self.teacher = None
        if build:
            device = next(iter(model.parameters())).device
            self.teacher = build_clip_teacher(names, getattr(data, "source_name", None), self.clip_model,
                                              self.clip_pretrained, self.clip_tag, self.clip_checkpoint, device,
                                              templates=(self.clip_template,))
        self.norm_stats = data_normalization(data)
        return names

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """CE + mu_KD tau^2 KL(teacher || student); the CE alone, without a teacher forward, when ``kd_weight`` is 0."""
        x, y = batch[0], batch[1]
        logits = self.model(x)
        ce = self.loss(logits, y, ctx.class_counts, ctx.round)
        if not self.kd_weight:
            return StepOutput(loss=ce, parts={"loss": ce.detach(), "ce": ce.detach()})
        assert self.teacher is not None  # built in setup whenever kd_weight > 0
        kd = clip_kd_loss(logits, teacher_logits(self.teacher, x, self.norm_stats, self.teacher_scale),
                          self.kd_temperature)
        loss = ce + self.kd_weight * kd
        return StepOutput(loss=loss, parts={"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach()})
