"""FedBN.

Paper: X. Li, M. Jiang, X. Zhang, M. Kamp, Q. Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021, arXiv:2102.07623.

Client: local SGD on the whole network exactly as FedAvg, but every BatchNorm layer is local: its affine parameters
(gamma = ``weight``, beta = ``bias``) and its running statistics (``running_mean``, ``running_var``,
``num_batches_tracked``) stay on the client between rounds and are never uploaded. A client seen for the first
time starts from the initial BatchNorm state. Server: FedAvg (sample-weighted mean) over all non-BatchNorm
parameters and buffers.
The personal keys are found by module type in :meth:`FedBN.setup` (every ``torch.nn`` BatchNorm flavour:
``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses such as timm's ``BatchNormAct2d``), not by name.
Inference: PM = global non-BN weights + the client's own BatchNorm layers (as in the paper, each client is tested
with its local BN). GM: FedBN has no global model: the global weights were never trained with any single BN
state, and the initial BN state (mean 0, variance 1) does not match them, while averaging the clients' BN layers
would be FedAvg's BN, not FedBN. ``has_global_model`` is therefore False whenever the model has BatchNorm layers
(no ``test/global/*`` metrics). A model without BatchNorm has no personal keys: FedBN is then exactly FedAvg
and reports GM.
Hyperparameters: none of its own (the paper's local epochs E and lr are FedAvg's).
Deviations: none.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef


@METHODS.register("fedbn")
class FedBN(FedAvg):
    """FedAvg with client-local BatchNorm layers (parameters and running statistics).

    Args:
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
        venue="ICLR 2021",
        arxiv="2102.07623",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bn_modules: frozenset[str] = frozenset()
        self.has_global_model = True

    def setup(self, model: nn.Module, data: Any, trainer: Any) -> None:
        super().setup(model, data, trainer)
        # By module type, so that any architecture (ResNet, timm) is covered without naming conventions.
        self.bn_modules = frozenset(
            name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
        )
        # See the module docstring: without BatchNorm, FedBN is FedAvg and its global model is meaningful.
        self.has_global_model = not self.bn_modules

    def is_personal(self, key: str) -> bool:
        """True for every parameter and buffer of a BatchNorm module."""
        module, _, _ = key.rpartition(".")
        return module in self.bn_modules

    @property
    def personalizes(self) -> bool:
        return bool(self.bn_modules)
