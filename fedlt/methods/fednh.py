"""FedNH: class prototypes, uniform on the hypersphere at the start, smoothly infused with class semantics.

Paper: Y. Dai, Z. Chen, J. Li, S. Heinecke, L. Sun, R. Xu, "Tackling Data Heterogeneity in Federated Learning with
Class Prototypes", AAAI 2023, arXiv:2212.02758 (official code: Yutong-Dai/FedNH, ``src/flbase/strategies/FedNH.py``,
``FedUH.py``, ``models/CNN.py``).

Model: the linear head is replaced by C class prototypes mu_c (unit rows of a (C, d) buffer, ``head.prototypes``)
used as a fixed-norm classifier on L2-normalised features: the logits are ``s * cos(f(x), mu_c)`` =
``s * <f(x) / ||f(x)||, mu_c>`` with the scale s (``head.scale``; a fixed buffer, or a parameter trained and
averaged like the body with ``learn_scale``). Initialisation (``prototype_init="uniform"``): the prototypes are
spread uniformly on the unit hypersphere by approximately solving the paper's min_{||mu_c|| = 1} max_{i != j}
<mu_i, mu_j>: ``init_steps`` steps of projected gradient descent (learning rate ``init_lr``, momentum 0.9) on a
smooth maximum of the pairwise cosines (log-sum-exp, temperature annealed from 10 to 100), from a seeded Gaussian
draw, renormalised after every step; exact in 2-d (:func:`uniform_prototypes`; float64 on the CPU, the same on
every rank; it reaches the simplex, -1/(C-1), when C <= d + 1).
Client: local SGD on the loss (default cross-entropy) of the scaled cosine logits, the prototypes fixed. After
training it computes, with the trained body in eval mode on its training images, the normalised class means of
the normalised features, mu_{k,c} = normalise(mean_{i: y_i = c} f(x_i) / ||f(x_i)||), and uploads the trained model
(weight n_k) plus the class sums n_{k,c} mu_{k,c} and the counts n_{k,c}.
Server: FedAvg of the body (and s when learned); the prototypes are never averaged but updated semantics-aware
(:func:`update_prototypes`): for every class c some cohort client holds,

    mu_bar_c = normalise(sum_k n_{k,c} mu_{k,c} / sum_k n_{k,c}),    mu_c <- normalise(rho * mu_c + (1 - rho) mu_bar_c),

and the prototypes of classes no cohort client holds stay as they are. The sums are the engine's exact sums
(``Reducer`` extras), so every rank computes the same prototypes bit for bit; they are part of the global state
(checkpointed with it).
Inference: GM = the global model (averaged body and scale, current prototypes). PM = the client's locally trained
model from its last participation (its body and scale, with the prototypes it trained against), as the official
code evaluates each client's local model; a client that never trained is evaluated with the global model. The
local models live in the submodule ``fednh`` of the workspace model (personal model keys, one full model per
client: use ``trainer.client_state: disk`` for large models).
Hyperparameters (paper symbol, value): ``rho`` (rho, the smoothing of the prototype update, 0.9), ``scale`` (s; 30,
the value of the official code's fixed-scale option, which its comment attributes to the paper), ``learn_scale``,
``prototype_init``, ``init_steps`` (1000), ``init_lr`` (0.05), plus FedAvg's (the released scripts: SGD lr 0.01
decayed by 0.99 per round, momentum 0.9, weight decay 1e-5, 5 local epochs, batch 64).
Paper vs released code (``FedNH.released_code``; docs/paper_vs_code.md):
- ``prototype_init``: ``uniform`` (the paper's min-max-cosine initialisation) vs ``orthogonal``: the code draws
  ``torch.nn.init.orthogonal_`` rows (orthonormal when C <= d; only a 2-d toy case uses an even spread), here the
  Q factor of a seeded Gaussian draw with orthogonal_'s sign convention (:func:`orthogonal_prototypes`).
- ``learn_scale`` / ``scale``: a fixed s vs the code's learnable s (a parameter trained locally and averaged),
  initialised at 1.0 for its CNN (20.0 for its ResNet-18; its fixed-scale option uses 30).
- ``prototype_augment``: the class means see the un-augmented training images vs the code's pass over its
  training loader, which applies the training augmentation (random crop and flip).
- ``weighted``: the body is averaged with FedAvg's sample weights n_k vs the code's uniform mean over the cohort
  (server learning rate 1 times the mean client update).
- ``grad_clip``: no clipping vs the code's clipping of the local gradient norm to 10.
Deviations: the code's alternative "adv" prototype estimates and aggregation (weights from the softmax probability
of the true class and from exp(cos(mu_c, mu_{k,c}))) are off in every released configuration and are not
implemented. The code evaluates PM only for each round's cohort, right after its local training; fedlt's evaluation
covers every client with its latest local model. With ``prototype_init="orthogonal"`` and C > d the rows are
normalised (the code would keep the non-unit rows of ``orthogonal_``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_, model_tensors
from fedlt.engine.sharding import seeded_generator
from fedlt.methods._finetune import FrozenKeysReducer
from fedlt.methods.base import METHODS, Reducer, submodule
from fedlt.methods.fedala import LocalModel, add_local_model, main_tensors
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef

PROTO_KEY = "head.prototypes"
SCALE_KEY = "head.scale"
LOCAL = "fednh"  # the submodule holding each client's locally trained model (personal model keys)
_PREFIX = LOCAL + "."
INITS = ("uniform", "orthogonal")
_T_START, _T_END = 10.0, 100.0  # the temperature schedule of the uniform initialisation
_PASS = 512  # batch size of the class-mean pass (eval mode: the batches do not change the features)


# -- prototypes ---------------------------------------------------------------------------------------------------
def uniform_prototypes(num_classes: int, dim: int, generator: torch.Generator, steps: int = 1000, lr: float = 0.05,
                       momentum: float = 0.9) -> Tensor:
    """(C, d) unit rows spread uniformly on the hypersphere, approximately solving min max_{i != j} <mu_i, mu_j>.

    From a Gaussian draw of ``generator``: ``steps`` steps of projected gradient descent with momentum (float64, on
    the CPU) on the smooth maximum ``log sum_{i != j} exp(t <mu_i, mu_j>) / t`` of the pairwise cosines, with the
    temperature t annealed geometrically from 10 to 100, renormalising the rows after every step. In 2-d the
    optimum is exact: C points evenly spaced on the circle (the official code's 2-d case)."""
    if dim == 2:
        angle = torch.arange(num_classes, dtype=torch.float64) * (2 * math.pi / num_classes)
        return torch.stack([angle.cos(), angle.sin()], dim=1).float()
    w = F.normalize(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64), dim=1)
    if num_classes < 2:
        return w.float()
    others = ~torch.eye(num_classes, dtype=torch.bool)
    velocity = torch.zeros_like(w)
    for step in range(steps):
        t = _T_START * (_T_END / _T_START) ** (step / max(steps - 1, 1))
        w.requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.logsumexp(t * (w @ w.T)[others], dim=0) / t, w)
        with torch.no_grad():
            velocity = momentum * velocity + grad
            w = F.normalize(w - lr * velocity, dim=1)
    return w.detach().float()


