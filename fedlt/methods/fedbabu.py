"""FedBABU.

Paper: J. Oh, S. Kim, S.-Y. Yun, "FedBABU: Towards Enhanced Representation for Federated Image Classification",
ICLR 2022, arXiv:2106.06042.

Client: during federated training the classifier head stays at its random initialisation (its parameters do not
require gradients; the official code equivalently uses a head learning rate of 0) and only the body is trained
with local SGD on the local loss (default cross-entropy). Server: FedAvg over the body; the global head is held
bit-for-bit at its initial value (:class:`~fedlt.methods._finetune.FrozenKeysReducer`), so it never needs to be
communicated.
Inference: GM = the global body with the initial head. PM (``prepare_personal``): the client fine-tunes the
*whole* model (body and head) from the global model on its local training split for ``finetune_epochs`` epochs
(paper symbol tau, main results with tau = 5) with the local learning rate, from a generator derived from
(seed, client id); the fine-tuned weights are used for that client's local test set and then discarded.
Hyperparameters: ``finetune_epochs`` (tau, default 5), ``finetune_lr`` (fine-tuning learning rate, default: the
local ``lr``, as in the paper), plus FedAvg's.
Deviations: none in the algorithm. Fine-tuning happens at every evaluation (the paper evaluates once after
training); momentum defaults to 0 like every fedlt method (the paper uses 0.9).
"""

from __future__ import annotations

from torch import Tensor, nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.engine.sharding import seeded_generator
from fedlt.methods._finetune import FrozenKeysReducer, client_counts, finetune, trainable_only
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef

_HEAD = "head."


@METHODS.register("fedbabu")
class FedBABU(FedAvg):
    """FedAvg with the head frozen at initialisation; PM fine-tunes the whole model locally.

    Args:
        finetune_epochs: tau, local fine-tuning epochs of the personalised model (0: PM = GM).
        finetune_lr: fine-tuning learning rate (default: ``lr``).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="FedBABU: Towards Enhanced Representation for Federated Image Classification",
        venue="ICLR 2022",
        arxiv="2106.06042",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it

    def __init__(self, finetune_epochs: int = 5, finetune_lr: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        if finetune_lr is not None and finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be > 0, got {finetune_lr}")
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr if finetune_lr is not None else self.lr

    def setup(self, model: nn.Module, data: object, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        # The head never receives gradients: configure_optimizers only takes parameters that require them.
        for p in self.model.head.parameters():
            p.requires_grad_(False)

    @property
    def personalizes(self) -> bool:
        return self.finetune_epochs > 0

    def configure_reducer(self) -> Reducer:
        return FrozenKeysReducer(lambda key: key.startswith(_HEAD))

    def prepare_personal(self, client_id: int) -> None:
        """Fine-tunes body and head on the client's training split (the workspace is reloaded afterwards)."""
        if self.finetune_epochs == 0:
            return
        counts = client_counts(self, client_id)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return self.loss(self.model(x), y, counts)

        with trainable_only(self.model, self.model.parameters()) as params:
            finetune(self, client_id, params, loss_fn, self.finetune_epochs, self.finetune_lr,
                     seeded_generator(self.run.seed, "fedbabu", client_id), self.momentum, self.weight_decay)
