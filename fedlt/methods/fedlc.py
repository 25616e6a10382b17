"""FedLC.

Paper: J. Zhang, Z. Li, B. Li, J. Xu, S. Wu, S. Ding, C. Wu, "Federated Learning with Label Distribution Skew via
Logits Calibration", ICML 2022, arXiv:2209.00189.

Client: local SGD on the calibrated cross-entropy L_cal = -log softmax(z - tau n_k^{-1/4})_y, i.e. every logit
z_c is lowered by its pairwise label margin tau n_{k,c}^{-1/4} computed from the client's local label counts
n_{k,c} before the softmax cross-entropy (the paper's calibrated loss, Sec. 4). Rare local classes get larger
margins, which counteracts the local model's over-fitting to its majority classes and its suppression of
missing ones. Server: as FedAvg (sample-weighted mean).
Hyperparameters (paper symbol): ``tau`` (tau, calibration strength; default 1.0, the usual re-implementation
default: the paper tunes tau per setting), plus FedAvg's.
Deviations: (1) the paper's printed denominator sums over y' != y; like the public re-implementations we use the
full softmax (sum over all classes), the form the calibrated cross-entropy is derived from. (2) A class missing
on the client (n_{k,c} = 0, where n^{-1/4} is infinite) has its count clamped to 1e-8 (margin ~100 tau), so it
drops out of the local softmax with finite values (fedlt.losses module docstring). (3) The margins are shifted
by their minimum, a constant shift that leaves the loss unchanged. With uniform local counts the calibration is
a constant shift, so FedLC equals FedAvg exactly (tested).
"""

from __future__ import annotations

from fedlt.losses import CalibratedCE
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import PaperRef


@METHODS.register("fedlc")
class FedLC(FedAvg):
    """FedAvg whose clients minimise the logit-calibrated cross-entropy (Zhang et al., 2022).

    Args:
        tau: calibration strength tau >= 0 of the margins tau n_{k,c}^{-1/4} (0 is FedAvg).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``loss`` is fixed to
            ``CalibratedCE(tau)``).
    """

    vectorizable = True  # the default local step: trainer.vectorize_cohort may stack its clients

    paper = PaperRef(
        title="Federated Learning with Label Distribution Skew via Logits Calibration",
        venue="ICML 2022",
        arxiv="2209.00189",
    )

    def __init__(self, tau: float = 1.0, **kwargs) -> None:
        if kwargs.pop("loss", None) is not None:
            raise ValueError("FedLC's loss is CalibratedCE(tau); set tau, or use FedAvg(loss=...)")
        super().__init__(loss=CalibratedCE(tau=tau), **kwargs)
        self.tau = tau
