"""FedDG-GA (Generalization Adjustment).

Paper: R. Zhang, Q. Xu, J. Yao, Y. Zhang, Q. Tian, Y. Wang, "Federated Domain Generalization with Generalization
Adjustment", CVPR 2023 (pp. 3954-3963). Official code: github.com/MediaBrain-SJTU/FedDG-GA (``utils/weight_adjust.py``
and ``algorithms/fedavg/train_pacs_GA.py``). No arXiv id is recorded: the official README cites the CVPR /
OpenReview version.

Client: local training exactly as FedAvg. Besides, on its gap data (its validation split, see below) a client
measures the mean cross-entropy and the accuracy of (a) its local model theta_k right after local training
("before avg", L_k(theta_k)), kept in its persistent state, and (b) the global model it receives at the start of
its next round ("after avg", L_k(theta)); it uploads the generalization gap G_k = L_k(theta) - L_k(theta_k).
Server: aggregation weights a_k (a_k = 1/M initially, M the number of clients) replace FedAvg's n_k / n. After
round r's aggregation the weights are refined with the round's gaps:
    a_k <- a_k + s * d_r * G_k / max_j |G_j|,    then a <- clip(a, 0, 1) / sum(clip(a, 0, 1)),
with s = +1 for ``fair_metric="loss"`` (loss gaps) and s = -1 for ``"acc"`` (accuracy gaps, after - before), and
the refined weights aggregate round r + 1: theta = sum_{k in S} a_k theta_k / sum_{k in S} a_k (all parameters
and buffers, BatchNorm statistics included; integer buffers rounded).
Step size (official code, 0-based round i = r - 1, R = ``decay_rounds``): d_r = (step_size - (i - 1) step_size / R)
/ M, i.e. a linear decay to ~0 over R rounds starting at step_size (1 + 1/R) / M (the ``(i-1)`` of the official
loop ``range(comm + 1)``); the official ``1/3`` is 1/M for its 3 source sites. Negative steps (r > R + 1) are
clamped to 0. By default R is the run's number of rounds (``trainer.rounds``, the official ``--comm``; the official
loop runs comm + 1 rounds, a run here runs R).

Hyperparameters (paper / code symbol, default): ``step_size`` (d, 0.2, the official default), ``fair_metric``
(``--fair``, "loss"; the official PACS script defaults to "acc"), ``decay_rounds`` (R, ``None``: the run's
``trainer.rounds``; 0: constant step, no decay), ``init_weights`` ("uniform": 1/M as in the code; "samples": n_k / n),
``gap_data`` ("val"), ``max_staleness`` (0), ``eval_batch_size`` (256), ``max_server_floats`` (2e9), plus FedAvg's
local arguments.

How it runs inside fedlt (streaming reducer; clients never see each other's models) and deviations:
- Timing. The gap of round r needs round r's aggregate theta_r, which a client only receives at the start of round
  r + 1. So at the start of round r + 1 each participating client evaluates the received theta_r, takes
  L_k(theta_{k,r}) from its persistent state (stored at the end of round r) and uploads G_{k,r}; at the end of
  round r + 1 the server first refines the weights with these gaps (step d_r), then aggregates round r + 1's models
  with the refined weights. Under full participation this is exactly the official order (weights refined after
  round r are used for round r + 1) except that the refinement after the last round, which the official code
  computes but never uses, is not computed. The first round aggregates with the initial weights.
- Partial participation. Only clients that trained in round r and are sampled again in round r + 1 can report
  G_{k,r} (``max_staleness=0``, the default: the exact official gap). ``max_staleness=s`` also accepts a "before
  avg" value measured up to s rounds earlier (``None``: any age): the gap is then L_k(theta_r) - L_k(theta_{k,r'})
  with r' < r, a stale proxy. The max-normalisation runs over the reporting clients; clients without a gap keep
  their weight before the clip-and-renormalise, which still runs over all M clients so the weights sum to 1.
  The aggregate is over the round's cohort with the cohort's weights renormalised to sum 1; if they are all 0
  (clipped), the cohort's models are averaged uniformly. No gap reported in a round: the weights are unchanged.
- Degenerate gaps (max |G| = 0 or a clip leaving every weight at 0, where the official code divides by zero):
  the weights are left unchanged.
- Gap data. ``gap_data="val"`` uses ``data.val`` with ``data.client_val_indices[k]`` (the client's held-out
  validation split of its source domain(s)) when the dataset provides them; otherwise (single-domain data) and
  with ``gap_data="train"`` it uses the client's own training samples, in eval mode and without augmentation
  (a warning is issued when "val" falls back). ``gap_source`` records which one is used. A client without gap data
  never reports a gap.
- Evaluation is in eval mode under ``torch.no_grad()`` with plain cross-entropy (as the code's metric), whatever
  local ``loss`` is configured; it costs two passes over the client's gap data per participation.
- Memory. Because the weights of round r + 1 depend on all gaps of the round (max-normalisation, clipping), the
  client models cannot be folded into a running weighted sum as they arrive: every client's uploaded tensors go
  to its own row of an (M, P) slot matrix (P shared floats) summed by the usual single all-reduce, and the
  aggregate is formed in ``server_step``. That is M x P floats on the server, i.e. on every rank (plus their
  zeroing and one all-reduce of them per round, whatever the cohort size), like the official code, which holds
  one model per site; setup raises a ValueError above ``max_server_floats``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.engine.params import FlatLayout, copy_tensors_
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef

FAIR_METRICS = ("loss", "acc")
INIT_WEIGHTS = ("uniform", "samples")
GAP_DATA = ("val", "train")

_LOCAL = "feddgga.local"  # client state: (loss, acc) of the local model on the gap data after local training
_ROUND = "feddgga.round"  # client state: the round that measurement belongs to (0: none)
_SLOTS, _GAP, _HAS_GAP, _UPLOADED = "slots", "gap", "has_gap", "uploaded"  # reducer extras


def ga_step(gap_round: int, step_size: float, num_clients: int, decay_rounds: int | None = None) -> float:
    """d_r, the refinement step for the gaps of (1-based) round ``gap_round``.

    Official schedule with the 0-based round i = gap_round - 1: (step_size - (i - 1) step_size / R) / M, clamped
    at 0; ``decay_rounds=None`` gives the constant step_size / M.
    """
    if decay_rounds is None:
        d = step_size
    else:
        d = step_size - (gap_round - 2) * step_size / decay_rounds
    return max(d, 0.0) / num_clients


def refine_weights(weights: Tensor, gaps: Tensor, step: float, fair_metric: str = "loss",
                   mask: Tensor | None = None) -> Tensor:
    """One generalization-adjustment update of the aggregation weights (a new tensor).

    a_k <- a_k + s * step * G_k / max_{j in mask} |G_j| for k in ``mask`` (s = +1 for loss gaps, -1 for accuracy
    gaps), then clipped to [0, 1] and renormalised to sum 1. Degenerate cases (no reporting client, all gaps 0,
    everything clipped to 0) return the weights unchanged.

    Args:
        weights: (M,) current weights a (sum 1).
        gaps: (M,) gaps G = metric(global) - metric(local); entries outside ``mask`` are ignored.
        step: d_r (already divided by M).
        fair_metric: ``"loss"`` or ``"acc"``.
        mask: (M,) bool, the clients that reported a gap (default: all).
    """
    if fair_metric not in FAIR_METRICS:
        raise ValueError(f"fair_metric must be one of {list(FAIR_METRICS)}, got {fair_metric!r}")
    weights = weights.double()
    gaps = gaps.to(weights.device, torch.float64)
    mask = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.to(weights.device, torch.bool)
    if not bool(mask.any()):
        return weights.clone()
    scale = gaps[mask].abs().max()
    if not bool(scale > 0) or not bool(torch.isfinite(scale)):
        return weights.clone()
    sign = 1.0 if fair_metric == "loss" else -1.0
    new = torch.where(mask, weights + sign * step * gaps / scale, weights).clamp(0.0, 1.0)
    total = new.sum()
    if not bool(total > 0):
        return weights.clone()
    return new / total


class FedDGGAReducer(Reducer):
    """Per-client model slots, generalization-adjusted weights and their weighted mean over the cohort.

    Args:
        num_clients: M.
        num_params: P, the number of shared floats (all shared tensors flattened).
        init_weights: (M,) initial weights a (sum 1).
        step_size: d of the official code (before the 1/M factor and the decay).
        fair_metric: ``"loss"`` or ``"acc"``.
        decay_rounds: R of the linear step decay (``None``: constant step).

    Its accumulation writes each client's tensors into the client's own slot (one writer per element, so the
    float all-reduce is exact) and the server step sums the slots in client-id order: it is world-size invariant
    without the fixed-point sums (``exact = False``).
    """

    exact = False

    def __init__(self, num_clients: int, num_params: int, init_weights: Tensor, step_size: float,
                 fair_metric: str = "loss", decay_rounds: int | None = None) -> None:
        m = num_clients
        super().__init__(extras={_SLOTS: (m, num_params), _GAP: (m,), _HAS_GAP: (m,), _UPLOADED: (m,)})
        self.num_clients, self.num_params = m, num_params
        self.step_size, self.fair_metric, self.decay_rounds = step_size, fair_metric, decay_rounds
        self.weights = init_weights.detach().to("cpu", torch.float64).clone()
        self.last_gaps = torch.zeros(m, dtype=torch.float64)  # the gaps used by the last refinement
        self.last_reported = torch.zeros(m, dtype=torch.bool)  # which clients reported them

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        self.keys = self.float_keys + self.other_keys
        self.slot_layout = FlatLayout.of({k: global_state[k].shape for k in self.keys})
        if self.slot_layout.numel != self.num_params:
            raise ValueError(f"FedDGGAReducer: {self.num_params} slot floats declared, the model has "
                             f"{self.slot_layout.numel}")
        # The base layout starts with the shared tensors in the same order: that (otherwise unused) region of the
        # buffer receives the aggregate, so no extra model-sized tensor is allocated.
        assert self.layout.names[: len(self.keys)] == tuple(self.keys)
        self.mean_flat = self.buffer[: self.num_params]

    def accumulate(self, update: ClientUpdate) -> None:
        """Copies the client's tensors into its slot row; scatters its gap (if any) into the gap vector."""
        cid = int(update.client_id)
        with torch.no_grad():
            self.slot_layout.flatten({k: update.tensors[k] for k in self.keys}, self.extras_sum[_SLOTS][cid])
            self.extras_sum[_UPLOADED][cid] = 1.0
            if _GAP in update.extras:
                self.extras_sum[_GAP][cid] = update.extras[_GAP].reshape(()).to(self.buffer.dtype)
                self.extras_sum[_HAS_GAP][cid] = 1.0
            self.weight_sum.add_(float(update.weight))

    def server_step(self, round: int) -> None:
        """Refines the weights with the gaps reported this round, then aggregates the cohort's slots."""
        reported = (self.extras_sum[_HAS_GAP] > 0.5).cpu()
        if bool(reported.any()):
            gaps = torch.where(reported, self.extras_sum[_GAP].cpu().double(), torch.zeros((), dtype=torch.float64))
            step = ga_step(round - 1, self.step_size, self.num_clients, self.decay_rounds)
            self.weights = refine_weights(self.weights, gaps, step, self.fair_metric, reported)
            self.last_gaps, self.last_reported = gaps, reported
        cohort = (self.extras_sum[_UPLOADED] > 0.5).cpu().nonzero().flatten().tolist()
        if not cohort:
            return
        coef = [float(self.weights[k]) for k in cohort]
        if sum(coef) <= 0:  # every cohort weight clipped to 0: plain mean of the cohort
            coef = [1.0] * len(cohort)
        total = sum(coef)
        slots = self.extras_sum[_SLOTS]
        with torch.no_grad():
            mean = self.mean_flat.zero_()
            for k, c in zip(cohort, coef):
                if c != 0:
                    mean.add_(slots[k], alpha=c)
            mean.div_(total)
            views = self.slot_layout.views(mean)
            copy_tensors_(self.global_float, [views[k] for k in self.float_keys])
            for k in self.other_keys:
                self.global_state[k].copy_(views[k].round().to(self.global_state[k].dtype))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ga_weights"] = self.weights.clone()
        state["ga_last_gaps"] = self.last_gaps.clone()
        state["ga_last_reported"] = self.last_reported.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.weights = state["ga_weights"].to("cpu", torch.float64).clone()
        self.last_gaps = state["ga_last_gaps"].to("cpu", torch.float64).clone()
        self.last_reported = state["ga_last_reported"].to("cpu", torch.bool).clone()