def orthogonal_prototypes(num_classes: int, dim: int, generator: torch.Generator) -> Tensor:
    """(C, d) rows from the QR decomposition of a Gaussian draw with ``torch.nn.init.orthogonal_``'s sign
    convention (orthonormal rows when C <= d), normalised."""
    a = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    tall = a.T if num_classes < dim else a
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r))
    return F.normalize(q.T if num_classes < dim else q, dim=1).float()


def max_pairwise_cosine(prototypes: Tensor) -> float:
    """The largest cosine between two different rows."""
    w = F.normalize(prototypes.double(), dim=1)
    cos = w @ w.T
    return float(cos.masked_fill(torch.eye(w.shape[0], dtype=torch.bool, device=w.device), -2.0).max())


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(sum of the L2-normalised features of each class (C, d), class counts (C,)), by one-hot matmul (float64)."""
    unit = F.normalize(features.double(), dim=1, eps=1e-12)
    onehot = F.one_hot(labels, num_classes).to(unit.dtype)
    return onehot.T @ unit, onehot.sum(0)


def local_prototypes(sums: Tensor, counts: Tensor) -> Tensor:
    """A client's upload: ``n_{k,c} * normalise(mean_c)`` per class (0 for absent classes)."""
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    return F.normalize(means, dim=1, eps=1e-12) * counts.unsqueeze(1)


