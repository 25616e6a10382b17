"""CLIP2FL: CLIP-guided client distillation + CReFF's server-side classifier re-training with a text-prototype
contrastive term on the federated features.

Paper: J. Shi, S. Zheng, X. Yin, Y. Lu, Y. Xie, Y. Qu, "CLIP-Guided Federated Learning on Heterogeneous and
Long-Tailed Data", AAAI 2024, arXiv:2312.08648. Official code: github shijiangming1/CLIP2FL (``main.py``,
``losses.py``), built on CReFF's (:mod:`fedlt.methods.creff`, which this class extends).

Model: any fedlt backbone (ResNet-8 in the paper) -- *not* CLIP. A frozen zero-shot CLIP teacher (ViT-B/32 in the
paper) is built by the method in ``setup`` from the class names with the prompt "a photo of a {class}" and held
outside the workspace model: never aggregated, stored per client or checkpointed (:mod:`fedlt.methods._clip_kd`).

Client (paper Eq. 1, code ``Local.local_train``): E local epochs of SGD on
``CE(s, y) + mu * T^2 * KL(softmax(z / T) || softmax(s / T))`` with the student logits s, the teacher logits
``z = 100 * cos(CLIP_img(x), t_c)`` and t_c the normalised CLIP text features of "a photo of a {c}". Before local
training the client computes CReFF's real-feature gradients (per owned class, on the global model's features with
the previous re-trained classifier) and uploads them with the FedAvg update (all inherited from CReFF).
Server (paper Eq. 8, code ``Global.update_feature_syn``): FedAvg; then ``match_epoch`` SGD steps (lr
``lr_feature``) on the federated features F minimising

    sum_{c owned} D(grad_{(W', b')} CE(W' F_c + b', c), g_c)  +  lambda * L_PCL(F, t),

CReFF's gradient-matching loss (weight and bias gradients, the code's ``match_loss``) plus the prototype
contrastive loss with CLIP's text features as class prototypes. L_PCL is the code's ``SupConLoss_text`` with
temperature tau: every federated feature F_i (label y_i) is an anchor, the contrasts are the text features of the
labels of all *other* federated features, i.e. for anchor i

    L_i = -[ <F_i, t_{y_i}> / tau - log sum_{j != i} exp(<F_i, t_{y_j}> / tau) ],   L_PCL = mean_i L_i,

computed here in closed form over the C classes (class c appears M - [c = y_i] times among the j != i; anchors
without a positive, i.e. one feature per class, are skipped as in the code). The features are *not* normalised
(the code uses the raw federated features). Then a fresh linear classifier is re-trained on F for ``crt_epoch``
epochs (CReFF) and becomes the GM classifier. GM = FedAvg feature extractor + re-trained classifier; the FedAvg model
(uploaded and trained by the clients) never receives the re-trained classifier.

Hyperparameters (paper symbol, default): ``kd_weight`` (mu / ``--alpha``; 1.0, the code's argparse default and
docs/reference.md's CLIP2FL protocol), ``kd_temperature`` (T, 3), ``contrast_weight`` (lambda /
``--contrast_alpha``; 0.001, the value of both the code's argparse default and the README's example run, which the
authors changed from 0.1 to 0.001), ``contrast_temperature`` (tau / ``--ins_temp``, 0.1), ``teacher_scale`` (100,
the code's fixed logit scale), ``clip_model`` ("ViT-B-32"), ``clip_pretrained`` (True), ``clip_tag`` ("openai"),
``clip_checkpoint`` (None), ``clip_template`` ("a photo of a {}"), plus CReFF's (``num_of_feature`` 100,
``match_epoch`` 100, ``crt_epoch`` 300, ``lr_feature`` 0.1, ``lr_net`` 0.01, ``batch_real`` 32) and the local ones
(code: SGD lr 0.1, no momentum, E = 10, B = 32; see ``configs/method/clip2fl.yaml``).

Deviations / choices:
- The teacher sees the student's (augmented) batch, re-normalised to CLIP's mean/std and resized by CLIP; the code
  feeds CLIP a separately preprocessed *un-augmented* 224 px copy of the image (standard KD vs the code).
- Feature/text dimensions: the code's federated features and ViT-B/32 text features are both 512-d. When the
  backbone's feature dimension d differs from CLIP's embedding dimension D, the text prototypes are mapped to d
  dimensions by a fixed seeded Gaussian random projection (Johnson-Lindenstrauss) and re-normalised
  (``text_projection="random"``; ``"error"`` refuses such a pairing).
- CReFF's choices (seeded server draws, closed-form re-training) apply unchanged, and so does CReFF's paper vs
  code difference: CLIP2FL's code, like CReFF's, applies differentiable Siamese augmentation (DSA) to the real
  samples of the client-side gradients (``real_augment: dsa``, in ``CLIP2FL.released_code``, inherited from
  CReFF); the default ``none`` uses the normalised samples.
- The teacher's logit scale is the code's fixed 100 (``teacher_scale``), not the teacher's own learned scale (equal
  for the pretrained OpenAI weights, about 14 for a random-weight teacher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.sharding import seeded_generator
from fedlt.methods._clip_kd import CLIP2FL_TEMPLATE, ClipKDClient
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.creff import CReFF, CReFFReducer
from fedlt.types import PaperRef

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

_PROJ_TAG = 0xC2F10
TEXT_PROJECTIONS = ("random", "error")


def prototype_contrastive_loss(features: Tensor, labels: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """CLIP2FL's prototype contrastive loss (code ``SupConLoss_text`` with the per-feature repeated text features),
    in closed form over the classes.

    For anchor i: ``-(<f_i, t_{y_i}>/tau - log sum_c n_c^i exp(<f_i, t_c>/tau))`` with n_c^i the number of other
    features of class c (``count_c - [c = y_i]``); the mean over anchors that have a positive (0 when none has).

    Args:
        features: (N, d) federated features (un-normalised).
        labels: (N,) int64 labels.
        prototypes: (C, d) class prototypes (normalised text features).
        temperature: tau.
    """
    num_classes = prototypes.shape[0]
    logits = features @ prototypes.t() / temperature  # (N, C)
    counts = torch.bincount(labels, minlength=num_classes).to(logits.dtype)
    others = counts.unsqueeze(0) - F.one_hot(labels, num_classes).to(logits.dtype)  # (N, C)
    lse = torch.logsumexp(logits + others.log(), dim=1)  # log 0 = -inf drops absent classes
    own = labels.unsqueeze(1)
    valid = others.gather(1, own).squeeze(1) > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return (lse - logits.gather(1, own).squeeze(1))[valid].mean()


class CLIP2FLReducer(CReFFReducer):
    """CReFF's reducer with the text-prototype contrastive term added to the federated-feature objective."""

    def __init__(self, method: CLIP2FL, num_classes: int, dim: int) -> None:
        super().__init__(method, num_classes, dim)
        self.method: CLIP2FL = method

    def feature_objective(self, feats: Tensor, real_w: Tensor, real_b: Tensor, owned: Tensor) -> Tensor:
        """Gradient matching (owned classes, CReFF's) + ``contrast_weight`` * L_PCL (paper Eq. 8)."""
        m = self.method
        loss = self.matching_loss(feats, real_w, real_b, owned)
        if m.contrast_weight:
            protos = m.text_prototypes.to(feats.device)
            loss = loss + m.contrast_weight * prototype_contrastive_loss(feats, self.labels, protos,
                                                                         m.contrast_temperature)
        return loss


