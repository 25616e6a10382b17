"""DGviaER: domain generalization via entropy regularization, the centralised baseline of FedTAIL.

Paper: S. Zhao, M. Gong, T. Liu, H. Fu, D. Tao, "Domain Generalization via Entropy Regularization", NeurIPS 2020.
FedTAIL (docs/reference.md 6.1, Appendix R 2.1) extends it and compares with it on PACS; run it with
``data.domain_layout: centralized`` (one client holding every source domain) for that comparison, or federated.

Client: L_cls + adv_weight * L_D (domain discriminator behind a gradient reversal of 0.1, DANN-style marginal
alignment) + the entropy-regularisation term as implemented in the DGviaER code: per-domain auxiliary classifiers
T_i trained on detached features of domain i; features of the other domains classified by the frozen T_i, the
cross-entropy gradient into the extractor scaled by 0.05; heads T'_i trained on domain i through a reversal of
0.001; every auxiliary cross-entropy class-balanced per batch; auxiliary heads at 0.1x the learning rate;
optional warm-up rounds with the auxiliary weights at 0.01. Server: FedAvg, per-domain heads averaged over the
clients holding the domain (see :mod:`fedlt.methods._dg`). It is FedTAIL with the class-wise SAM, the SAM
perturbation of the entropy term and the coherence term switched off, and a constant reversal coefficient.

Deviations: the discriminator's cross-entropy is not weighted by inverse domain sizes, and batches are the
client's shuffled batches rather than 64 images per domain per step; the 100-epoch / step-decay schedule is left
to the trainer config. In federated layout (i) the discriminator sees one domain per client and is off (``auto``).
"""

from __future__ import annotations

from typing import Any

from fedlt.methods.base import METHODS
from fedlt.methods.fedtail import FedTAIL
from fedlt.types import PaperRef


@METHODS.register("dgviaer")
class DGviaER(FedTAIL):
    """DGviaER-style entropy regularisation with a domain discriminator.

    Args:
        adversarial: ``auto`` (on when some client holds >= 2 domains, e.g. the centralised layout), ``on``, ``off``.
        adv_source: ``local`` (DGviaER's discriminator on the client's own features, the default) or FedTAIL's
            federated ``shared_stats`` / ``shared_means`` (see :class:`~fedlt.methods.fedtail.FedTAIL`).
        adv_weight: weight of the discriminator loss L_D.
        adv_coeff: gradient-reversal coefficient of the discriminator (0.1 in the DGviaER code).
        er_weight: weight of the entropy-regularisation term.
        er_cross_scale: scale of the cross-domain gradient into the extractor (0.05).
        er_adv_coeff: reversal coefficient of the per-domain adversarial heads T'_i (0.001).
        aux_hidden: hidden width of the auxiliary heads and the discriminator (0: linear).
        aux_dropout: dropout of the auxiliary heads and the discriminator.
        aux_lr_scale: learning rate of the auxiliary heads relative to ``lr`` (1e-4 / 1e-3 in the code).
        domain_head_aggregation: ``domain_weighted`` or ``fedavg`` (federated runs only).
        warmup_rounds: rounds with the auxiliary loss weights at 0.01 (the code's first 10 epochs).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(title="Domain Generalization via Entropy Regularization", venue="NeurIPS 2020")

    def __init__(
        self,
        adversarial: str = "auto",
        adv_source: str = "local",
        adv_weight: float = 1.0,
        adv_coeff: float = 0.1,
        er_weight: float = 1.0,
        er_cross_scale: float = 0.05,
        er_adv_coeff: float = 0.001,
        aux_hidden: int = 256,
        aux_dropout: float = 0.5,
        aux_lr_scale: float = 0.1,
        domain_head_aggregation: str = "domain_weighted",
        warmup_rounds: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            class_sam=False, er_rho=0.0, qt="domain_heads", coherence_alpha=0.0, adv_schedule="constant",
            adversarial=adversarial, adv_source=adv_source, adv_weight=adv_weight, adv_coeff=adv_coeff,
            er_weight=er_weight,
            er_cross_scale=er_cross_scale, er_adv_coeff=er_adv_coeff, aux_hidden=aux_hidden, aux_dropout=aux_dropout,
            aux_lr_scale=aux_lr_scale, domain_head_aggregation=domain_head_aggregation, warmup_rounds=warmup_rounds,
            **kwargs,
        )
