"""FedAdagrad.

Paper: S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konecny, S. Kumar, H. B. McMahan, "Adaptive
Federated Optimization", ICLR 2021, arXiv:2003.00295 (Algorithm 2, FedAdagrad).

Client: as FedAvg (local SGD). Server: pseudo-gradient Delta_t = (weighted mean of the client models) - x_t;
m_t = beta1 m_{t-1} + (1 - beta1) Delta_t, v_t = v_{t-1} + Delta_t^2, x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau),
with m_{-1} = 0 and v_{-1} = tau^2. BatchNorm running statistics take the plain weighted mean (integer buffers
rounded), see ``fedlt/methods/_server_opt.py``.
Hyperparameters (paper symbol): ``server_lr`` (eta, default 1e-1: the accumulated v only grows, so Adagrad takes
a larger eta than Adam), ``beta1`` (beta_1, 0.9), ``tau`` (tau, default 1e-2), plus FedAvg's local arguments.
Deviations: none (Algorithm 2 keeps the first moment for FedAdagrad too; set ``beta1 = 0`` for plain Adagrad).
"""

from __future__ import annotations

from fedlt.methods._server_opt import ServerOptMethod
from fedlt.methods.base import METHODS
from fedlt.types import PaperRef


@METHODS.register("fedadagrad")
class FedAdagrad(ServerOptMethod):
    """FedAvg clients, Adagrad on the server's pseudo-gradient (Reddi et al., 2021).

    Args:
        server_lr: server learning rate eta.
        beta1: first-moment decay beta_1 in [0, 1) (0: plain Adagrad).
        tau: adaptivity tau > 0 (also v_{-1} = tau^2).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(title="Adaptive Federated Optimization", venue="ICLR 2021", arxiv="2003.00295")
    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    rule = "adagrad"

    def __init__(self, server_lr: float = 1e-1, beta1: float = 0.9, tau: float = 1e-2, **kwargs) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, beta2=0.0, tau=tau, **kwargs)  # beta2: unused by Adagrad
