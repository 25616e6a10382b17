"""FedETF.

Paper: Z. Li, X. Shang, R. He, T. Lin, C. Wu, "No Fear of Classifier Biases: Neural Collapse Inspired Federated
Learning with Synthetic and Fixed Classifier", ICCV 2023, arXiv:2303.10058 (official code: ZexiLee/ICCV-2023-FedETF).

Model: the linear head is replaced by (i) a learnable projection layer W_p: R^d -> R^{d'} followed by L2
normalisation, u = W_p h / ||W_p h||, and (ii) a fixed simplex ETF classifier M = sqrt(C/(C-1)) U (I - 11^T/C)
(shape d' x C, U with orthonormal columns from a seeded QR; columns unit norm, pairwise cosine -1/(C-1)). Logits
are z = beta * M^T u with a learnable temperature beta. M is a buffer, identical on every client, never trained
during federated learning.
Client: local SGD on the balanced softmax loss (the paper's "balanced loss") of the scaled logits with the
client's local label histogram. Server: FedAvg over body, projection and beta; M is held bit-for-bit
(:class:`~fedlt.methods._finetune.FrozenKeysReducer`).
Inference: GM = the global model. PM (the paper's local adaptation, ``prepare_personal``): from the
global model the client (1) trains body, projection and beta for ``adapt_epochs`` epochs on the balanced loss,
then (2) alternates ``personal_rounds`` times: ``personal_epochs`` epochs fine-tuning only the ETF classifier M
(SGD, ``etf_lr``) and ``personal_epochs`` epochs fine-tuning only the projection (SGD, ``proj_lr``), both with
cross-entropy on the scaled logits. The personalised weights are used for the client's local test set only and
discarded (the workspace is reloaded from the global state). The body is frozen in stage 2, so its features
are computed once per client (eval-mode BatchNorm, no augmentation) and stage 2 trains on them.
Hyperparameters (official code defaults): ``proj_dim`` d' (default C, as for the official ResNets; must be >= C),
``beta_init`` (initial temperature, 1.0), ``adapt_epochs`` (default: ``local_epochs`` E), ``personal_rounds``
(20), ``personal_epochs`` (3), ``etf_lr`` (0.1), ``proj_lr`` (0.05), plus FedAvg's; ``loss`` defaults to the
balanced softmax.
Paper vs released code (``FedETF.released_code``; docs/paper_vs_code.md): ``absent_class_count`` is the count
that a class absent from the client's training split gets in the balanced loss (and in any ``loss`` given, which
receives the counts): 1e-8 by default (fedlt.losses' clamp, the limit n_c -> 0 of the balanced loss: a missing
class drops out of the calibrated softmax) vs 1 in the official code (a missing class is treated like a class
with one sample and its logit keeps being pushed down). It applies to local training and to the balanced-loss
stage 1 of the local adaptation. ``etf_basis``: the ETF's orthonormal U is the QR of a Gaussian draw by default
(the paper only asks for an orthonormal basis), of a U[0, 1) draw in the official code (:func:`etf_basis`).
Deviations: the ETF's U comes from a generator seeded by the experiment seed instead of numpy's global RNG. Local
adaptation runs at every evaluation (the paper runs it once after
training). Stage 2 uses cached frozen-body features: the official code re-runs the frozen body on augmented
batches in train mode (batch BatchNorm statistics, running statistics still updated), which changes the inputs
of the same optimisation problem only by augmentation and BatchNorm noise and costs a full forward pass per step
(2 x 20 x 3 epochs per client).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.engine.sharding import seeded_generator
from fedlt.losses import COUNT_EPS, BalancedSoftmax, Loss
from fedlt.methods._finetune import FrozenKeysReducer, client_counts, client_features, finetune, trainable_only
from fedlt.methods.base import METHODS, Reducer, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput

_ETF_KEY = "head.etf"


ETF_BASES = ("gaussian", "uniform")


def etf_basis(num_classes: int, dim: int, generator: torch.Generator, basis: str = "gaussian") -> Tensor:
    """U (dim x C, float64) with orthonormal columns: the Q factor of the reduced QR decomposition of a random
    matrix drawn from ``generator``, Gaussian (``"gaussian"``) or uniform on [0, 1) (``"uniform"``)."""
    if basis not in ETF_BASES:
        raise ValueError(f"the ETF basis must be one of {list(ETF_BASES)}, got {basis!r}")
    draw = torch.randn if basis == "gaussian" else torch.rand
    u, _ = torch.linalg.qr(draw(dim, num_classes, generator=generator, dtype=torch.float64))
    return u


def simplex_etf(num_classes: int, dim: int, generator: torch.Generator, basis: str = "gaussian") -> Tensor:
    """The simplex ETF M = sqrt(C/(C-1)) U (I - 11^T/C) of shape (dim, C).

    U (dim x C) has orthonormal columns, from the QR decomposition of a random matrix drawn from ``generator``
    (:func:`etf_basis`; ``basis`` ``"gaussian"`` or ``"uniform"`` on [0, 1)). The columns of M have unit norm and
    pairwise inner products -1/(C-1).

    Raises:
        ValueError: when ``num_classes < 2``, ``dim < num_classes`` or ``basis`` is unknown.
    """
    if num_classes < 2 or dim < num_classes:
        raise ValueError(f"a simplex ETF needs C >= 2 and dim >= C, got C={num_classes}, dim={dim}")
    u = etf_basis(num_classes, dim, generator, basis)
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return (math.sqrt(num_classes / (num_classes - 1)) * u @ centred).float()


class ETFHead(nn.Module):
    """Projection + L2 normalisation + fixed simplex ETF with a learnable temperature: z = beta M^T u.

    Args:
        num_features: d, the backbone feature dimension.
        num_classes: C.
        proj_dim: d' (>= C).
        beta_init: initial temperature beta.
        generator: draws the ETF's orthonormal basis and the projection's initial weights.
        basis: the draw behind the ETF's orthonormal basis (:func:`etf_basis`).
    """

    etf: Tensor  # M (d' x C), a buffer

    def __init__(self, num_features: int, num_classes: int, proj_dim: int, beta_init: float,
                 generator: torch.Generator, basis: str = "gaussian") -> None:
        super().__init__()
        # skip_init + explicit draws from ``generator``: nn.Linear's default init, without the global RNG.
        self.proj = nn.utils.skip_init(nn.Linear, num_features, proj_dim)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(num_features)
        nn.init.uniform_(self.proj.bias, -bound, bound, generator=generator)
        self.register_buffer("etf", simplex_etf(num_classes, proj_dim, generator, basis))
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(self, features: Tensor) -> Tensor:
        u = F.normalize(self.proj(features), dim=1, eps=1e-12)
        return self.beta * (u @ self.etf)


@METHODS.register("fedetf")
class FedETF(FedAvg):
    """Fixed simplex-ETF classifier on normalised projected features, balanced loss; ETF/projection adaptation
    for personalization.

    Args:
        proj_dim: d', the projection dimension (default: the number of classes C).
        beta_init: initial value of the learnable temperature beta.
        adapt_epochs: PM stage 1, epochs of balanced-loss training of everything but M (default: local_epochs).
        personal_rounds: PM stage 2, number of alternations (ETF, projection); 0 skips stage 2.
        personal_epochs: epochs of each half of one alternation.
        etf_lr: learning rate of the ETF fine-tuning (plain SGD).
        proj_lr: learning rate of the projection fine-tuning (SGD with the local momentum and weight decay).
        loss: the federated training loss (default: balanced softmax on the local label histogram).
        absent_class_count: the count given to the loss for a class the client does not hold (>= 1e-8): 1e-8
            (default; the class drops out of the calibrated softmax) or 1.0 (the official code).
        etf_basis: the ETF's orthonormal basis is the QR of a ``gaussian`` (default) or ``uniform`` U[0, 1) draw
            (the official code).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning with Synthetic and "
              "Fixed Classifier",
        venue="ICCV 2023",
        arxiv="2303.10058",
    )
    # The official code's values (github ZexiLee/ICCV-2023-FedETF, nodes.py: absent-class counts set to 1).
    released_code: ClassVar[dict[str, Any]] = {"absent_class_count": 1.0, "etf_basis": "uniform"}

    def __init__(self, proj_dim: int | None = None, beta_init: float = 1.0, adapt_epochs: int | None = None,
                 personal_rounds: int = 20, personal_epochs: int = 3, etf_lr: float = 0.1, proj_lr: float = 0.05,
                 loss: Loss | None = None, absent_class_count: float = COUNT_EPS, etf_basis: str = "gaussian",
                 **kwargs) -> None:
        super().__init__(loss=loss if loss is not None else BalancedSoftmax(), **kwargs)
        if min(personal_rounds, personal_epochs, adapt_epochs or 0) < 0 or etf_lr <= 0 or proj_lr <= 0:
            raise ValueError("FedETF needs epochs/rounds >= 0 and learning rates > 0")
        if (isinstance(absent_class_count, bool) or not isinstance(absent_class_count, (int, float))
                or not math.isfinite(absent_class_count) or absent_class_count < COUNT_EPS):
            raise ValueError(f"absent_class_count must be a finite number >= {COUNT_EPS}, got {absent_class_count!r}")
        self.absent_class_count = float(absent_class_count)
        if etf_basis not in ETF_BASES:
            raise ValueError(f"etf_basis must be one of {list(ETF_BASES)}, got {etf_basis!r}")
        self.etf_basis = etf_basis
        self.proj_dim = proj_dim
        self.beta_init = beta_init
        self.adapt_epochs = self.local_epochs if adapt_epochs is None else adapt_epochs
        self.personal_rounds = personal_rounds
        self.personal_epochs = personal_epochs
        self.etf_lr = etf_lr
        self.proj_lr = proj_lr

    def setup(self, model: nn.Module, data: object, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        device = next(model.parameters()).device
        proj_dim = self.proj_dim if self.proj_dim is not None else self.num_classes
        head = ETFHead(self.model.num_features, self.num_classes, proj_dim, self.beta_init,
                       seeded_generator(self.run.seed, "fedetf"), self.etf_basis)
        model.head = head.to(device)  # the FedModel contract: the classifier keeps the name ``head``

    def loss_counts(self, counts: Tensor) -> Tensor:
        """The class counts given to the loss: ``absent_class_count`` where a count is 0."""
        return torch.where(counts > 0, counts, torch.full_like(counts, self.absent_class_count))

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """The loss (default balanced softmax) with the local histogram, absent classes at ``absent_class_count``."""
        x, y = batch[0], batch[1]
        loss = self.loss(self.model(x), y, self.loss_counts(ctx.class_counts), ctx.round)
        return StepOutput(loss=loss, parts={"loss": loss.detach()})

    @property
    def personalizes(self) -> bool:
        return self.adapt_epochs > 0 or (self.personal_rounds > 0 and self.personal_epochs > 0)

    def configure_reducer(self) -> Reducer:
        return FrozenKeysReducer(lambda key: key == _ETF_KEY)

    def prepare_personal(self, client_id: int) -> None:
        """The paper's local adaptation (module docstring); the workspace is reloaded afterwards."""
        gen = seeded_generator(self.run.seed, "fedetf-personal", client_id)
        if self.adapt_epochs > 0:
            counts = self.loss_counts(client_counts(self, client_id))
            with trainable_only(self.model, [p for p in self.model.parameters() if p.requires_grad]) as params:
                finetune(self, client_id, params, lambda x, y: self.loss(self.model(x), y, counts),
                         self.adapt_epochs, self.lr, gen, self.momentum, self.weight_decay)
        if self.personal_rounds > 0 and self.personal_epochs > 0:
            self._alternate(client_id, gen)

    def _alternate(self, client_id: int, gen: torch.Generator) -> None:
        """Stage 2: alternately fine-tune M and the projection with cross-entropy on the frozen body's features."""
        head = submodule(self.model, "head", ETFHead)  # set in setup
        cached = client_features(self, client_id)

        def ce(features: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(head(features), y)

        for _ in range(self.personal_rounds):
            with trainable_only(self.model, [head.etf]) as params:
                finetune(self, client_id, params, ce, self.personal_epochs, self.etf_lr, gen, cached=cached)
            with trainable_only(self.model, head.proj.parameters()) as params:
                finetune(self, client_id, params, ce, self.personal_epochs, self.proj_lr, gen, self.momentum,
                         self.weight_decay, cached=cached)

