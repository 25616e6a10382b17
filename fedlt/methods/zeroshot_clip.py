"""Zero-shot CLIP (the no-training reference row of FedPuReL's tables, docs/reference.md 7.3).

Paper: A. Radford, J. W. Kim, C. Hallacy, A. Ramesh, G. Goh, S. Agarwal, G. Sastry, A. Askell, P. Mishkin, J. Clark,
G. Krueger, I. Sutskever, "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv:2103.00020.

Client: nothing. No optimizer, no local step (``local_steps`` is fixed to 0), no upload (an empty update).
Server: nothing (the reducer ignores updates; the global state never changes).
Inference: GM = PM = the frozen zero-shot classifier ``logit_scale * cos(CLIP_img(x), t_c)`` with the class text
features t_c of the dataset's hand-crafted template(s) (``fedlt.models.clip.TEMPLATES``, CoOp's table; the
normalised mean over several templates is CLIP's prompt ensembling), i.e. ``ClipModel.zero_shot_logits``.
Any PEFT branch or linear head of the model is ignored, so the configured PEFT kind does not matter (``peft: none``
is the natural choice).
Hyperparameters: none (``batch_size`` is accepted for config compatibility and unused).
Deviations: none. ``trains = False`` tells the contract suite that there is no training loss and no state change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedlt.methods._clip import require_clip
from fedlt.methods.base import METHODS, FedMethod, Reducer
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer


class NoOpReducer(Reducer):
    """Receives nothing and changes nothing: the global state stays the initial one."""

    def accumulate(self, update: ClientUpdate) -> None:
        """Ignores the (empty) update."""

    def server_step(self, round: int) -> None:
        """No aggregation."""


@METHODS.register("zeroshot_clip")
class ZeroShotCLIP(FedMethod):
    """Frozen zero-shot CLIP as GM and PM; nothing is trained or communicated.

    Args:
        batch_size: unused (accepted so that shared configs and overrides apply).
    """

    paper = PaperRef(
        title="Learning Transferable Visual Models From Natural Language Supervision",
        venue="ICML 2021",
        arxiv="2103.00020",
    )
    needs_clip = True
    trains = False

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__(local_epochs=0, local_steps=0, batch_size=batch_size)

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        self.clip = require_clip(model, "Zero-shot CLIP")
        super().setup(model, data, trainer)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        raise RuntimeError("zero-shot CLIP has no training step (local_steps is 0)")

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Uploads nothing."""
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors={})

    def configure_reducer(self) -> Reducer:
        return NoOpReducer()

    def predict_global(self, x: Tensor) -> Tensor:
        return self.clip.zero_shot_logits(x)

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        return self.clip.zero_shot_logits(x)