def update_prototypes(prototypes: Tensor, sums: Tensor, counts: Tensor, rho: float) -> Tensor:
    """The server's semantics-aware update: for each class with ``counts > 0``,
    ``normalise(rho * mu_c + (1 - rho) * normalise(sums_c / counts_c))``; other classes keep ``mu_c`` (and all of
    them with rho = 1, FedUH, bit for bit)."""
    if rho >= 1.0:
        return prototypes.clone()
    mu = prototypes.to(sums.dtype)
    present = counts > 0
    mean = F.normalize(sums / counts.clamp_min(1e-12).unsqueeze(1), dim=1, eps=1e-12)
    new = F.normalize(rho * mu + (1.0 - rho) * mean, dim=1, eps=1e-12)
    return torch.where(present.unsqueeze(1), new, mu).to(prototypes.dtype)


class PrototypeHead(nn.Module):
    """``s * normalise(h) @ mu^T``: the fixed unit prototypes mu (C, d) as a cosine classifier with scale s.

    Args:
        prototypes: (C, d) unit rows (a buffer).
        scale: s (its initial value when learned).
        learn_scale: s is a trainable parameter (else a buffer).
    """

    prototypes: Tensor

    def __init__(self, prototypes: Tensor, scale: float, learn_scale: bool) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone())
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, features: Tensor) -> Tensor:
        unit = F.normalize(features, dim=1, eps=1e-12)
        return self.scale * (unit @ self.prototypes.to(unit.dtype).T)


class FedNHReducer(FrozenKeysReducer):
    """FedAvg of the body (prototypes and a fixed scale held bit for bit), then the prototype update from the
    clients' exact class sums and counts (extras ``proto`` (C, d) and ``count`` (C,)).

    Args:
        rho: the smoothing of :func:`update_prototypes`.
        num_classes: C.
        dim: d.
        frozen: the state-dict keys that never change by averaging.
    """

    def __init__(self, rho: float, num_classes: int, dim: int, frozen: frozenset[str]) -> None:
        super().__init__(lambda key: key in frozen, extras={"proto": (num_classes, dim), "count": (num_classes,)})
        self.rho = rho

    def server_step(self, round: int) -> None:
        super().server_step(round)
        with torch.no_grad():
            mu = self.global_state[PROTO_KEY]
            mu.copy_(update_prototypes(mu, self.extras_sum["proto"], self.extras_sum["count"], self.rho))