@METHODS.register("feddgga")
class FedDGGA(FedAvg):
    """FedAvg with aggregation weights adjusted every round by each client's generalization gap.

    Args:
        step_size: d, the weight step before the 1/M factor and the decay (0: FedAvg with fixed weights).
        fair_metric: ``"loss"`` (loss gaps) or ``"acc"`` (accuracy gaps, sign flipped).
        decay_rounds: R of the linear step decay; ``None``: the run's number of rounds (``trainer.rounds``, as the
            official code; constant step when the method runs outside a simulator); 0: constant step.
        init_weights: ``"uniform"`` (1/M, official) or ``"samples"`` (n_k / n, FedAvg's weights).
        gap_data: ``"val"`` (the client's validation split when the dataset has one, else its training samples) or
            ``"train"`` (always the training samples, no augmentation).
        max_staleness: how many rounds older than the previous round a client's "before avg" measurement may be
            (0: only clients that trained in the previous round report, the exact gap; ``None``: no limit).
        eval_batch_size: batch size of the gap evaluations.
        max_server_floats: refuse (ValueError at setup) more than this many floats of per-client model slots.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Federated Domain Generalization with Generalization Adjustment",
        venue="CVPR 2023",
        url="https://github.com/MediaBrain-SJTU/FedDG-GA",
    )

    def __init__(self, step_size: float = 0.2, fair_metric: str = "loss", decay_rounds: int | None = None,
                 init_weights: str = "uniform", gap_data: str = "val", max_staleness: int | None = 0,
                 eval_batch_size: int = 256, max_server_floats: float = 2e9, **kwargs) -> None:
        super().__init__(**kwargs)
        if not step_size >= 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        if fair_metric not in FAIR_METRICS:
            raise ValueError(f"fair_metric must be one of {list(FAIR_METRICS)}, got {fair_metric!r}")
        if decay_rounds is not None and decay_rounds < 0:
            raise ValueError(f"decay_rounds must be >= 0 or None, got {decay_rounds}")
        if init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {list(INIT_WEIGHTS)}, got {init_weights!r}")
        if gap_data not in GAP_DATA:
            raise ValueError(f"gap_data must be one of {list(GAP_DATA)}, got {gap_data!r}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if eval_batch_size < 1 or not max_server_floats > 0:
            raise ValueError("eval_batch_size must be >= 1 and max_server_floats > 0")
        self.step_size = float(step_size)
        self.fair_metric = fair_metric
        self.decay_rounds = decay_rounds
        self.init_weights = init_weights
        self.gap_data = gap_data
        self.max_staleness = max_staleness
        self.eval_batch_size = int(eval_batch_size)
        self.max_server_floats = float(max_server_floats)
        self._gap: Tensor | None = None

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        """Chooses the gap data: the validation split when the dataset has one (and ``gap_data="val"``)."""
        super().setup(model, data, trainer)
        val, val_idx = getattr(data, "val", None), getattr(data, "client_val_indices", None)
        if self.gap_data == "val" and val is not None and val_idx is not None and len(val) > 0:
            self.gap_source = "val"
        else:
            if self.gap_data == "val":
                warnings.warn("FedDG-GA: the dataset has no validation split (data.val / data.client_val_indices); "
                              "the generalization gaps are measured on each client's training samples",
                              stacklevel=2)
            self.gap_source = "train"

    def client_state_template(self) -> dict[str, Tensor]:
        return {_LOCAL: torch.zeros(2), _ROUND: torch.zeros(1)}

    def configure_reducer(self) -> Reducer:
        m = int(self.data.num_clients)
        p = sum(int(t.numel()) for t in self.shared_tensors.values())
        if m * p > self.max_server_floats:
            raise ValueError(
                f"FedDG-GA keeps every client's uploaded model in its own server slot until the round's gaps are "
                f"known: {m} clients x {p} shared floats = {m * p:.3g} floats exceeds max_server_floats="
                f"{self.max_server_floats:.3g}. Use fewer clients or a smaller model, or raise "
                f"method.init_args.max_server_floats if the server (and every rank) has the memory."
            )
        if self.init_weights == "uniform":
            init = torch.full((m,), 1.0 / m, dtype=torch.float64)
        else:
            sizes = torch.tensor([int(i.numel()) for i in self.data.client_indices], dtype=torch.float64)
            init = sizes / sizes.sum()
        decay = self.decay_rounds if self.decay_rounds is not None else self.run.rounds
        return FedDGGAReducer(m, p, init, self.step_size, self.fair_metric, int(decay) if decay else None)

    # -- gap evaluation --------------------------------------------------------------------------------------
    def _gap_split(self, client_id: int) -> tuple[Any, Tensor]:
        if self.gap_source == "val":
            return self.data.val, self.data.client_val_indices[client_id]
        return self.data.train, self.data.client_indices[client_id]

    @torch.no_grad()
    def gap_metrics(self, client_id: int) -> Tensor | None:
        """(mean cross-entropy, accuracy) of the workspace model on the client's gap data, in eval mode without
        augmentation (``None`` when the client has no gap data)."""
        split, idx = self._gap_split(client_id)
        n = int(idx.numel())
        if n == 0:
            return None
        idx = idx.to(split.y.device)
        was_training = self.model.training
        self.model.eval()
        loss_sum = correct = None
        for chunk in idx.split(self.eval_batch_size):
            batch = self.data.get_batch(split, chunk, None, train=False)
            x, y = batch[0], batch[1]
            with self.trainer.autocast():
                logits = self.predict_global(x)
            logits = logits.float()
            part_loss = F.cross_entropy(logits, y, reduction="sum")
            part_correct = (logits.argmax(1) == y).sum().float()
            loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
            correct = part_correct if correct is None else correct + part_correct
        self.model.train(was_training)
        assert loss_sum is not None and correct is not None  # n > 0: at least one chunk
        return torch.stack([loss_sum, correct]) / n

    # -- client half -----------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        """G_k = metric(received global) - metric(own local model after its last training), when fresh enough."""
        self._gap = None
        stored = ctx.state.get(_ROUND)
        if stored is None:
            return
        last = int(stored.reshape(-1)[0].item())
        if last < 1 or last >= ctx.round:
            return
        if self.max_staleness is not None and ctx.round - 1 - last > self.max_staleness:
            return
        after = self.gap_metrics(ctx.client_id)
        if after is None:
            return
        i = FAIR_METRICS.index(self.fair_metric)
        before = ctx.state[_LOCAL].to(after.device, after.dtype)
        self._gap = (after[i] - before[i]).reshape(1)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Stores L_k(theta_k) for the next participation; uploads the model (into its slot) and the gap."""
        local = self.gap_metrics(ctx.client_id)
        if local is None:
            ctx.state[_LOCAL] = torch.zeros(2, device=ctx.device)
            ctx.state[_ROUND] = torch.zeros(1, device=ctx.device)
        else:
            ctx.state[_LOCAL] = local.float()
            ctx.state[_ROUND] = torch.full((1,), float(ctx.round), device=local.device)
        extras = {} if self._gap is None else {_GAP: self._gap.float()}
        self._gap = None
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors,
                            extras=extras)
