"""FedPer.

Paper: M. G. Arivazhagan, V. Aggarwal, A. K. Singh, S. Choudhary, "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019.

Client: trains the whole network (base + personalization layers) with local SGD; the personalization layers
(here: the classifier ``head``) are kept on the client between rounds and never uploaded. A client seen for the
first time starts from the initial head. Server: FedAvg over the base layers only.
Inference: PM = global base + the client's own head. There is no global model (the heads are never aggregated),
so GM metrics are not reported for FedPer.
Hyperparameters: ``personal_layers`` (which state-dict prefixes are personal; paper: the top layers, default the
classifier head), plus FedAvg's.
Deviations: none beyond choosing the classifier as the personalization layers by default.
"""

from __future__ import annotations

from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef


@METHODS.register("fedper")
class FedPer(FedAvg):
    """FedAvg on the base layers; personalization layers stay on each client.

    Args:
        personal_layers: state-dict key prefixes of the personalization layers.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    vectorizable = True  # the default local step: trainer.vectorize_cohort may stack its clients

    paper = PaperRef(
        title="Federated Learning with Personalization Layers",
        venue="arXiv 2019",
        arxiv="1912.00818",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    has_global_model = False

    def __init__(self, personal_layers: tuple[str, ...] = ("head.",), **kwargs) -> None:
        super().__init__(**kwargs)
        if not personal_layers:
            raise ValueError("FedPer needs at least one personal layer prefix")
        self.personal_layers = tuple(personal_layers)

    def is_personal(self, key: str) -> bool:
        return key.startswith(self.personal_layers)

    @property
    def personalizes(self) -> bool:
        return True