@METHODS.register("clip2fl")
class CLIP2FL(ClipKDClient, CReFF):
    """CReFF + CLIP knowledge distillation on the clients + CLIP text-prototype contrast on the server.

    Args:
        kd_weight: weight mu of the distillation term.
        kd_temperature: distillation temperature T.
        contrast_weight: weight lambda of the prototype contrastive loss in the federated-feature objective.
        contrast_temperature: temperature tau of the prototype contrastive loss.
        teacher_scale: logit scale of the teacher (cosine x 100 in the code).
        clip_model: open_clip name of the teacher.
        clip_pretrained: load the teacher's pretrained weights ``clip_tag``.
        clip_tag: open_clip pretrained tag.
        clip_checkpoint: a local teacher checkpoint instead of a download.
        clip_template: the teacher's prompt template (one ``{}``).
        text_projection: ``random`` (project CLIP text features to the backbone's feature dimension when they
            differ) or ``error``.
        **kwargs: CReFF's arguments (federated features, re-training, ``real_augment``, ``dsa_strategy``,
            ``match_bias``) and the local-training ones.
    """

    paper = PaperRef(
        title="CLIP-Guided Federated Learning on Heterogeneous and Long-Tailed Data",
        venue="AAAI 2024",
        arxiv="2312.08648",
    )
    # CReFF's difference, which CLIP2FL's code shares (DSA on the real samples).
    released_code: ClassVar[dict[str, Any]] = {"real_augment": "dsa"}

    def __init__(self, kd_weight: float = 1.0, kd_temperature: float = 3.0, contrast_weight: float = 0.001,
                 contrast_temperature: float = 0.1, teacher_scale: float = 100.0, clip_model: str = "ViT-B-32",
                 clip_pretrained: bool = True, clip_tag: str | None = "openai", clip_checkpoint: str | None = None,
                 clip_template: str = CLIP2FL_TEMPLATE, text_projection: str = "random", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kd_weight < 0 or contrast_weight < 0:
            raise ValueError("kd_weight and contrast_weight must be >= 0")
        if kd_temperature <= 0 or contrast_temperature <= 0:
            raise ValueError("kd_temperature and contrast_temperature must be > 0")
        if text_projection not in TEXT_PROJECTIONS:
            raise ValueError(f"unknown text_projection {text_projection!r}; valid: {', '.join(TEXT_PROJECTIONS)}")
        self._init_clip_kd(kd_weight, kd_temperature, teacher_scale, clip_model, clip_pretrained, clip_tag,
                           clip_checkpoint, clip_template)
        self.contrast_weight = contrast_weight
        self.contrast_temperature = contrast_temperature
        self.text_projection = text_projection

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        self._setup_teacher(model, data)
        assert self.teacher is not None  # built: _setup_teacher's default
        self.text_prototypes = self._prototypes(self.teacher.zs_text.detach().float())

    def _prototypes(self, text: Tensor) -> Tensor:
        """(C, d) class prototypes in the backbone's feature space: CLIP's text features, projected when d != D."""
        dim_text = int(text.shape[1])
        if dim_text == self.dim:
            return text
        if self.text_projection == "error":
            raise ValueError(f"CLIP2FL contrasts backbone features (d={self.dim}) with CLIP text features "
                             f"(D={dim_text}); use a backbone with {dim_text}-d features or text_projection: random")
        gen = seeded_generator(self.seed_value, _PROJ_TAG)
        proj = torch.randn(dim_text, self.dim, generator=gen).to(text.device) / self.dim**0.5
        return F.normalize(text @ proj, dim=-1)

    def configure_reducer(self) -> Reducer:
        self.reducer = CLIP2FLReducer(self, self.num_classes, self.dim)
        return self.reducer
