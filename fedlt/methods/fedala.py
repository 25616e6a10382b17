"""FedALA: adaptive local aggregation of the global model into each client's previous local model.

Paper: J. Zhang, Y. Hua, H. Wang, T. Song, Z. Xue, R. Ma, H. Guan, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023, arXiv:2212.01197 (official code: TsingZ0/FedALA, ``system/utils/ALA.py``).

Client (Algorithm 1): client k keeps its locally trained model theta_k from its last participation and an
elementwise weight tensor W_k per aggregated tensor. At the start of local training in round t it initialises the
local model by adaptive local aggregation (ALA, Eq. 3-4) of theta_k and the received global model theta^{t-1}:

    theta_hat = theta_k + (theta^{t-1} - theta_k) ⊙ [1 (lower tensors); W_k (the top ``layer_idx`` tensors)],

i.e. the lower parameter tensors take the global values and the top ``layer_idx`` parameter tensors (p in the
paper; the classifier's weight and bias by default) mix the two elementwise (``torch.lerp``: W = 1 gives theta^{t-1}
and W = 0 gives theta_k exactly). W_k is learned on a random s% of the local data D_k^s by SGD on the local loss with
the elementwise clip to [0, 1] (Eq. 5): per mini-batch

    W_k <- clip(W_k - eta * dL(theta_hat)/dtheta_hat ⊙ (theta^{t-1} - theta_k), 0, 1),   theta_hat recomputed,

starting from W_k = 1 (all ones) at the client's first ALA and from the stored W_k afterwards. The first ALA of a
client (the start phase) iterates epochs over D_k^s until the population standard deviation of the last
``num_pre_loss`` recorded losses (the last mini-batch's loss of each epoch) falls below ``threshold``; every later
ALA is one epoch. Then theta_hat is trained as in FedAvg (E local epochs of SGD) and uploaded; the trained model
becomes theta_k. A client without a previous local model (``first_local="global"``, its first participation)
starts from theta^{t-1} without ALA. The W-learning passes see the un-augmented training images, in train mode
(BatchNorm batch statistics), and leave the BatchNorm running statistics and the global RNG's stream (dropout) of
local training as they were: with W fixed at 1 (``eta=0``) FedALA trains exactly the FedAvg models (bit for bit).
Server: FedAvg (sample-weighted mean) of the uploaded trained models.
Inference: GM = the global model. PM (``personal_model="trained"``) = the client's locally trained model theta_k
(the global model for a client that never trained).
Storage: theta_k, W_k and two counters (the round of the last local training, whether W_k was learned) live in
the submodule ``fedala`` of the workspace model, created in :meth:`FedALA.setup` (a copy of the initial model and
ones), so they are personal model keys (``fedala.*``): the engine loads them before a client trains or is evaluated
(the PM evaluation needs them) and stores them afterwards. This is one full model per client: use
``trainer.client_state: disk`` for large models.
Hyperparameters (paper symbol, paper value): ``rand_percent`` (s, 80), ``layer_idx`` (p, the top layer: its weight
and bias, 2 tensors; 0 = every parameter tensor), ``eta`` (eta, 1.0), ``threshold`` (0.01, the paper's value
according to the official README), ``num_pre_loss`` (10), plus FedAvg's lr, local epochs and batch size (the
W-learning mini-batches have the local batch size, as in the code).
Paper vs released code (``FedALA.released_code``; docs/paper_vs_code.md):
- ``threshold``: 0.01 (paper) vs 0.1 (the code's ALA default, which the client does not override).
- ``subset``: ``random``, a uniform random s% of the client's samples (the paper's random sample of s% of the
  local data) vs ``window``, a contiguous window of s% of the client's samples in storage order at a random offset
  (the code slices ``train_data[i : i + s% n]`` and iterates it unshuffled).
- ``personal_model``: ``trained`` vs ``adapted``: the code evaluates every client's model right after ALA at the
  start of the next round, i.e. the ALA-initialised model from theta_k and the latest global model. ``adapted``
  evaluates exactly that: the ALA of the round the client next trains (same data subset and W learning, which is
  not stored), so under full participation PM is the model the next round starts from.
- ``first_local``: ``global`` (a client's first participation starts from the global model; ALA from its second
  participation on, the first of which is the start phase) vs ``initial``: the code gives every client the initial
  model theta^0 as its local model and only skips ALA while the two are equal (round 1), so a client first sampled
  in round t > 1 runs its start phase on theta^0 and theta^{t-1}.
- ``local_buffers``: the code combines and aggregates ``parameters()`` only, so BatchNorm running statistics stay
  those of the client's local model (``True``); fedlt's default takes them from the global model with the lower
  layers. The server averages the uploaded buffers either way (the code's global model keeps the first uploaded
  client's, which only its GM would see).
Deviations: the code's server initialises every client (all K, sampled or not) with ALA every round, so under
partial participation unsampled clients also learn W and move towards the global model; here only the round's
cohort runs ALA (the engine has no per-round pass over unsampled clients with synced state). A start phase stops
after ``max_start_epochs`` epochs (1000; ``None``: no limit, as paper and code) even if the losses have not settled
(the official README warns that a small threshold can keep it from stopping). The data subset and the W-learning
passes' dropout draws come from generators seeded by (experiment seed, client, round of the client's last
training), never from the global RNG. A client whose s% subset is empty (fewer than 100/s samples) keeps W_k.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_, model_tensors
from fedlt.engine.sharding import derive_seed, seed_global_rng, seeded_generator
from fedlt.methods._finetune import client_counts, trainable_only
from fedlt.methods.base import METHODS, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef

STATE = "fedala"  # the submodule holding each client's theta_k, W_k and counters (personal model keys)
_PREFIX = STATE + "."
SUBSETS = ("random", "window")
FIRST_LOCAL = ("global", "initial")
PERSONAL_MODELS = ("trained", "adapted")
_TAG = "fedala"


# -- the ALA rule, as pure functions (tests check them by hand) ----------------------------------------------------
def ala_combine(local: Sequence[Tensor], global_: Sequence[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """Eq. 4 on the parameter tensors of a network (in ``parameters()`` order): the lower tensors take the global
    values, the last ``len(weights)`` tensors are ``local + (global - local) ⊙ W`` (``torch.lerp``, exact at W = 0
    and W = 1)."""
    lower = len(local) - len(weights)
    if lower < 0 or len(local) != len(global_):
        raise ValueError("ala_combine needs as many local as global tensors and at most that many weights")
    top = [torch.lerp(lo, gl, w) for lo, gl, w in zip(local[lower:], global_[lower:], weights)]
    return [g.clone() for g in global_[:lower]] + top


def ala_weight_step(weights: Sequence[Tensor], grads: Sequence[Tensor | None], diffs: Sequence[Tensor],
                    eta: float) -> None:
    """Eq. 5 in place: ``W <- clip(W - eta * grad ⊙ (global - local), 0, 1)`` (a missing gradient counts as 0)."""
    with torch.no_grad():
        for w, g, d in zip(weights, grads, diffs):
            if g is not None:
                w.copy_((w - eta * (g.to(w.dtype) * d)).clamp_(0.0, 1.0))


def ala_subset(indices: Tensor, percent: float, mode: str, generator: torch.Generator) -> Tensor:
    """The s% of a client's sample indices that W is learned on: ``int(s / 100 * n)`` of them, a uniform random
    subset in random order (``random``) or a contiguous window in storage order at a random offset (``window``,
    the official code)."""
    n = int(indices.numel())
    m = int(percent / 100 * n)
    if mode == "random":
        pick = torch.randperm(n, generator=generator)[:m]
        return indices[pick.to(indices.device)]
    if mode == "window":
        start = int(torch.randint(0, n - m + 1, (1,), generator=generator))
        return indices[start : start + m]
    raise ValueError(f"subset must be one of {list(SUBSETS)}, got {mode!r}")


def converged(losses: Sequence[float], num_pre_loss: int, threshold: float) -> bool:
    """The start phase's stopping rule: more than ``num_pre_loss`` losses recorded and the population standard
    deviation of the last ``num_pre_loss`` of them below ``threshold``."""
    return len(losses) > num_pre_loss and statistics.pstdev(losses[-num_pre_loss:]) < threshold


def _chunks(indices: Tensor, batch_size: int) -> list[Tensor]:
    """Mini-batches in order; a trailing single sample joins the previous batch (BatchNorm cannot normalise it)."""
    chunks = list(indices.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@contextmanager
def _isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (dropout) seeded by ``seed`` inside the block and restored afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_global_rng(seed, device)
        yield


class LocalModel(nn.Module):
    """A client's locally trained network theta_k (a frozen copy of the workspace network, loaded per client by the
    engine) and the round of its last local training (0: never trained).

    Args:
        net: a copy of the workspace network (its initial weights are the default theta_k).
    """

    last_round: Tensor

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("last_round", torch.zeros((), dtype=torch.long))

    @property
    def trained(self) -> bool:
        return int(self.last_round) > 0


class ALAState(LocalModel):
    """FedALA's per-client state: theta_k, one W tensor per aggregated top tensor (``w0``, ``w1``, ...; ones by
    default) and whether W was learned already (the start phase is over)."""

    learned: Tensor

    def __init__(self, net: nn.Module, top: Sequence[Tensor]) -> None:
        super().__init__(net)
        self.num_weights = len(top)
        for i, p in enumerate(top):
            self.register_buffer(f"w{i}", torch.ones_like(p.detach()))
        self.register_buffer("learned", torch.zeros((), dtype=torch.long))

    def weights(self) -> list[Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.num_weights)]


def add_local_model(model: nn.Module, name: str, make: Any) -> Any:
    """Registers ``make(copy of model)`` as ``model.<name>`` once per rank (before the engine splits the keys) and
    returns it. The copy is taken before the submodule exists, so it holds the plain network."""
    if name not in model._modules:
        model.add_module(name, make(copy.deepcopy(model)))
    return model._modules[name]


def main_tensors(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The workspace network's own parameters and buffers by key (without the submodule under ``prefix``)."""
    return {k: v for k, v in model_tensors(model).items() if not k.startswith(prefix)}


