"""FedAvgM.

Paper: T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, 2019 (server momentum); in the form of S. J. Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, arXiv:2003.00295 (server SGD with momentum and server learning rate).

Client: as FedAvg. Server: with the pseudo-gradient Delta_t = (weighted mean of the client models) - x_t,
m_t = beta m_{t-1} + Delta_t and x_{t+1} = x_t + eta m_t (Hsu et al.: v <- beta v + Delta w, w <- w - v, i.e.
eta = 1). BatchNorm running statistics are not gradients and take the plain weighted mean (integer buffers
rounded), see ``fedlt/methods/_server_opt.py``.
Hyperparameters (paper symbol): ``server_lr`` (eta, default 1.0), ``server_momentum`` (beta, default 0.9; the
effective server step is eta / (1 - beta), tune eta with beta), plus FedAvg's local arguments.
Deviations: none. With beta = 0 and eta = 1 the update is computed so that it equals FedAvg bit for bit (tested).
"""

from __future__ import annotations

from fedlt.methods._server_opt import ServerOptMethod
from fedlt.methods.base import METHODS
from fedlt.types import PaperRef


@METHODS.register("fedavgm")
class FedAvgM(ServerOptMethod):
    """FedAvg with server momentum on the pseudo-gradient (Hsu et al., 2019).

    Args:
        server_lr: server learning rate eta.
        server_momentum: server momentum beta in [0, 1).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
        venue="arXiv 2019",
        arxiv="1909.06335",
    )
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    rule = "sgdm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, **kwargs) -> None:
        # beta2 and tau are unused by the momentum rule; passed explicitly so that the CLI does not offer them.
        super().__init__(server_lr=server_lr, beta1=server_momentum, beta2=0.0, tau=1.0, **kwargs)
        self.server_momentum = server_momentum
