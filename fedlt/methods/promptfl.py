"""PromptFL (= FedCoOp): federated averaging of a CoOp prompt on a frozen CLIP.

Paper: T. Guo, S. Guo, J. Wang, X. Tang, W. Xu, "PromptFL: Let Federated Participants Cooperatively Learn Prompts
Instead of Models -- Federated Learning in Age of Foundation Model", IEEE Transactions on Mobile Computing 2023,
arXiv:2208.11625.

Model: a frozen CLIP with the CoOp learnable context of ``model.kwargs.peft: prompt`` -- n_ctx shared context
vectors, class token at the end, logits ``logit_scale * cos(CLIP_img(x), CLIP_text([SOS] ctx {class}.))``
(``fedlt.models.clip``; ``n_ctx`` is a model argument: 4 in FedPuReL's comparisons, 8 in PromptFolio's code, 16
is CoOp's default).
Client: E local epochs of SGD on the cross-entropy of the global branch's logits; only the prompt context is
trainable (the towers are frozen), a fresh optimizer every round. Upload: the context (``peft.global.ctx``) and the
local sample count n_k -- nothing else leaves the client.
Server: sample-weighted FedAvg of the context, ``ctx = sum_k n_k ctx_k / sum_k n_k``.
Inference: GM = PM = the aggregated prompt (no personal state).
Hyperparameters (paper symbol): ``lr`` (eta, 1e-3), ``momentum`` 0.9 and ``weight_decay`` 5e-4 (the Dassl SGD
defaults), ``batch_size`` (B, 32), ``local_epochs`` (E, 1) -- the settings of FedPuReL's baselines (docs/reference.md
1.9),
which are what the reproduced tables compare against; PromptFL's own experiments may use other values.
Deviations / choices:
- Other PEFT kinds are accepted and give "federated PEFT" under the same protocol: with ``peft: lora`` this is
  FedAvg of the LoRA factors (FedPuReL's LoRA baseline), with ``peft: adapter`` FedAvg of a CLIP-Adapter. A model
  without anything to train (``peft: none`` with the text head) or with a linear head (use ``fedavg`` for linear
  probing on CLIP features) is rejected.
- The official code runs CLIP in fp16; fedlt keeps fp32 weights (use ``trainer.precision: 16-mixed`` for speed).
- A fresh optimizer per client and round (the Dassl trainer of the official code reuses one optimizer object, so
  momentum leaks between clients; docs/reference.md 4.3 treats this as an artefact).
- No FedCoOp alias: the registry key is the module name, so ``promptfl`` is the only name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from fedlt.methods._clip import require_clip
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer


def require_trainable_peft(model: nn.Module, method: str) -> Any:
    """The CLIP model, after checking it has a PEFT branch to train through the text head.

    Raises:
        ValueError: not a CLIP model, ``peft: none`` or ``head: linear``.
    """
    clip = require_clip(model, method)
    if clip.peft_kind == "none" or clip.head_kind != "text":
        raise ValueError(f"{method} trains a PEFT branch of CLIP's text classifier: set model.kwargs.peft to "
                         f"prompt (lora, adapter also work) and head to text; got peft={clip.peft_kind!r}, "
                         f"head={clip.head_kind!r} (linear probing on CLIP features is `fedavg` with peft: none, "
                         "head: linear)")
    return clip


@METHODS.register("promptfl")
class PromptFL(FedAvg):
    """FedAvg of the CoOp prompt (or of any PEFT branch) of a frozen CLIP.

    Args:
        lr: local SGD learning rate (1e-3).
        momentum: local SGD momentum (0.9).
        weight_decay: local weight decay (5e-4).
        local_epochs: local epochs E (1).
        batch_size: local batch size B (32).
        **kwargs: further local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="PromptFL: Let Federated Participants Cooperatively Learn Prompts Instead of Models -- Federated "
        "Learning in Age of Foundation Model",
        venue="IEEE TMC 2023",
        arxiv="2208.11625",
    )
    needs_clip = True

    def __init__(self, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4, local_epochs: int = 1,
                 batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, local_epochs=local_epochs,
                         batch_size=batch_size, **kwargs)

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        self.clip = require_trainable_peft(model, "PromptFL")
        super().setup(model, data, trainer)