@METHODS.register("fedala")
class FedALA(FedAvg):
    """FedAvg whose clients initialise local training by adaptive local aggregation (ALA) of their previous local
    model and the global model, with elementwise weights learned on local data.

    Args:
        rand_percent: s, the percentage of the local data W is learned on (0 < s <= 100).
        layer_idx: p, how many of the last parameter tensors are aggregated adaptively (0: all of them).
        eta: the learning rate of W (0: W stays 1 and FedALA trains the FedAvg models).
        threshold: the start phase stops when the standard deviation of the last ``num_pre_loss`` losses is below
            it (paper 0.01; the code 0.1).
        num_pre_loss: how many recorded losses the stopping rule looks at.
        max_start_epochs: a limit on the start phase's epochs (``None``: none, as paper and code).
        subset: ``random`` (paper) or ``window`` (code) s% of the local data.
        personal_model: PM is the ``trained`` local model (default) or the ``adapted`` ALA initialisation from the
            latest global model (the code's evaluation).
        first_local: a client's first participation starts from the ``global`` model (default) or runs ALA on the
            ``initial`` model theta^0 and the global model (code; from round 2).
        local_buffers: BatchNorm running statistics come from the local model (code) instead of the global one.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="FedALA: Adaptive Local Aggregation for Personalized Federated Learning",
        venue="AAAI 2023",
        arxiv="2212.01197",
    )
    # The official code's values (github TsingZ0/FedALA: system/utils/ALA.py, clientALA.py, serverALA.py).
    released_code: ClassVar[dict[str, Any]] = {"threshold": 0.1, "subset": "window", "personal_model": "adapted",
                                               "first_local": "initial", "local_buffers": True}

    def __init__(self, rand_percent: float = 80.0, layer_idx: int = 2, eta: float = 1.0, threshold: float = 0.01,
                 num_pre_loss: int = 10, max_start_epochs: int | None = 1000, subset: str = "random",
                 personal_model: str = "trained", first_local: str = "global", local_buffers: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value, valid in (("subset", subset, SUBSETS), ("personal_model", personal_model, PERSONAL_MODELS),
                                   ("first_local", first_local, FIRST_LOCAL)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
        if not 0 < rand_percent <= 100 or layer_idx < 0 or eta < 0 or threshold < 0 or num_pre_loss < 1:
            raise ValueError("FedALA needs 0 < rand_percent <= 100, layer_idx >= 0, eta >= 0, threshold >= 0 and "
                             "num_pre_loss >= 1")
        if max_start_epochs is not None and max_start_epochs < 1:
            raise ValueError(f"max_start_epochs must be >= 1 or None, got {max_start_epochs}")
        if max_start_epochs is None and threshold == 0:
            raise ValueError("threshold 0 never stops the start phase: set threshold > 0 or max_start_epochs")
        self.rand_percent = float(rand_percent)
        self.layer_idx = layer_idx
        self.eta = eta
        self.threshold = threshold
        self.num_pre_loss = num_pre_loss
        self.max_start_epochs = max_start_epochs
        self.subset = subset
        self.personal_model = personal_model
        self.first_local = first_local
        self.local_buffers = local_buffers
        self._pm_local = False

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: Any) -> None:
        super().setup(model, data, trainer)
        params = [(k, p) for k, p in model.named_parameters() if not k.startswith(_PREFIX)]
        top = params[-self.layer_idx:] if self.layer_idx else params
        if self.layer_idx > len(params):
            raise ValueError(f"layer_idx={self.layer_idx}, but the model has {len(params)} parameter tensors")
        state = add_local_model(model, STATE, lambda net: ALAState(net, [p for _, p in top]))
        self._top = [p for _, p in top]  # the workspace's aggregated top tensors (live)
        self._local_top = [state.net.get_parameter(k) for k, _ in top]  # theta_k's (live, loaded per client)
        main = main_tensors(model, _PREFIX)
        local = model_tensors(state.net)
        self._pairs = [(local[k], v) for k, v in main.items()]  # (theta_k tensor, workspace tensor)
        names = {k for k, _ in params}
        self._buffer_pairs = [(local[k], v) for k, v in main.items() if k not in names]

    @property
    def state(self) -> ALAState:
        """The workspace's per-client state (the engine loaded the current client's)."""
        return submodule(self.model, STATE, ALAState)

    def is_personal(self, key: str) -> bool:
        return key.startswith(_PREFIX)

    @property
    def personalizes(self) -> bool:
        return True

    # -- client half -----------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        """ALA: the workspace (holding theta^{t-1}) becomes theta_hat; W_k is learned and stored."""
        state = self.state
        if not state.trained and (self.first_local == "global" or ctx.round <= 1):
            return  # theta_hat = theta^{t-1}, already in the workspace
        self.local_aggregation(ctx.client_id, state.weights(), start=not int(state.learned),
                               counts=ctx.class_counts, round=ctx.round)
        state.learned.fill_(1)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """theta_k <- the trained workspace model; uploads it (FedAvg)."""
        copy_tensors_([lo for lo, _ in self._pairs], [w for _, w in self._pairs])
        self.state.last_round.fill_(ctx.round)
        return super().on_client_end(ctx)

    def local_aggregation(self, client_id: int, weights: list[Tensor], start: bool, counts: Tensor,
                          round: int) -> None:
        """Sets the workspace to theta_hat = ALA(theta_k, workspace global) while learning ``weights`` in place
        (the start phase until convergence, else one epoch). The subset and the dropout stream are seeded by the
        round of the client's last local training, so the PM of ``personal_model="adapted"`` repeats exactly the
        ALA of the client's next round."""
        key = int(self.state.last_round)
        if self.local_buffers:
            copy_tensors_([w for _, w in self._buffer_pairs], [lo for lo, _ in self._buffer_pairs])
        glob = [p.detach().clone() for p in self._top]
        local = [p.detach() for p in self._local_top]
        diffs = [g - lo for g, lo in zip(glob, local)]
        self._set_top(local, glob, weights)
        gen = seeded_generator(self.run.seed, _TAG, client_id, key)
        indices = ala_subset(self.data.client_indices[client_id], self.rand_percent, self.subset, gen)
        if indices.numel() == 0:
            return
        buffers = [w.detach().clone() for _, w in self._buffer_pairs]  # W learning leaves BatchNorm statistics
        was_training = self.model.training
        device = indices.device
        try:
            with _isolated_rng(derive_seed(self.run.seed, 0xA1A, client_id, key), device), \
                    trainable_only(self.model, self._top) as params:
                self.model.train()
                self._learn(_chunks(indices, self.batch_size), params, weights, (local, glob, diffs), start,
                            counts, round)
        finally:
            copy_tensors_([w for _, w in self._buffer_pairs], buffers)
            self.model.train(was_training)

    def _learn(self, chunks: list[Tensor], params: list[Tensor], weights: list[Tensor],
               tensors: tuple[list[Tensor], list[Tensor], list[Tensor]], start: bool, counts: Tensor,
               round: int) -> None:
        """Epochs of Eq. 5 over the subset's mini-batches (one epoch after the start phase)."""
        local, glob, diffs = tensors
        losses: list[float] = []
        while True:
            loss = torch.zeros(())
            for idx in chunks:
                x, y = self.data.get_batch(self.data.train, idx, None, train=False)[:2]
                with self.trainer.autocast():
                    loss = self.loss(self.model(x), y, counts, round)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                ala_weight_step(weights, grads, diffs, self.eta)
                self._set_top(local, glob, weights)
            losses.append(float(loss.detach()))
            if not start or converged(losses, self.num_pre_loss, self.threshold):
                return
            if self.max_start_epochs is not None and len(losses) >= self.max_start_epochs:
                return

    def _set_top(self, local: list[Tensor], glob: list[Tensor], weights: list[Tensor]) -> None:
        """The workspace's top tensors <- local + (global - local) ⊙ W."""
        copy_tensors_(self._top, [torch.lerp(lo, g, w) for lo, g, w in zip(local, glob, weights)])

    # -- inference -------------------------------------------------------------------------------------------
    def prepare_personal(self, client_id: int) -> None:
        """``trained``: PM is theta_k. ``adapted``: the workspace becomes the ALA of the client's next round (W is
        learned on a copy and discarded; the workspace is reloaded afterwards)."""
        state = self.state
        self._pm_local = self.personal_model == "trained" and state.trained
        if self.personal_model == "trained" or (not state.trained and self.first_local == "global"):
            return
        weights = [w.detach().clone() for w in state.weights()]
        self.local_aggregation(client_id, weights, start=not int(state.learned), counts=client_counts(self, client_id),
                               round=int(state.last_round) + 1)

    def predict_personal(self, x: Tensor, client_id: int) -> Tensor:
        """PM logits: theta_k's (``trained``) or the workspace's (``adapted``, or a client that never trained)."""
        if self._pm_local:
            return self.state.net(x)
        return self.model(x)
