"""PromptFolio: a global prompt (aggregated) and a local prompt (personal) mixed like a portfolio.

Paper: B. Pan, W. Huang, Y. Shi, "Federated Learning from Vision-Language Foundation Models: Theoretical Analysis
and Method", NeurIPS 2024, arXiv:2409.19610. Official code: github PanBikang/PromptFolio (``trainers/
PromptFolio.py``, ``federated_main.py``, ``configs/trainers/PromptFolio/vit_b16.yaml``).

Model: a frozen CLIP with two CoOp prompts (``peft: prompt``): the global context (branch ``global``, state keys
``peft.global.*``) and a local context (branch ``local``, added in ``setup``, keys ``peft.local.*``), each giving
L2-normalised class text features t_g, t_l (C x D). With the normalised image feature f:

    portfolio logits  = logit_scale * f @ ((1 - theta) t_g + theta t_l)^T,

i.e. the *normalised* text features of each prompt are mixed linearly and the mixture is **not** re-normalised (as
in the official ``CustomCLIP.forward``; theta = 0 is the global prompt, theta = 1 the local one).
Client: E local epochs of SGD on the cross-entropy of the portfolio logits, updating both contexts (one optimizer
over both; the image features are computed once per batch, prompt PEFT does not change them). Upload: the global
context and n_k; the local context never leaves the client and is stored per client (every client starts from the
same initial local context, like the official code, which copies the initial model to every client).
Server: sample-weighted FedAvg of the global context (``fed_aggregate_model`` averages ``ctx[:1]`` with the
clients' data sizes).
Inference: PM (client k) = the portfolio with k's local prompt -- the model the paper evaluates on each client's
test data; GM = the global prompt alone (``logit_scale * f @ t_g^T``), reported for FedPuReL's GM tables.
Hyperparameters (paper symbol): ``theta`` (theta, the mixing coefficient; default 0.4 = the official code's
argparse default and README example ``--frac_p 0.4``; the paper's own choice was not verified against the PDF),
``lr`` 1e-3, ``momentum`` 0.9 and ``weight_decay`` 5e-4 (Dassl SGD, as for PromptFL), ``batch_size`` 32,
``local_epochs`` 1: the defaults are FedPuReL's protocol, under which fedlt runs PromptFolio as a baseline of
FedPuReL's tables (``configs/clip/promptfolio.yaml``); PromptFolio's paper's own values were not verified against
the PDF. The context length is the model's ``n_ctx`` (code default 8, FedPuReL 4).
Released code (``PromptFolio.released_code``): ``lr`` 2e-3 -- the ``--lr`` argument defaults to 1e-3, but
``federated_main.py`` writes it into the config *before* merging the trainer config file, whose ``OPTIM.LR: 0.002``
then wins (nothing resets it afterwards); by the same order the file's ``MAX_EPOCH: 5`` overrides the intended one
local epoch (``local_epochs`` 5), while ``--train_batch_size`` (16) is applied after the merge (``batch_size`` 16).
Deviations / choices: fp32 master weights instead of the code's fp16 CLIP; a fresh optimizer per client and round
(the code reuses one Dassl optimizer, leaking momentum between clients) and a constant lr (the code's Dassl
scheduler -- one warm-up epoch at 1e-5, then cosine over 5 epochs, one object stepped once per local epoch across
clients and rounds -- is not reproduced: 2e-3 is its peak); only prompt PEFT is supported (the portfolio mixes
text features).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from fedlt.methods.base import METHODS
from fedlt.methods.promptfl import PromptFL, require_trainable_peft
from fedlt.types import ClientContext, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

GLOBAL, LOCAL = "global", "local"


@METHODS.register("promptfolio")
class PromptFolio(PromptFL):
    """Global + personal CoOp prompts whose text features are mixed with weight ``theta``.

    Args:
        theta: mixing coefficient of the local prompt's text features (0: global only, 1: local only).
        lr: local SGD learning rate (1e-3, FedPuReL's protocol; the released code runs 2e-3, its trainer config's).
        momentum: local SGD momentum.
        weight_decay: local weight decay.
        local_epochs: local epochs E (the released code: 5, its trainer config's ``MAX_EPOCH``).
        batch_size: local batch size B (the released code: 16, its ``--train_batch_size`` default).
        **kwargs: further local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Federated Learning from Vision-Language Foundation Models: Theoretical Analysis and Method",
        venue="NeurIPS 2024",
        arxiv="2409.19610",
        url="https://github.com/PanBikang/PromptFolio",
    )
    # What github PanBikang/PromptFolio runs with its default trainer config (see the module docstring).
    released_code: ClassVar[dict[str, Any]] = {"lr": 0.002, "local_epochs": 5, "batch_size": 16}

    def __init__(self, theta: float = 0.4, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4,
                 local_epochs: int = 1, batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, local_epochs=local_epochs,
                         batch_size=batch_size, **kwargs)
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"theta must be in [0, 1], got {theta}")
        self.theta = float(theta)

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        clip = require_trainable_peft(model, "PromptFolio")
        if clip.peft_kind != "prompt":
            raise ValueError(f"PromptFolio mixes the text features of two prompts: set model.kwargs.peft to prompt; "
                             f"got {clip.peft_kind!r}")
        if LOCAL not in clip.branches:
            clip.add_branch(LOCAL)  # before the engine splits shared / personal keys
        super().setup(model, data, trainer)

    def is_personal(self, key: str) -> bool:
        return key.startswith(f"peft.{LOCAL}.")

    def portfolio_text(self) -> Tensor:
        """(C, D) mixed text features ``(1 - theta) t_g + theta t_l`` (not re-normalised)."""
        t_g = self.clip.text_features(GLOBAL)
        if self.theta == 0.0:
            return t_g
        return (1.0 - self.theta) * t_g + self.theta * self.clip.text_features(LOCAL)

    def portfolio_logits(self, x: Tensor) -> Tensor:
        """``logit_scale * f @ portfolio_text()^T``."""
        f = self.clip.encode(x, GLOBAL)
        return self.clip.logit_scale * f @ self.portfolio_text().t()

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        loss = self.loss(self.portfolio_logits(x), y, ctx.class_counts, ctx.round)
        return StepOutput(loss=loss, parts={"loss": loss.detach()})

    def predict_global(self, x: Tensor) -> Tensor:
        """The global prompt alone."""
        return self.clip.classify(self.clip.encode(x, GLOBAL), GLOBAL)

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """The client's portfolio (its local prompt is loaded in the workspace)."""
        return self.portfolio_logits(x)
