"""FedRS (federated learning with restricted softmax).

Paper: X.-C. Li, D.-C. Zhan, "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID
Data", KDD 2021, doi:10.1145/3447548.3467254 (official code: lxcnju/FedRepo, ``algorithms/fedrs.py``).

Client: local SGD on the restricted softmax. With local label counts n_{k,c}, every logit o_c = w_c^T h is
scaled by alpha_c before the softmax cross-entropy, alpha_c = 1 for a class the client has (n_{k,c} > 0) and
alpha_c = alpha for a class it does not have: p_c = exp(alpha_c o_c) / sum_j exp(alpha_j o_j). A missing class
then gets a smaller (alpha = 0: no) update of its classifier weights: the plain local softmax pushes the
missing classes' weights away from the local features, which biases the aggregated classifier, and the restriction
limits that update (:func:`restriction`). The scaling only shapes the local training loss; inference (GM and PM)
uses the plain logits. Server: as FedAvg (sample-weighted
mean). PM = GM.
fedlt's linear heads carry a bias: the restricted logit is alpha_c (w_c^T h + b_c), the whole logit of the
classifier scaled; with a bias-free classifier (the networks of the paper and of the code) this is exactly
alpha_c w_c^T h. The method's ``loss`` (cross-entropy by default, as in the paper) is taken on the restricted
logits.
Hyperparameters (paper symbol): ``alpha`` (alpha in [0, 1], the scale of the missing classes' logits; 1 is
exactly FedAvg (tested), 0 gives the missing classes' classifier rows no gradient in local training (tested); the
official scripts search {0.9, 0.5, 0.1}; default 0.5), plus FedAvg's. The code's local training: SGD lr 0.03,
momentum 0.9, weight decay 1e-5, batch 64, gradient-norm clipping at 100 (``grad_clip``), as for every method of
the repository.

Paper vs released code (``FedRS.released_code``; docs/paper_vs_code.md):
- ``scaling="proportional"``: the paper restricts the missing classes only (alpha_c in {alpha, 1}, ``"missing"``,
  the default); the code scales every class by alpha_c = alpha + (1 - alpha) n_{k,c} / max_j n_{k,j}, so a
  missing class still gets alpha and the client's most frequent class 1, but a rare local class is also scaled
  down, in proportion to its count. With equal counts on all of the client's classes both are the same.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput

SCALINGS = ("missing", "proportional")


def restriction(class_counts: Tensor, alpha: float, scaling: str = "missing") -> Tensor:
    """The per-class logit scales alpha_c of a client's restricted softmax.

    Args:
        class_counts: (C,) the client's local label counts n_{k,c}.
        alpha: the scale of a missing class, in [0, 1].
        scaling: ``"missing"`` (the paper: 1 for a class the client has, alpha otherwise) or ``"proportional"``
            (the released code: alpha + (1 - alpha) n_{k,c} / max_j n_{k,j}).

    Returns:
        (C,) float scales, on the device of ``class_counts``.
    """
    counts = class_counts.float()
    if scaling == "missing":
        return counts.new_full(counts.shape, float(alpha)).masked_fill(counts > 0, 1.0)
    if scaling == "proportional":
        return counts / counts.max().clamp_min(1.0) * (1.0 - alpha) + alpha
    raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")


@METHODS.register("fedrs")
class FedRS(FedAvg):
    """FedAvg whose clients train on the restricted softmax: the logits of classes a client does not have are
    scaled by alpha (Li & Zhan, 2021).

    Args:
        alpha: scale in [0, 1] of the logits of the client's missing classes (1: FedAvg).
        scaling: ``"missing"`` (the paper) or ``"proportional"`` (the released code: every class scaled by
            alpha + (1 - alpha) n_c / max n, see the module docstring).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``loss`` is taken on the
            restricted logits).
    """

    paper = PaperRef(
        title="FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data",
        venue="KDD 2021",
        url="https://doi.org/10.1145/3447548.3467254",
    )
    # The official code's values (github lxcnju/FedRepo, algorithms/fedrs.py: cdist = dist / dist.max()).
    released_code: ClassVar[dict[str, Any]] = {"scaling": "proportional"}

    def __init__(self, alpha: float = 0.5, scaling: str = "missing", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
        self.alpha = alpha
        self.scaling = scaling
        self._scale: Tensor | None = None

    def on_client_start(self, ctx: ClientContext) -> None:
        self._scale = restriction(ctx.class_counts, self.alpha, self.scaling)

    def restricted_logits(self, logits: Tensor, ctx: ClientContext) -> Tensor:
        """``logits`` (B, C) with column c scaled by the client's alpha_c."""
        scale = self._scale if self._scale is not None else restriction(ctx.class_counts, self.alpha, self.scaling)
        return logits * scale.to(logits.dtype)

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """The loss (default cross-entropy) on the restricted logits."""
        x, y = batch[0], batch[1]
        loss = self.loss(self.restricted_logits(self.model(x), ctx), y, ctx.class_counts, ctx.round)
        return StepOutput(loss=loss, parts={"loss": loss.detach()})
