"""FedYogi.

Paper: S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konecny, S. Kumar, H. B. McMahan, "Adaptive
Federated Optimization", ICLR 2021, arXiv:2003.00295 (Algorithm 2, FedYogi).

Client: as FedAvg (local SGD). Server: pseudo-gradient Delta_t = (weighted mean of the client models) - x_t;
m_t = beta1 m_{t-1} + (1 - beta1) Delta_t, v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2),
x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), with m_{-1} = 0 and v_{-1} = tau^2. Yogi's additive second moment
grows or shrinks by at most (1 - beta2) Delta^2 per round, which keeps the effective step from exploding when
the pseudo-gradients suddenly shrink. BatchNorm running statistics take the plain weighted mean (integer buffers
rounded), see ``fedlt/methods/_server_opt.py``.
Hyperparameters (paper symbol): ``server_lr`` (eta, default 1e-2), ``beta1`` (beta_1, 0.9), ``beta2`` (beta_2,
0.99), ``tau`` (tau, default 1e-3), plus FedAvg's local arguments.
Deviations: none (no bias correction, as in the paper).
"""

from __future__ import annotations

from fedlt.methods.base import METHODS
from fedlt.methods.fedadam import FedAdam


@METHODS.register("fedyogi")
class FedYogi(FedAdam):
    """FedAvg clients, Yogi on the server's pseudo-gradient (Reddi et al., 2021).

    Args:
        server_lr: server learning rate eta.
        beta1: first-moment decay beta_1 in [0, 1).
        beta2: second-moment rate beta_2 in [0, 1).
        tau: adaptivity tau > 0 (also v_{-1} = tau^2).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    lightning_client = True  # the client step is the plain loss: a LightningModule can supply it
    rule = "yogi"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 **kwargs) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau, **kwargs)
