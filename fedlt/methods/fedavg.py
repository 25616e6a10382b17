"""FedAvg.

Paper: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629.

Client: E local epochs of mini-batch SGD (lr eta, batch B) on cross-entropy from the broadcast weights, with a
fresh optimizer every round. Server: theta^{t+1} = sum_{k in S_t} n_k theta_k / sum_{k in S_t} n_k over all
parameters and buffers (BatchNorm running statistics included; integer buffers rounded).
Hyperparameters (paper symbol): ``lr`` (eta), ``local_epochs`` (E), ``batch_size`` (B); the cohort size (C*K)
is the trainer's ``clients_per_round``.
Deviations: none. Momentum and weight decay default to 0 as in the paper.
"""

from __future__ import annotations

from fedlt.methods.base import METHODS, FedMethod
from fedlt.types import PaperRef


@METHODS.register("fedavg")
class FedAvg(FedMethod):
    """Federated averaging of locally SGD-trained models (McMahan et al., 2017)."""

    vectorizable = True  # the default local step: trainer.vectorize_cohort may stack its clients

    paper = PaperRef(
        title="Communication-Efficient Learning of Deep Networks from Decentralized Data",
        venue="AISTATS 2017",
        arxiv="1602.05629",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
