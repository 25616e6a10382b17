"""LG-FedAvg.

Paper: P. P. Liang, T. Liu, L. Ziyin, N. B. Allen, R. P. Auerbach, D. Brent, R. Salakhutdinov, L.-P. Morency,
"Think Locally, Act Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, 2020.

Client: local SGD on the whole network (local representation + global layers), as FedAvg. The local
representation (every key outside ``global_layers``; by default the feature extractor ``forward_features``)
stays on the client between rounds and is never uploaded; a client seen for the first time starts from the
initial representation. Server: FedAvg (sample-weighted mean) over the global layers only (by default the
classifier ``head``). This is the mirror image of FedPer/FedRep, which share the body and keep the head.
Inference: PM = the client's local representation + the global head (the paper's "local test"). There is no
single global model (representations are never aggregated), so GM metrics are not reported.
Hyperparameters: ``global_layers`` (state-dict key prefixes of the global part; the paper keeps the top layers
global, we default to the classifier), plus FedAvg's lr (eta), local epochs (E) and batch size (B).
Deviations: the paper (and official code) initialise LG-FedAvg from a FedAvg-trained model and report the
"new device" test by ensembling local models; neither stage is implemented here (training starts from the
initial model, like every other method).
"""

from __future__ import annotations

from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef


@METHODS.register("lgfedavg")
class LGFedAvg(FedAvg):
    """Local representations per client, global layers (the head) averaged with FedAvg weights.

    Args:
        global_layers: state-dict key prefixes of the global (aggregated) layers; every other key is local.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Think Locally, Act Globally: Federated Learning with Local and Global Representations",
        venue="arXiv 2020",
        arxiv="2001.01523",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    has_global_model = False

    def __init__(self, global_layers: tuple[str, ...] = ("head.",), **kwargs) -> None:
        super().__init__(**kwargs)
        if not global_layers:
            raise ValueError("LG-FedAvg needs at least one global layer prefix")
        self.global_layers = tuple(global_layers)

    def is_personal(self, key: str) -> bool:
        """Everything outside the global layers is the client's local representation."""
        return not key.startswith(self.global_layers)

    @property
    def personalizes(self) -> bool:
        return True
