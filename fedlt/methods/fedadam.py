"""FedAdam.

Paper: S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konecny, S. Kumar, H. B. McMahan, "Adaptive
Federated Optimization", ICLR 2021, arXiv:2003.00295 (Algorithm 2, FedAdam).

Client: as FedAvg (local SGD). Server: pseudo-gradient Delta_t = (weighted mean of the client models) - x_t;
m_t = beta1 m_{t-1} + (1 - beta1) Delta_t, v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2,
x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), with m_{-1} = 0 and v_{-1} = tau^2. BatchNorm running statistics are
not gradients and take the plain weighted mean (integer buffers rounded), see ``fedlt/methods/_server_opt.py``.
Hyperparameters (paper symbol): ``server_lr`` (eta, default 1e-2), ``beta1`` (beta_1, 0.9), ``beta2`` (beta_2,
0.99), ``tau`` (tau, adaptivity, default 1e-3; the paper's grid is 1e-5 ... 1e-1), plus FedAvg's local arguments
(the client learning rate eta_l is ``lr``).
Deviations: none (like the paper, no Adam bias correction; the optimizer state is checkpointed with the server).
"""

from __future__ import annotations

from fedlt.methods._server_opt import ServerOptMethod
from fedlt.methods.base import METHODS
from fedlt.types import PaperRef


@METHODS.register("fedadam")
class FedAdam(ServerOptMethod):
    """FedAvg clients, Adam on the server's pseudo-gradient (Reddi et al., 2021).

    Args:
        server_lr: server learning rate eta.
        beta1: first-moment decay beta_1 in [0, 1).
        beta2: second-moment decay beta_2 in [0, 1).
        tau: adaptivity tau > 0 (controls how adaptive the step is; also v_{-1} = tau^2).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(title="Adaptive Federated Optimization", venue="ICLR 2021", arxiv="2003.00295")
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    rule = "adam"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 **kwargs) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau, **kwargs)
