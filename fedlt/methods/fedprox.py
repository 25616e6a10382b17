"""FedProx.

Paper: T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020, arXiv:1812.06127.

Client: minimises h_k(w; w^t) = F_k(w) + (mu/2) ||w - w^t||^2, the local loss plus a proximal term pulling the
local model towards the round's global model w^t (over the aggregated parameters). Server: as FedAvg.
Hyperparameters: ``mu`` (mu, proximal strength; paper grid {0.001, 0.01, 0.1, 1}), plus FedAvg's.
Deviations: the paper's "inexact solutions" (variable local work per device) are not simulated; every client
runs the configured local epochs. With ``mu = 0`` FedProx is exactly FedAvg (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput


@METHODS.register("fedprox")
class FedProx(FedAvg):
    """FedAvg with a proximal term (mu/2)||w - w^t||^2 on the local objective.

    Args:
        mu: proximal coefficient mu >= 0.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Federated Optimization in Heterogeneous Networks",
        venue="MLSys 2020",
        arxiv="1812.06127",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it

    def __init__(self, mu: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = mu

    vectorizable = True

    def vectorized_penalty(self, params: dict[str, Tensor],
                           global_params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]] | None:
        """(mu/2) ||w - w^t||^2 over the aggregated trainable parameters (as :meth:`training_step`)."""
        if self.mu == 0:
            return None
        prox = torch.stack([(params[k] - g).pow(2).sum() for k, g in global_params.items()
                            if k in self.shared_tensors]).sum()
        return 0.5 * self.mu * prox, {"prox": prox}

    def on_client_start(self, ctx: ClientContext) -> None:
        # Pairs (local parameter, global tensor) over the aggregated trainable parameters.
        named = dict(self.model.named_parameters())
        self._prox_pairs = [(named[k], ctx.message.state[k]) for k in self.shared_tensors if k in named]

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        out = super().training_step(batch, ctx)
        if self.mu == 0:
            return out
        assert out.loss is not None, "FedProx adds its proximal term to the step's loss (automatic optimization)"
        prox = torch.stack([(p - g).pow(2).sum() for p, g in self._prox_pairs]).sum()
        loss = out.loss + 0.5 * self.mu * prox
        return StepOutput(loss=loss, parts={"loss": loss.detach(), "ce": out.loss.detach(), "prox": prox.detach()})
