"""FedRoD (Fed-RoD).

Paper: H.-Y. Chen, W.-L. Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022, arXiv:2107.00778.

Two predictors share one body f_theta. The generic predictor (body + generic head ``head``, z_g = g_psi(f(x))) is
trained with a class-balanced risk, by default the balanced softmax (BSM) on the client's local label histogram
n_{k,c}: CE(z_g + log pi_k, y), and is aggregated. The personalized predictor is the paper's "linear" variant:
z_p = z_g + h_k(f(x)) with a personal linear head h_k (``p_head``), trained with plain cross-entropy on z_p; the
features and the generic logits are detached in that loss (stop-gradient, as in the public reference
implementations: the FedRoD baseline of the official FedETF code and PFLlib), so the personal loss only updates
h_k and the generic model is learned exactly as without personalization. Each step takes one SGD step of the
body + generic head on the BSM loss and one of the personal head on its loss (two optimizers, the same ``lr``).
Server: FedAvg over body and generic head; ``p_head`` is personal (kept per client, never uploaded).
Inference: GM = body + generic head (``predict_global``), PM = z_g + h_k(f(x)) with the client's own head.
Hyperparameters: ``loss`` (the generic "balanced risk" L^BR; paper default BSM), ``personal_init`` (initial
personal head: ``copy`` of the initial generic head, as in the public reproductions, or ``zeros`` so that the
initial PM equals GM), plus FedAvg's.
Deviations: the hypernetwork variant (Fed-RoD hyper) is not implemented, only the linear personal head. Missing
classes (n_{k,c} = 0) get a finite, very low prior (fedlt.losses clamps counts to 1e-8) instead of log 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.losses import BalancedSoftmax, Loss
from fedlt.methods.base import METHODS, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput

_PERSONAL = "p_head."
_INITS = ("copy", "zeros")


@METHODS.register("fedrod")
class FedRoD(FedAvg):
    """Generic head trained with a balanced loss and aggregated; personal linear head added to its logits.

    Args:
        personal_init: initial personal head, ``copy`` (of the initial generic head) or ``zeros``.
        loss: the generic head's loss (default: balanced softmax on the local label histogram).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="On Bridging Generic and Personalized Federated Learning for Image Classification",
        venue="ICLR 2022",
        arxiv="2107.00778",
    )
    automatic_optimization = False
    personal_prefixes = (_PERSONAL,)

    def __init__(self, personal_init: str = "copy", loss: Loss | None = None, **kwargs) -> None:
        super().__init__(loss=loss if loss is not None else BalancedSoftmax(), **kwargs)
        if personal_init not in _INITS:
            raise ValueError(f"personal_init must be one of {list(_INITS)}, got {personal_init!r}")
        self.personal_init = personal_init

    def setup(self, model: nn.Module, data: object, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        head = self.model.head
        weight = next(head.parameters())
        # skip_init: no draw from the global RNG; the weights are copied or zeroed below (identical on all ranks).
        p_head = nn.utils.skip_init(nn.Linear, self.model.num_features, self.num_classes, device=weight.device,
                                     dtype=weight.dtype)
        with torch.no_grad():
            if self.personal_init == "copy":
                if not isinstance(head, nn.Linear) or head.weight.shape != p_head.weight.shape:
                    raise ValueError("personal_init='copy' needs a linear head of shape (num_classes, num_features)")
                p_head.weight.copy_(head.weight)
                p_head.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(p_head.bias))
            else:
                p_head.weight.zero_()
                p_head.bias.zero_()
        model.p_head = p_head

    @property
    def _p_head(self) -> nn.Linear:
        """h_k, the personal head (``model.p_head``, added in :meth:`setup`)."""
        return submodule(self.model, "p_head", nn.Linear)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[body + generic head, personal head], fresh for every client."""
        personal = list(self._p_head.parameters())
        ids = {id(p) for p in personal}
        generic = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        return [self._sgd(generic), self._sgd(personal)]

    def _sgd(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.current_lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        opt_generic, opt_personal = self.optimizers()
        features = self.model.forward_features(x)
        z_g = self.model.head(features)
        loss_g = self.loss(z_g, y, ctx.class_counts, ctx.round)
        # Personal loss on the detached generic logits and features: only h_k learns from it.
        loss_p = F.cross_entropy(z_g.detach() + self._p_head(features.detach()), y)
        for opt, loss in ((opt_generic, loss_g), (opt_personal, loss_p)):
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
        loss_g, loss_p = loss_g.detach(), loss_p.detach()
        return StepOutput(loss=None, parts={"loss": loss_g + loss_p, "generic": loss_g, "personal": loss_p})

    def predict_global(self, x: Tensor) -> Tensor:
        """GM: body + generic head only."""
        return self.model.head(self.model.forward_features(x))

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM: z_g + h_k(f(x)) (the workspace holds the client's personal head)."""
        return self.pm_logits(self.model.forward_features(x), client_id)

    @property
    def pm_shares_features(self) -> bool:
        """The body is shared: only ``p_head`` is personal, so the evaluator applies the heads to shared features."""
        return all(k.startswith(_PERSONAL) for k in self.personal_keys)

    def pm_logits(self, features: Tensor, client_id: int) -> Tensor:
        """z_g + h_k(features)."""
        return self.model.head(features) + self._p_head(features)