@METHODS.register("fednh")
class FedNH(FedAvg):
    """Fixed unit class prototypes as a scaled cosine classifier, uniformly initialised and updated on the server
    with the clients' normalised class means (smoothing rho); PM = the client's locally trained model.

    Args:
        rho: smoothing of the prototype update (1: the prototypes never move, FedUH).
        scale: s, the logit scale (the initial value with ``learn_scale``).
        learn_scale: train s locally and average it (the code) instead of keeping it fixed.
        prototype_init: ``uniform`` (paper) or ``orthogonal`` (code) initial prototypes.
        init_steps: gradient steps of the uniform initialisation.
        init_lr: step size of the uniform initialisation.
        prototype_augment: compute the class means on augmented training images (code).
        weighted: average the body with sample weights (FedAvg) instead of uniformly over the cohort (code).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Tackling Data Heterogeneity in Federated Learning with Class Prototypes",
        venue="AAAI 2023",
        arxiv="2212.02758",
    )
    # The official code's values (github Yutong-Dai/FedNH: FedUH.py / FedNH.py / models/CNN.py, experiments/*.yaml).
    released_code: ClassVar[dict[str, Any]] = {"prototype_init": "orthogonal", "learn_scale": True, "scale": 1.0,
                                               "prototype_augment": True, "weighted": False, "grad_clip": 10.0}

    def __init__(self, rho: float = 0.9, scale: float = 30.0, learn_scale: bool = False,
                 prototype_init: str = "uniform", init_steps: int = 1000, init_lr: float = 0.05,
                 prototype_augment: bool = False, weighted: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if scale <= 0 or init_steps < 0 or init_lr <= 0:
            raise ValueError("FedNH needs scale > 0, init_steps >= 0 and init_lr > 0")
        if prototype_init not in INITS:
            raise ValueError(f"prototype_init must be one of {list(INITS)}, got {prototype_init!r}")
        self.rho = rho
        self.scale = scale
        self.learn_scale = learn_scale
        self.prototype_init = prototype_init
        self.init_steps = init_steps
        self.init_lr = init_lr
        self.prototype_augment = prototype_augment
        self.weighted = weighted
        self._pm_local = False

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: Any) -> None:
        super().setup(model, data, trainer)
        if not isinstance(getattr(model, "head", None), PrototypeHead):
            weight = next(model.parameters())
            gen = seeded_generator(self.run.seed, "fednh-prototypes")
            dim = int(self.model.num_features)
            if self.prototype_init == "uniform":
                protos = uniform_prototypes(self.num_classes, dim, gen, self.init_steps, self.init_lr)
            else:
                protos = orthogonal_prototypes(self.num_classes, dim, gen)
            head = PrototypeHead(protos, self.scale, self.learn_scale)
            model.head = head.to(device=weight.device)  # the FedModel contract: the classifier keeps the name head
        local = model_tensors(add_local_model(model, LOCAL, LocalModel).net)
        self._pairs = [(v, local[k]) for k, v in main_tensors(model, _PREFIX).items()]  # (workspace, local model)

    @property
    def local(self) -> LocalModel:
        """The workspace's holder of the current client's locally trained model."""
        return submodule(self.model, LOCAL, LocalModel)

    def is_personal(self, key: str) -> bool:
        return key.startswith(_PREFIX)

    @property
    def personalizes(self) -> bool:
        return True

    def configure_reducer(self) -> Reducer:
        frozen = frozenset({PROTO_KEY} if self.learn_scale else {PROTO_KEY, SCALE_KEY})
        return FedNHReducer(self.rho, self.num_classes, int(self.model.num_features), frozen)

    # -- client half -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def class_means(self, ctx: ClientContext) -> tuple[Tensor, Tensor]:
        """(sums of the normalised features per class, counts) of the client's training images with the workspace
        body in eval mode (augmented with ``prototype_augment``, from a generator seeded by round and client)."""
        data, idx = self.data, self.data.client_indices[ctx.client_id]
        gen = seeded_generator(self.run.seed, "fednh-means", ctx.round, ctx.client_id) if self.prototype_augment \
            else None
        was_training = self.model.training
        self.model.eval()
        dim = int(self.model.num_features)
        sums = torch.zeros(self.num_classes, dim, dtype=torch.float64, device=idx.device)
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=idx.device)
        for part in idx.split(_PASS):
            x, y = data.get_batch(data.train, part, gen, train=self.prototype_augment)[:2]
            with self.trainer.autocast():
                features = self.model.forward_features(x)
            s, n = class_sums(features.float(), y, self.num_classes)
            sums += s
            counts += n
        self.model.train(was_training)
        return sums, counts

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Uploads the trained model and the class sums n_{k,c} mu_{k,c} and counts; stores the local model."""
        sums, counts = self.class_means(ctx)
        local = self.local
        copy_tensors_([lo for _, lo in self._pairs], [w for w, _ in self._pairs])
        local.last_round.fill_(ctx.round)
        weight = float(ctx.num_samples) if self.weighted else 1.0
        extras = {"proto": local_prototypes(sums, counts).float(), "count": counts.float()}
        return ClientUpdate(client_id=ctx.client_id, weight=weight, tensors=self.shared_tensors, extras=extras)

    # -- inference -------------------------------------------------------------------------------------------
    def prepare_personal(self, client_id: int) -> None:
        self._pm_local = self.local.trained

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM logits: the client's locally trained model (the global model for a client that never trained)."""
        return self.local.net(x) if self._pm_local else self.model(x)
