"""Fed-GraB.

Paper: Z. Xiao, Z. Chen, S. Liu, H. Wang, Y. Feng, J. Hao, J. T. Zhou, J. Wu, H. H. Yang, Z. Liu, "Fed-GraB:
Federated Long-tailed Learning with Self-Adjusting Gradient Balancer", NeurIPS 2023, arXiv:2310.07587.

Server (Direct Prior Analyzer, DPA): after FedAvg aggregation, the global class prior is read off the aggregated
linear classifier W (C x d): classes seen more often grow larger weight norms, so

    P_c = ||w_c||_2^r / sum_j ||w_j||_2^r        (r = ``norm_power``, 1 by default),

and the classes with P_c < ``tail_threshold`` / C (below the uniform prior) are the tail classes. Both the prior
and the tail mask are broadcast with the global model (``broadcast_extras``); the server step is FedAvg, the DPA
is a deterministic function of the global state (identical on every rank, no server state to checkpoint).

Client (Self-adjusting Gradient Balancer, SGB): the loss is the per-class sigmoid (one-vs-all BCE) formulation of
EQL-v2, summed over the C classes and averaged over the batch. Each class c accumulates the magnitudes of the
(re-weighted) positive and negative logit gradients it received, pos_c and neg_c (EQL-v2's accumulation), and a
per-class incremental ("delta") PID controller drives the error e_c = 0 - (pos_c - neg_c) / (pos_c + neg_c) to zero
(``error="normalized"``, the default; ``error="raw"`` uses the unnormalised pos_c - neg_c):

    u_c <- u_c + Kp (e_t - e_{t-1}) + Ki e_t + Kd (e_t - 2 e_{t-1} + e_{t-2}),   u_c clamped to [-max_out, max_out],

and re-weights the gradients of logit c with w+_c = f(u_c) on positives and w-_c = f(-u_c) on negatives, where
f(x) = M / (1 + (M - 1) exp(-k x)) (M = ``weight_max`` = 10, k = ``map_slope`` = 0.5; f(0) = 1). Only the tail
controllers selected by the DPA are open; closed controllers output u = 0 (weights 1, plain BCE). At every step
the weights are computed from the accumulation of the previous steps, then this batch's weighted gradient
magnitudes |sigmoid(z) - y| w / n are added to pos/neg. Aggregation: FedAvg.

Hyperparameters (paper symbol, default): ``kp`` (K_P, 10), ``ki`` (K_I, 0.01), ``kd`` (K_D, 0.1) — the gains of
the authors' released code; ``max_out`` (100, PID output limit), ``weight_max`` (10) and ``map_slope`` (0.5) of
the mapping f; ``tail_threshold`` (1.0) and ``norm_power`` (1.0) of the DPA; ``persist_state`` (True);
``error`` (normalized); the released-code switches ``train_classifier`` (True), ``aggregation_weights``
(matched), ``tail_selection`` (all) and ``dpa`` (True), see below; plus FedAvg's.

Deviations / reconstructed choices:
- DPA: the L2-norm-of-classifier-rows prior and the "below uniform" tail rule (``tail_threshold`` / C) are our
  reconstruction of the paper's description. The released code has no DPA (``dpa=False`` below).
- Error normalisation: the raw accumulated difference pos_c - neg_c grows with every step (it is a sum over all
  past batches), so with K_P = 10 the controller saturates within a few steps and the negative-gradient weight of
  every open class falls to ~0.01, which collapsed the global model to one class on embedded digits-LT (GM 10 %).
  The default divides by pos_c + neg_c, a scale-free error in [-1, 1]; ``error="raw"`` keeps the unnormalised one
  (the released code's measured value).
- Controller state (pos/neg accumulators, PID output and last three errors) persists per client across rounds, as
  in the released code (one balancer object per client, never reset); it lives in ``ctx.state``. Set
  ``persist_state=False`` for a fresh controller every round.
- The released code re-weights the logit gradient with a backward hook on an unweighted BCE; here the loss is
  sum_ic w_ic BCE_ic / n with detached weights, which has exactly the same gradient (the logged loss value is the
  weighted one). Its output limiter is a no-op (a Python assignment to a local); we clamp u to +-``max_out``.

Paper vs released code (github ZackZikaiXiao/FedGraB: ``fed_grab.py``, ``util/losses.py`` ``PIDLOSS``,
``util/update_baseline.py`` ``update_weights_pid``, ``util/fedavg.py``). ``FedGraB.released_code`` holds the
code's values of these five arguments; the defaults follow the paper (docs/paper_vs_code.md):
- ``train_classifier``: the code's local optimizer holds only the backbone's parameters, so the linear classifier
  never trains (after the first round every client starts from the same, never-updated classifier).
  ``train_classifier=False`` freezes ``model.head`` (no gradient; its global value is kept bit for bit); the body
  still receives the gradient through the frozen head. With the DPA on, a frozen classifier makes the prior, and
  so the tail set, the constant one of the initial head. (Not reproduced: in the code's first round every client
  holds its own randomly initialised classifier, and the global one is their average; here they all start from
  the broadcast global head.)
- ``aggregation_weights``: the code trains every client in client-id order but takes the sample counts in the
  order of the round's randomly drawn client list (``np.random.choice`` without replacement over all clients),
  so the model of the i-th client is weighted by the sample count of another, randomly chosen client.
  ``aggregation_weights="permuted"`` weights the i-th client of the cohort (client-id order) by the sample count
  of cohort[pi(i)], pi = ``torch.randperm`` from a generator seeded by (seed, round): the same on every rank
  (:func:`permuted_cohort_weights`). The total weight is unchanged.
- ``tail_selection``: in the code's gradient hook, the tail classes are visited in index order and each is
  *skipped* -- its gradient left at weight 1 and left out of this batch's pos/neg accumulation -- with probability
  0.1^(s / (T - 1)), s = the number of tail classes skipped so far in this batch and T = the number of tail
  classes; the first tail class (class 0 when every class is tail) has probability 1 and so is never
  re-weighted. ``tail_selection="random_per_batch"`` draws this with a generator seeded by (seed, round, client)
  (:func:`released_tail_skips`), separate from the client's training generator.
- ``dpa``: the code estimates no prior: every client's balancer opens the controllers of all C classes once, at
  the start. ``dpa=False`` broadcasts an all-ones tail mask (every controller open) and no prior.
- ``error``: the code's controller error is the raw accumulated difference (``error="raw"``); the default
  ``normalized`` is fedlt's scale-free error (see "Deviations" above), not the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.sharding import sample_cohort, seeded_generator
from fedlt.methods._finetune import FrozenKeysReducer
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

_HEAD_WEIGHT = "head.weight"
_HEAD = "head."
_TAIL_TAG = "fedgrab/tail_selection"  # generator of the released code's per-batch skip draws
_PERM_TAG = "fedgrab/aggregation_weights"  # generator of the released code's permuted FedAvg weights
_ACC = "sgb_acc"  # (2, C): accumulated |positive| and |negative| logit gradients per class
_PID = "sgb_pid"  # (4, C): PID output u, errors e_t, e_{t-1}, e_{t-2}


def dpa_prior(weight: Tensor, norm_power: float = 1.0) -> Tensor:
    """The DPA global prior from a linear classifier: P_c = ||w_c||^r / sum_j ||w_j||^r.

    Args:
        weight: (C, d) classifier weight of the aggregated model.
        norm_power: exponent r on the row norms.

    Returns:
        (C,) float prior summing to 1 (uniform when every row is zero).
    """
    norms = weight.detach().float().norm(dim=1).pow(norm_power)
    total = norms.sum()
    if float(total) <= 0:
        return torch.full_like(norms, 1.0 / norms.numel())
    return norms / total


def dpa_tail_mask(prior: Tensor, tail_threshold: float = 1.0) -> Tensor:
    """Tail classes of a prior: P_c < tail_threshold / C (float mask, 1 = tail, controller open)."""
    return (prior < tail_threshold / prior.numel()).to(prior.dtype)


def pid_delta_step(pid: Tensor, current: Tensor, open_mask: Tensor, gains: tuple[float, float, float],
                   max_out: float) -> Tensor:
    """One incremental PID step per class towards the set value 0 (only where the controller is open).

    Args:
        pid: (4, C) rows (u, e_t, e_{t-1}, e_{t-2}) before the step.
        current: (C,) measured value pos_c - neg_c.
        open_mask: (C,) 1 where the controller is open; closed controllers keep their state.
        gains: (Kp, Ki, Kd).
        max_out: output limit |u| <= max_out.

    Returns:
        The (4, C) state after the step.
    """
    kp, ki, kd = gains
    out, e0, e1 = pid[0], pid[1], pid[2]
    err = -current
    delta = kp * (err - e0) + ki * err + kd * (err - 2.0 * e0 + e1)
    new = torch.stack([(out + delta).clamp(-max_out, max_out), err, e0, e1])
    return torch.where(open_mask.bool().unsqueeze(0), new, pid)


def sgb_measure(acc: Tensor, error: str = "normalized") -> Tensor:
    """The controllers' measured value from the (2, C) accumulators: pos - neg, divided by pos + neg when
    ``error="normalized"`` (scale-free, in [-1, 1]; 0 for a class with no gradient yet)."""
    diff = acc[0] - acc[1]
    if error == "normalized":
        diff = diff / (acc[0] + acc[1]).clamp_min(1e-12)
    return diff


def balance_map(x: Tensor, weight_max: float = 10.0, map_slope: float = 0.5) -> Tensor:
    """f(x) = M / (1 + (M - 1) exp(-k x)): f(0) = 1, f in (0, M)."""
    return weight_max / (1.0 + (weight_max - 1.0) * torch.exp(-map_slope * x))


def sgb_weights(out: Tensor, open_mask: Tensor, weight_max: float = 10.0,
                map_slope: float = 0.5) -> tuple[Tensor, Tensor]:
    """Positive and negative gradient weights (w+, w-) = (f(u), f(-u)); closed controllers output u = 0."""
    u = out * open_mask
    return balance_map(u, weight_max, map_slope), balance_map(-u, weight_max, map_slope)


def sgb_loss(logits: Tensor, targets: Tensor, pos_w: Tensor, neg_w: Tensor) -> tuple[Tensor, Tensor]:
    """The re-weighted per-class sigmoid loss sum_ic w_ic BCE(z_ic, y_ic) / n and its weighted gradient magnitudes.

    Args:
        logits: (n, C) logits.
        targets: (n,) int64 labels.
        pos_w: (C,) weights of the positive gradients.
        neg_w: (C,) weights of the negative gradients.

    Returns:
        (loss, grads) where grads is (2, C): this batch's summed |dloss/dz| on positives and on negatives.
    """
    z = logits.float()
    onehot = F.one_hot(targets, z.shape[1]).to(z.dtype)
    w = (pos_w * onehot + neg_w * (1.0 - onehot)).detach()
    n = max(int(targets.numel()), 1)
    loss = (w * F.binary_cross_entropy_with_logits(z, onehot, reduction="none")).sum() / n
    with torch.no_grad():
        g = (torch.sigmoid(z) - onehot).abs() * w / n
        grads = torch.stack([(g * onehot).sum(0), (g * (1.0 - onehot)).sum(0)])
    return loss, grads


def released_tail_skips(open_mask: Tensor, generator: torch.Generator, skip_base: float = 0.1) -> Tensor:
    """The released code's per-batch draw of the tail classes whose gradient is *not* re-weighted.

    The tail (open) classes are visited in index order; the j-th of them is skipped with probability
    ``skip_base ** (s / (T - 1))``, s = the number of tail classes skipped so far in this batch, T = the number of
    tail classes (probability 1 when T = 1). The first tail class therefore is always skipped and consumes no draw;
    every later one consumes one uniform number: the T - 1 numbers are drawn at once, ``torch.rand(T - 1)`` from
    ``generator``, and tail class j >= 1 is skipped when its number is below its probability.

    Args:
        open_mask: (C,) 1 for the tail classes (open controllers).
        generator: CPU generator of the draws.
        skip_base: the probability of a skip once every other tail class was skipped (0.1 in the code).

    Returns:
        (C,) bool mask on ``open_mask``'s device: True = left at weight 1 and not accumulated in this batch.
    """
    tail = [int(c) for c in torch.nonzero(open_mask.detach().cpu() > 0).flatten()]
    skip = torch.zeros(open_mask.numel(), dtype=torch.bool)
    if not tail:
        return skip.to(open_mask.device)
    draws = torch.rand(len(tail) - 1, generator=generator, dtype=torch.float64).tolist()
    skipped = 0
    for j, c in enumerate(tail):
        p = skip_base ** (skipped / (len(tail) - 1)) if len(tail) > 1 else 1.0
        if j == 0 or draws[j - 1] < p:  # j == 0: skipped == 0, p == 1
            skip[c] = True
            skipped += 1
    return skip.to(open_mask.device)


def permuted_cohort_weights(seed: int, round: int, cohort: list[int], sizes: list[int]) -> dict[int, float]:
    """The released code's FedAvg weights: client ``sorted(cohort)[i]`` gets the sample count of
    ``sorted(cohort)[pi[i]]``, pi = ``torch.randperm(len(cohort))`` from a generator seeded by (seed, round).

    Args:
        seed: the experiment seed (``FedMethod.run.seed``).
        round: 1-based round.
        cohort: the round's client ids.
        sizes: training-set sizes indexed by client id.

    Returns:
        client id -> aggregation weight (a permutation of the cohort's sample counts).
    """
    ids = sorted(int(c) for c in cohort)
    perm = torch.randperm(len(ids), generator=seeded_generator(seed, _PERM_TAG, round)).tolist()
    return {cid: float(sizes[ids[j]]) for cid, j in zip(ids, perm)}


class FedGraBReducer(FrozenKeysReducer):
    """FedAvg aggregation; the DPA prior and tail mask of the global classifier are broadcast every round.

    With ``train_classifier=False`` the global classifier (``head.*``) is held bit for bit; with ``dpa=False``
    the broadcast holds only an all-ones tail mask (every controller open, no prior).
    """

    def __init__(self, method: FedGraB) -> None:
        frozen = not method.train_classifier
        super().__init__(lambda key: frozen and key.startswith(_HEAD))
        self.method = method

    def broadcast_extras(self, round: int) -> dict[str, Tensor]:
        weight = self.global_state[_HEAD_WEIGHT]
        if not self.method.dpa:
            return {"tail_mask": torch.ones(weight.shape[0], device=weight.device)}
        prior = dpa_prior(weight, self.method.norm_power)
        return {"prior": prior, "tail_mask": dpa_tail_mask(prior, self.method.tail_threshold)}


@METHODS.register("fedgrab")
class FedGraB(FedAvg):
    """FedAvg with the Self-adjusting Gradient Balancer on the DPA tail classes (Xiao et al., 2023).

    Args:
        kp: proportional gain K_P of the per-class PID controllers.
        ki: integral gain K_I.
        kd: derivative gain K_D.
        max_out: limit on the PID output |u|.
        weight_max: upper bound M of the weight mapping f (f(0) = 1).
        map_slope: slope k of the weight mapping f.
        tail_threshold: a class is tail (controller open) when its DPA prior is below tail_threshold / C.
        norm_power: exponent r on the classifier row norms in the DPA prior.
        persist_state: keep each client's controller state across rounds (released code) instead of resetting it.
        error: ``normalized`` ((pos - neg) / (pos + neg), default) or ``raw`` (pos - neg) measured value.
        train_classifier: train the linear classifier ``model.head`` with the body (paper, default). ``False``
            (released code: its optimizer holds only the backbone) freezes it: no gradient reaches its weights,
            the body still trains through it, and the global classifier stays bit-identical. The DPA prior (and
            so the tail set) is then the constant one of the initial classifier.
        aggregation_weights: ``matched`` (default): each client's model is weighted by its own sample count.
            ``permuted`` (released code): the i-th cohort client (client-id order) is weighted by the sample count
            of cohort client pi(i), pi a random permutation seeded by (seed, round)
            (:func:`permuted_cohort_weights`); the cohort is then drawn by the engine's uniform sampler
            (:func:`fedlt.engine.sharding.sample_cohort`, which replaces a ``Simulator(cohort_sampler=...)``).
        tail_selection: ``all`` (default): every tail class is re-weighted at every step. ``random_per_batch``
            (released code): per batch, tail classes are skipped (weight 1, no accumulation) by the code's
            sequential draw (:func:`released_tail_skips`; the first tail class is always skipped), from a
            generator seeded by (seed, round, client).
        dpa: estimate the prior with the DPA and open only the tail controllers (default). ``False`` (released
            code): no prior, every class's controller is open.
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Fed-GraB: Federated Long-tailed Learning with Self-Adjusting Gradient Balancer",
        venue="NeurIPS 2023",
        arxiv="2310.07587",
    )
    # The official code's behaviour (github ZackZikaiXiao/FedGraB, fed_grab.py and util/losses.py).
    released_code: ClassVar[dict[str, Any]] = {
        "train_classifier": False,
        "aggregation_weights": "permuted",
        "tail_selection": "random_per_batch",
        "dpa": False,
        "error": "raw",
    }

    def __init__(self, kp: float = 10.0, ki: float = 0.01, kd: float = 0.1, max_out: float = 100.0,
                 weight_max: float = 10.0, map_slope: float = 0.5, tail_threshold: float = 1.0,
                 norm_power: float = 1.0, persist_state: bool = True, error: str = "normalized",
                 train_classifier: bool = True, aggregation_weights: str = "matched", tail_selection: str = "all",
                 dpa: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if error not in ("normalized", "raw"):
            raise ValueError(f"error must be 'normalized' or 'raw', got {error!r}")
        if aggregation_weights not in ("matched", "permuted"):
            raise ValueError(f"aggregation_weights must be 'matched' or 'permuted', got {aggregation_weights!r}")
        if tail_selection not in ("all", "random_per_batch"):
            raise ValueError(f"tail_selection must be 'all' or 'random_per_batch', got {tail_selection!r}")
        for name, flag in (("train_classifier", train_classifier), ("dpa", dpa)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.train_classifier = train_classifier
        self.aggregation_weights = aggregation_weights
        self.tail_selection = tail_selection
        self.dpa = dpa
        self._cohort: tuple[int, list[int]] | None = None  # (round, cohort) of the latest sampled round
        self._weights: tuple[int, dict[int, float]] | None = None
        self.error = error
        if weight_max <= 1.0 or max_out <= 0:
            raise ValueError(f"weight_max must be > 1 and max_out > 0, got {weight_max}, {max_out}")
        self.kp, self.ki, self.kd = kp, ki, kd
        self.max_out = max_out
        self.weight_max = weight_max
        self.map_slope = map_slope
        self.tail_threshold = tail_threshold
        self.norm_power = norm_power
        self.persist_state = persist_state

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        weight = getattr(getattr(model, "head", None), "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("Fed-GraB's DPA needs a linear head with a (C, d) weight at model.head.weight")
        if not self.train_classifier:
            # The released code's optimizer never holds the classifier: no gradient reaches it (the body still
            # gets its gradient through it), and configure_optimizers only takes parameters that require one.
            for p in self.model.head.parameters():
                p.requires_grad_(False)

    def configure_reducer(self) -> Reducer:
        return FedGraBReducer(self)

    def cohort_sampler(self) -> Callable[[int, int, int, int], list[int]] | None:
        """With ``aggregation_weights="permuted"``: the engine's uniform sampler, remembering the round's cohort
        (the permuted weights pair it with the sample counts); otherwise the engine's own sampler."""
        if self.aggregation_weights != "permuted":
            return None

        def sampler(seed: int, round: int, num_clients: int, clients_per_round: int) -> list[int]:
            cohort = sample_cohort(seed, round, num_clients, clients_per_round)
            self._cohort = (round, sorted(int(c) for c in cohort))
            return cohort

        return sampler

    def aggregation_weight(self, ctx: ClientContext) -> float:
        """The client's FedAvg weight: its sample count, or (``permuted``) the released code's permuted one."""
        if self.aggregation_weights == "matched":
            return float(ctx.num_samples)
        if self._weights is None or self._weights[0] != ctx.round:
            if self._cohort is None or self._cohort[0] != ctx.round:
                raise RuntimeError(f"FedGraB(aggregation_weights='permuted'): no cohort was sampled for round "
                                   f"{ctx.round} (the permuted weights need the round's cohort_sampler call)")
            sizes = [int(i.numel()) for i in self.data.client_indices]
            self._weights = (ctx.round, permuted_cohort_weights(self.run.seed, ctx.round, self._cohort[1], sizes))
        return self._weights[1][ctx.client_id]

    def client_state_template(self) -> dict[str, Tensor]:
        c = self.num_classes
        return {_ACC: torch.zeros(2, c), _PID: torch.zeros(4, c)}

    def on_client_start(self, ctx: ClientContext) -> None:
        template = self.client_state_template()
        for key, zeros in template.items():
            keep = self.persist_state and key in ctx.state
            ctx.state[key] = (ctx.state[key] if keep else zeros).to(ctx.device, torch.float32).clone()
        self.open_mask = ctx.message.extras["tail_mask"].to(ctx.device, torch.float32)
        if self.tail_selection == "random_per_batch":
            self._tail_generator = seeded_generator(self.run.seed, _TAIL_TAG, ctx.round, ctx.client_id)

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        acc, pid = ctx.state[_ACC], ctx.state[_PID]
        gains = (self.kp, self.ki, self.kd)
        pid.copy_(pid_delta_step(pid, sgb_measure(acc, self.error), self.open_mask, gains, self.max_out))
        pos_w, neg_w = sgb_weights(pid[0], self.open_mask, self.weight_max, self.map_slope)
        skip = None
        if self.tail_selection == "random_per_batch":
            skip = released_tail_skips(self.open_mask, self._tail_generator)
            pos_w, neg_w = pos_w.masked_fill(skip, 1.0), neg_w.masked_fill(skip, 1.0)
        loss, grads = sgb_loss(self.model(x), y, pos_w, neg_w)
        acc.add_(grads if skip is None else grads.masked_fill(skip, 0.0))
        return StepOutput(loss=loss, parts={"loss": loss.detach()})

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        return ClientUpdate(client_id=ctx.client_id, weight=self.aggregation_weight(ctx), tensors=self.shared_tensors)
