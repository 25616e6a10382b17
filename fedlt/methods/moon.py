"""MOON (model-contrastive federated learning).

Paper: Q. Li, B. He, D. Song, "Model-Contrastive Federated Learning", CVPR 2021, arXiv:2103.16257 (official code:
QinbinLi/MOON).

Network (Sec. 3.3): a base encoder, a projection head and an output layer. fedlt's backbone features
h = ``forward_features(x)`` (d = ``num_features``) are the base encoder's output; :meth:`MOON.setup` replaces the
model's ``head`` by :class:`ProjectedHead`: the projection head, a 2-layer MLP d -> d -> ReLU -> ``proj_dim``, then
the output layer, a linear classifier ``proj_dim`` -> C on the projection. R_w(x) = z, the projection (the
network before the output layer), and F_w(x) = the logits. Both live under ``head.`` (``head.proj.*``,
``head.fc.*``), are trained and aggregated like the rest of the model, and the projection is initialised from a
generator seeded by the experiment seed (the same on every rank). ``proj_dim=None`` keeps the backbone's linear
head and takes z = h (the code's ``use_project_head=0``).
Client (Algorithm 1): local SGD from the round's global model w^t on
l = l_sup(F_w(x), y) + mu * l_con, with, per sample,
l_con = -log( exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau) + exp(sim(z, z_prev) / tau)) ),
z = R_{w_i}(x) of the model being trained, z_glob = R_{w^t}(x) of the round's global model (the positive pair) and
z_prev = R_{w_i^{t-1}}(x) of the client's own local model at the end of its previous participation (the negative
pair), sim the cosine similarity; l_con is averaged over the mini-batch (:func:`model_contrastive_loss`). The
global and previous models are frozen (no gradient) and run in eval mode (BatchNorm on its running statistics,
no dropout), as in the code. l_sup is the method's ``loss`` (cross-entropy by default, as in the paper).
Server: as FedAvg (sample-weighted mean of every tensor, the projection head included).
State: the client's previous local model w_i^{t-1} (every aggregated tensor, parameters and BatchNorm buffers) is
kept per client in the ClientStateStore (``client_state_template``, keys ``moon.prev.<key>``), written at the end
of each of its local fits; a client never seen has none. That is one full model per client: use
``trainer.client_state: disk`` for large models. Two frozen copies of the network (global and previous model) are
made once per rank in :meth:`MOON.setup` and reloaded for every client; they are never part of the model's state.
One previous model is kept (the paper's Eq. 3; the code's ``model_buffer_size`` also defaults to 1: its larger
FIFO pools of older models are not implemented). PM = GM (the previous model only steers training).
Hyperparameters (paper symbol): ``mu`` (mu, weight of l_con; grid {0.001, 0.01, 0.1, 1, 5, 10}, best 5 on
CIFAR-10 and 1 on CIFAR-100 and Tiny-ImageNet; default 1, also the code's default), ``tau`` (tau, temperature;
0.5 in every experiment, like SimCLR; the authors' README suggests {0.1, 0.5, 1}), ``proj_dim`` (output dimension
of the projection head; 256 in the paper; README grid {64, 128, 256}), plus FedAvg's. The paper's local training:
SGD lr 0.01, momentum 0.9, weight decay 1e-5, batch 64, E = 10 (the code hard-codes the same optimizer).
Reconstructed choice: the paper does not say what a client contrasts against when it has no previous local model
(its first participation; in round 1 that is every client). By default (``missing_prev="skip"``) l_con is left
out (0, logged as such) until the client has one; this is also what the code does in round 1, where its pool of
previous models is still empty, so with full participation (the paper's main setting) the two agree in every round.
With ``mu = 0`` and ``proj_dim=None`` MOON is exactly FedAvg (tested); with the projection head, ``mu = 0`` is the
paper's like-for-like FedAvg baseline (its baselines use the same network as MOON, projection head included).

Paper vs released code (``MOON.released_code``; docs/paper_vs_code.md):
- ``missing_prev="random_init"``: with partial participation the code's previous model of a client never sampled
  before is that client's own network as initialised at start-up, independently of the global model and of the
  other clients (the code builds one network per client). fedlt re-draws every layer's default initialisation
  (``reset_parameters``, then the backbone's own ``_init_weights`` where it has one) from the global RNG seeded by
  (experiment seed, client), on the CPU, starting from a copy of the initial model; the draw is fixed per client,
  as the code's network is. In round 1 no client has a negative in the code (its pool is empty), so l_con is left
  out there as with ``skip``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_, model_tensors
from fedlt.engine.sharding import derive_seed
from fedlt.methods._lt_common import frozen_copy
from fedlt.methods.base import METHODS, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer
    from fedlt.models.base import FedModel

PREV = "moon.prev."  # client-state keys of the previous local model
MISSING_PREV = ("skip", "random_init")
_PROJ_TAG, _RANDOM_INIT_TAG = 0x300D0, 0x300D1


def model_contrastive_loss(z: Tensor, z_glob: Tensor, z_prev: Sequence[Tensor], tau: float) -> Tensor:
    """MOON's l_con, averaged over the batch: cross-entropy of the logits [sim(z, z_glob), sim(z, z_prev_1), ...] /
    tau with the positive (the global model's representation) as the target, sim the cosine similarity.

    Args:
        z: (B, p) representations of the model being trained.
        z_glob: (B, p) representations of the global model (the positive pair).
        z_prev: the representations of the negative models, each (B, p) (MOON: one, the previous local model).
        tau: temperature tau > 0.

    Returns:
        The scalar mean loss (float32).
    """
    z = z.float()
    sims = [F.cosine_similarity(z, other.float(), dim=-1) for other in (z_glob, *z_prev)]
    logits = torch.stack(sims, dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


class ProjectedHead(nn.Module):
    """MOON's projection head and output layer in place of the backbone's linear classifier.

    ``proj`` maps the features h (d) through Linear(d, d), ReLU, Linear(d, p) to the representation z; ``fc`` maps
    z to the C logits.

    Args:
        dim: d, the backbone's feature dimension.
        proj_dim: p, the output dimension of the projection head.
        num_classes: C.
    """

    def __init__(self, dim: int, proj_dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.fc = nn.Linear(proj_dim, num_classes)

    def project(self, h: Tensor) -> Tensor:
        """The representation z = R_w(x) of features h."""
        out: Tensor = self.proj(h)
        return out

    def forward(self, h: Tensor) -> Tensor:
        """Logits (B, C) of features h."""
        out: Tensor = self.fc(self.project(h))
        return out


def representation_and_logits(model: FedModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """(z, logits) of a FedModel in one forward pass: z is the projection when the head is a :class:`ProjectedHead`,
    the backbone features otherwise."""
    h = model.forward_features(x)
    head = model.head
    if isinstance(head, ProjectedHead):
        z = head.project(h)
        return z, head.fc(z)
    return h, head(h)


def _reinitialise(net: nn.Module) -> None:
    """Every layer's default initialisation (``reset_parameters``), then the backbone's own ``_init_weights``."""
    for module in net.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not net and callable(reset):
            reset()
    init = getattr(net, "_init_weights", None)
    if callable(init):
        init()


@METHODS.register("moon")
class MOON(FedAvg):
    """FedAvg whose clients add mu * the model-contrastive loss (positive: the global model's representation,
    negative: the client's previous local model's) to the supervised loss (Li et al., 2021).

    Args:
        mu: weight mu >= 0 of the model-contrastive loss (0: the supervised loss alone).
        tau: temperature tau > 0.
        proj_dim: output dimension of the projection head added on the backbone features (``None``: no projection
            head; the representation is the backbone features and the head stays the backbone's).
        missing_prev: what a client without a previous local model contrasts against: ``"skip"`` (no
            model-contrastive term until it has one) or ``"random_init"`` (the released code: its own independently
            initialised network, from round 2 on).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``loss`` is l_sup).
    """

    paper = PaperRef(
        title="Model-Contrastive Federated Learning",
        venue="CVPR 2021",
        arxiv="2103.16257",
    )
    # The official code's values (github QinbinLi/MOON, main.py: one network per party, built at start-up).
    released_code: ClassVar[dict[str, Any]] = {"missing_prev": "random_init"}

    def __init__(self, mu: float = 1.0, tau: float = 0.5, proj_dim: int | None = 256, missing_prev: str = "skip",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1 or None, got {proj_dim}")
        if missing_prev not in MISSING_PREV:
            raise ValueError(f"missing_prev must be one of {list(MISSING_PREV)}, got {missing_prev!r}")
        self.mu = mu
        self.tau = tau
        self.proj_dim = proj_dim
        self.missing_prev = missing_prev
        self._has_prev = False
        self._global_net: FedModel | None = None
        self._prev_net: FedModel | None = None
        self._init_net: FedModel | None = None  # the initial model on the CPU (random_init only)

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        """Adds the projection head (seeded, before the engine splits the keys) and the two frozen copies."""
        super().setup(model, data, trainer)
        if self.proj_dim is not None and not isinstance(getattr(model, "head", None), ProjectedHead):
            weight = next(p for p in submodule(model, "head", nn.Module).parameters())
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(  # CPU only: fork_rng restores it
                    derive_seed(self.run.seed, _PROJ_TAG))
                head = ProjectedHead(self.model.num_features, self.proj_dim, self.num_classes)
            model.head = head.to(device=weight.device, dtype=weight.dtype)  # keeps the name ``head`` (FedModel)
        self._global_net = frozen_copy(self.model).eval()
        self._prev_net = frozen_copy(self.model).eval()
        if self.missing_prev == "random_init":
            self._init_net = frozen_copy(self.model).eval().cpu()
            self._scratch_net = frozen_copy(self._init_net)  # re-initialised in place for each client

    def client_state_template(self) -> dict[str, Tensor]:
        return {PREV + k: torch.zeros_like(v.detach()) for k, v in self.shared_tensors.items()}

    @staticmethod
    def _load(net: nn.Module, state: dict[str, Tensor], keys: Sequence[str]) -> None:
        tensors = model_tensors(net)
        copy_tensors_([tensors[k] for k in keys], [state[k] for k in keys])

    # -- client half -----------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        assert self._global_net is not None and self._prev_net is not None, "MOON.setup() was not called"
        keys = list(self.shared_tensors)
        self._load(self._global_net, ctx.message.state, keys)
        self._has_prev = all(PREV + k in ctx.state for k in keys)
        if self._has_prev:
            self._load(self._prev_net, {k: ctx.state[PREV + k] for k in keys}, keys)
        elif self.missing_prev == "random_init" and ctx.round > 1:
            self._load(self._prev_net, self.random_init(ctx.client_id), keys)
            self._has_prev = True

    def random_init(self, client_id: int) -> dict[str, Tensor]:
        """The client's own independently initialised network (``missing_prev="random_init"``): the aggregated
        tensors of a copy of the initial model with every layer re-initialised from the global RNG seeded by
        (experiment seed, client), on the CPU (the same draw on every rank, in every round)."""
        assert self._init_net is not None, "random_init needs missing_prev='random_init'"
        net = self._scratch_net
        init, scratch = model_tensors(self._init_net), model_tensors(net)
        copy_tensors_([scratch[k] for k in init], list(init.values()))  # a fresh copy of the initial model
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(  # CPU only: fork_rng restores it
                derive_seed(self.run.seed, _RANDOM_INIT_TAG, client_id))
            _reinitialise(net)
        return {k: v.detach().clone() for k, v in model_tensors(net).items()}

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        """l_sup(F_w(x), y) + mu * l_con(z, z_glob, z_prev) (l_con = 0 without a previous model)."""
        assert self._global_net is not None and self._prev_net is not None, "MOON.setup() was not called"
        x, y = batch[0], batch[1]
        z, logits = representation_and_logits(self.model, x)
        sup = self.loss(logits, y, ctx.class_counts, ctx.round)
        if self._has_prev:
            with torch.no_grad():
                z_glob, _ = representation_and_logits(self._global_net, x)
                z_prev, _ = representation_and_logits(self._prev_net, x)
            con = model_contrastive_loss(z, z_glob, [z_prev], self.tau)
        else:
            con = torch.zeros((), device=sup.device, dtype=sup.dtype)
        loss = sup + self.mu * con
        return StepOutput(loss=loss, parts={"loss": loss.detach(), "sup": sup.detach(), "con": con.detach()})

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Keeps the trained local model as the client's previous model, then uploads it as FedAvg."""
        ctx.state.update({PREV + k: v.detach() for k, v in self.shared_tensors.items()})
        return super().on_client_end(ctx)
