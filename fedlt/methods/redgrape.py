"""RedGrape (Decentralized Decoupled Training via Re-balanced Gradient Prototypes).

Paper: W. Yang, D. Chen, H. Zhou, F. Meng, J. Zhou, X. Sun, "Decentralized Decoupled Training for Federated
Long-Tailed Learning", TMLR 2024, arXiv:2302.06058. Spec: docs/reference.md section 3 (and section 8 rows 7-9).

Model: encoder P (``forward_features``, h in R^d), the re-balanced classifier W (``model.head``, with bias; the
only head used at inference) and a supplementary classifier W^ (``model.sup_head``, a ``nn.Linear(d, C)`` with bias
added in ``setup``; the code's "bias attractor"). Training logits are z = W h + W^ h. Everything (P, W, W^, BN
statistics) is aggregated.

Client (round t; stateless):
1. Local gradient prototypes, before any step, on the received model in eval mode, over the client's whole local
   set with training augmentation (client generator): with p = softmax(W h + b) (W only, not W + W^),
   g_{k,c} = mean over the class-c samples of ((p - e_y) h^T, p - e_y) = grad_W of the mean CE on class c
   (closed form, :func:`class_gradient_prototypes`). Computed for every owned class and uploaded.
2. Local balanced set: for every class with n_{k,c} >= T, T random samples (client generator), fetched once with
   training augmentation and frozen for the round; L^bal = those classes.
3. Every step: L = CE(W h + W^ h, y) (``loss``, default cross-entropy) is back-propagated into P, W, W^. Then the
   re-balancing gradient of W: h_bal = f_P(x_bal) under no_grad in train mode (BN running statistics are updated,
   as in the code), g_real = grad_W mean CE(W h_bal + b, y_bal) (closed form; P receives nothing), the prototype
   part = mean of the global prototypes G_c over the classes c not in L^bal that have one, combined as
   g_bal = (|L^bal| g_real + (C - |L^bal|) proto) / C (g_real alone when no missing class has a prototype, proto
   alone when L^bal is empty). Norm matching (Eq. 13): g^ = g_bal ||g_W^loc|| / ||g_bal|| with the unclipped local
   gradient g_W^loc of W (read after unscaling when a GradScaler is active; zero when g_bal = 0).
4. Update (``update``): ``"paper"`` (default, Eq. 13): W.grad += lam g^, one momentum-SGD step, no clipping
   (``grad_clip`` is ignored). ``"code"`` (the official trainer's update rule): clip the global gradient norm of
   all parameters to ``grad_clip`` (1.0), one momentum-SGD step with the (clipped) local gradients, then an extra
   momentum-free, unclipped step W <- W - lr lam g^ (weight and bias). With ``grad_accumulation=False`` (default)
   every step starts from zero gradients, so ``"code"`` is the official rule as if its loop zeroed the gradients
   after every optimizer step; it does not (next item).
5. Gradient accumulation (``grad_accumulation=True``, the official loop; needs ``update="code"``): the official
   trainer zeroes the gradients once before the local loop and otherwise only inside its re-balancing branch (right
   after the balanced-set backward, before the local backward), never after an optimizer step. So the gradients
   left in ``.grad`` after a step (the clipped ones the step used) carry into the next step:
   - steps without a real balanced set (round 1 without ``rebalance_first_round``; clients with no class at or
     above T; ``lam = 0`` in those rounds) add the new local gradient g_t of all parameters onto the carried one:
     step t clips and steps with G_t = clip(G_{t-1}) + g_t, and the norm matching of the prototype-only
     re-balancing (no class at or above T) reads the W part of G_t;
   - steps of a client with a real balanced set (a class at or above T, re-balancing rounds) drop the carried
     gradients (the local backward starts from zero), but the real part of g_bal is the carried clipped (W, b)
     gradient of the previous step plus grad_(W, b) of the balanced CE (the balanced backward adds onto it).
   The first step of a round carries nothing.
   With a gradient scaler the carried gradients are rescaled to the current scale; a step the scaler skips
   (non-finite gradients) restarts the accumulation.

Server (:class:`RedGrapeReducer`): FedAvg weighted mean (weights n_k, server lr 1.0; Eq. 14), then per class c:
G_c = unweighted mean of g_{k,c} over this round's participants owning c (Eq. 15); a class owned by nobody keeps
its previous G_c bit for bit. G and a (C,) ``has_proto`` mask are broadcast with the next round's model, so round
t uses prototypes computed on the model of round t-2 (the staleness of paper appendix A). G and ``has_proto`` are
checkpointed with the reducer.

Inference: GM = W h + b (W^ discarded); there is no PM (PM = GM).

Hyperparameters (paper symbol, default): ``lam`` (lambda, 0.1; grid {1, 0.1, 0.01}), ``threshold`` (T, 8 for
MNIST-/CIFAR-10-LT, 2 for CIFAR-100-LT), ``update`` ("paper"), ``rebalance_first_round`` (True), ``norm_match``
("global"), ``grad_clip`` (1.0, code update only), ``grad_accumulation`` (False; True in the official code), plus
FedAvg's: ``lr`` (eta, 0.1 CIFAR / 0.01 MNIST), ``momentum`` (0.9), ``weight_decay`` (0), ``local_epochs`` (E, 5),
``batch_size`` (B, 64). The paper's partition P-D is the data config's ``DirichletPrior(alpha=1.0)``.

Released code (``RedGrape.released_code``; docs/paper_vs_code.md; the ``configs/paper/redgrape_*.yaml`` files set
it). The defaults follow the paper; the code's values:
- ``update="code"``: gradient-norm clipping (1.0) over P, W, W^ and a separate momentum-free, unclipped
  re-balancing step of W; the paper (``"paper"``, Eq. 13) puts one combined gradient g_W^loc + lam g^ through the
  momentum optimizer, without clipping.
- ``rebalance_first_round=False``: no re-balancing in round 1 (the code's branch needs the prototype dictionary to
  exist); the paper re-balances every round (``True``: round 1 with the local balanced set alone).
- ``norm_match="per_tensor"``: weight and bias of g^ are matched to the local weight / bias gradient separately;
  the paper (``"global"``) uses one joint norm over (weight, bias) as in Eq. 13.
- ``grad_accumulation=True`` (item 5): the paper (Eq. 13) describes one fresh local gradient per step.
- The prototype part averages only classes that have a prototype, then weighs it by (C - |L^bal|) / C (code;
  identical to Eq. 12 when every missing class has one).
Implementation choices:
- W^ is initialised with nn.Linear's default distribution (U(-1/sqrt(d), 1/sqrt(d)) for weight and bias), drawn from
  a generator seeded with (experiment seed, tag) so every rank builds the same head without touching the global RNG
  (the official code uses nn.Linear's default init from the global RNG).
- ``lam = 0`` disables the re-balancing branch (no balanced set, no balanced forward): training is then exactly
  FedAvg on a model with logits (W + W^) h, BatchNorm statistics included (with ``grad_accumulation=True``: the
  official loop's accumulation of item 5, which with lambda 0 still restarts every step on clients with a class
  at or above T in re-balancing rounds, as the code's branch does).
- Closed-form gradients are computed in float32 outside autocast.
- Memory: each client uploads the (C, C, d) prototype tensor (plus (C, C) bias part) as a reducer extra and the
  server keeps one G of the same size: C = 100, d = 256 is 2.56 M floats (about 10 MB); it grows as C^2 d.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedlt.engine.local_loop import LocalTrainer
from fedlt.engine.sharding import derive_seed
from fedlt.methods._lt_common import classifier_grad
from fedlt.methods.base import METHODS, Reducer, submodule
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef, StepOutput

_INIT_TAG = 0x4ED64A
_UPDATES = ("code", "paper")
_NORM_MATCH = ("per_tensor", "global")
_CHUNK = 256  # samples per forward pass of the prototype computation


def class_gradient_sums(features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None,
                        num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class sums of the per-sample cross-entropy gradients of a linear classifier (closed form).

    For a sample (h, y) with p = softmax(W h + b), the gradient of CE w.r.t. W is (p - e_y) h^T and w.r.t. b is
    p - e_y. Row c of the outputs sums these over the samples of class c.

    Args:
        features: (n, d) features.
        targets: (n,) int64 labels.
        weight: (C, d) classifier weight W.
        bias: (C,) bias b or ``None``.
        num_classes: C.

    Returns:
        (sum_w (C, C, d), sum_b (C, C), counts (C,) float), in float32.
    """
    h = features.float()
    z = h @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    err = torch.softmax(z, dim=1)
    err[torch.arange(targets.numel(), device=targets.device), targets] -= 1.0
    sum_w = h.new_zeros(num_classes, num_classes, h.shape[1])
    sum_b = h.new_zeros(num_classes, num_classes)
    for c in targets.unique().tolist():
        mask = targets == c
        sum_w[c] = err[mask].t() @ h[mask]
        sum_b[c] = err[mask].sum(0)
    return sum_w, sum_b, torch.bincount(targets, minlength=num_classes).float()


def class_gradient_prototypes(features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None,
                              num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """RedGrape's local gradient prototypes g_c = grad_(W, b) of the mean CE over the class-c samples.

    Returns:
        (proto_w (C, C, d), proto_b (C, C), counts (C,)); rows of classes without samples are zero.
    """
    sum_w, sum_b, counts = class_gradient_sums(features, targets, weight, bias, num_classes)
    return _divide(sum_w, sum_b, counts)


def _divide(sum_w: Tensor, sum_b: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    denom = counts.clamp_min(1.0)
    return sum_w / denom[:, None, None], sum_b / denom[:, None], counts


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 or the ratio is not finite (no device sync)."""
    r = num / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where(den > 0, r, torch.zeros_like(r))
    return torch.where(torch.isfinite(r), r, torch.zeros_like(r))


def norm_match(bal_w: Tensor, bal_b: Tensor | None, loc_w: Tensor, loc_b: Tensor | None,
               mode: str = "per_tensor") -> tuple[Tensor, Tensor | None]:
    """Eq. 13: rescales the re-balancing gradient to the norm of the local gradient of W.

    Args:
        bal_w, bal_b: the re-balancing gradient g_bal (weight (C, d), bias (C,) or ``None``).
        loc_w, loc_b: the (unclipped, unscaled) local gradient g_W^loc.
        mode: ``"per_tensor"`` (weight and bias separately, the code) or ``"global"`` (one joint norm).

    Returns:
        (g^_w, g^_b); a zero g_bal (or a non-finite local gradient) gives zeros.
    """
    if mode not in _NORM_MATCH:
        raise ValueError(f"norm_match must be one of {list(_NORM_MATCH)}, got {mode!r}")
    if mode == "per_tensor":
        out_w = bal_w * _ratio(loc_w.norm(), bal_w.norm())
        out_b = bal_b * _ratio(loc_b.norm(), bal_b.norm()) if bal_b is not None and loc_b is not None else None
        return out_w, out_b
    bal = [bal_w] + ([bal_b] if bal_b is not None else [])
    loc = [loc_w] + ([loc_b] if loc_b is not None else [])
    scale = _ratio(torch.stack([t.norm() for t in loc]).norm(), torch.stack([t.norm() for t in bal]).norm())
    return bal_w * scale, (bal_b * scale if bal_b is not None else None)


class RedGrapeReducer(Reducer):
    """FedAvg over the model plus the per-class unweighted mean of the uploaded gradient prototypes.

    Args:
        num_classes: C.
        num_features: d.
    """

    def __init__(self, num_classes: int, num_features: int) -> None:
        c, d = num_classes, num_features
        super().__init__(extras={"proto_w": (c, c, d), "proto_b": (c, c), "proto_owner": (c,)})
        self.num_classes, self.num_features = c, d

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        c, d = self.num_classes, self.num_features
        self.proto_w = torch.zeros(c, c, d, device=device)
        self.proto_b = torch.zeros(c, c, device=device)
        self.has_proto = torch.zeros(c, dtype=torch.bool, device=device)

    def server_step(self, round: int) -> None:
        """FedAvg step, then G_c <- mean of the owners' g_{k,c}; classes owned by nobody keep G_c."""
        super().server_step(round)
        owners = self.extras_sum["proto_owner"]
        owned = owners > 0.5
        denom = owners.clamp_min(1.0)
        # New tensors (never in place): the broadcast of the previous round may still alias the old ones.
        self.proto_w = torch.where(owned[:, None, None], self.extras_sum["proto_w"] / denom[:, None, None],
                                   self.proto_w)
        self.proto_b = torch.where(owned[:, None], self.extras_sum["proto_b"] / denom[:, None], self.proto_b)
        self.has_proto = self.has_proto | owned

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        return {"proto_w": self.proto_w, "proto_b": self.proto_b, "has_proto": self.has_proto}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["proto_w"] = self.proto_w.detach().cpu().clone()
        state["proto_b"] = self.proto_b.detach().cpu().clone()
        state["has_proto"] = self.has_proto.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.buffer.device
        self.proto_w = state["proto_w"].to(device).clone()
        self.proto_b = state["proto_b"].to(device).clone()
        self.has_proto = state["has_proto"].to(device=device, dtype=torch.bool).clone()


@METHODS.register("redgrape")
class RedGrape(FedAvg):
    """Joint training of encoder + supplementary head on CE and of a re-balanced head with gradient prototypes.

    Args:
        lam: lambda, weight of the norm-matched re-balancing gradient (0 disables re-balancing).
        threshold: T, samples per class of the local balanced set; classes with fewer use global prototypes.
        update: ``"paper"`` (default: combined gradient through the optimizer, no clipping) or ``"code"`` (clipped
            momentum step + separate momentum-free re-balancing step).
        rebalance_first_round: re-balance in round 1 too, with the local balanced set only (default True, the
            paper; the code: False).
        norm_match: ``"global"`` (default: one joint norm, Eq. 13) or ``"per_tensor"`` (weight and bias
            separately, the code).
        grad_clip: global gradient-norm clip of the ``"code"`` update (ignored by ``"paper"``); ``None``: none.
        grad_accumulation: ``False`` (default, the paper: fresh gradients every step) or ``True`` (the official loop:
            gradients are not zeroed after a step and carry into the next one, module docstring item 5; needs
            ``update="code"``).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="Decentralized Decoupled Training for Federated Long-Tailed Learning",
        venue="TMLR 2024",
        arxiv="2302.06058",
    )
    automatic_optimization = False
    # The official code's values (github keven980716/Federated_Learning_Experiments, the decoupled trainer).
    released_code: ClassVar[dict[str, Any]] = {"update": "code", "rebalance_first_round": False,
                                               "norm_match": "per_tensor", "grad_accumulation": True}

    def __init__(self, lam: float = 0.1, threshold: int = 8, update: str = "paper",
                 rebalance_first_round: bool = True, norm_match: str = "global",
                 grad_clip: float | None = 1.0, grad_accumulation: bool = False, **kwargs) -> None:
        super().__init__(grad_clip=grad_clip, **kwargs)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if isinstance(threshold, bool) or int(threshold) != threshold or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold}")
        if update not in _UPDATES:
            raise ValueError(f"update must be one of {list(_UPDATES)}, got {update!r}")
        if norm_match not in _NORM_MATCH:
            raise ValueError(f"norm_match must be one of {list(_NORM_MATCH)}, got {norm_match!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        if not isinstance(grad_accumulation, bool):
            raise ValueError(f"grad_accumulation must be a bool, got {grad_accumulation!r}")
        if grad_accumulation and update != "code":
            raise ValueError("grad_accumulation=True is the official loop's behaviour and needs update='code'")
        self.lam = float(lam)
        self.threshold = int(threshold)
        self.update = update
        self.rebalance_first_round = bool(rebalance_first_round)
        self.norm_match = norm_match
        self.grad_accumulation = grad_accumulation
        self._reset_round()

    def _reset_round(self) -> None:
        self._x_bal: Tensor | None = None
        self._y_bal: Tensor | None = None
        self._proto_part: tuple[Tensor, Tensor] | None = None
        self._n_bal = 0
        self._active = False
        # grad_accumulation: whether the official loop restarts the gradients every step (a real balanced set in a
        # re-balancing round), and the gradients carried from the previous step ((parameter, unscaled clipped
        # gradient) pairs, or None).
        self._restarts = False
        self._carried: list[tuple[Tensor, Tensor]] | None = None

    # -- wiring ----------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        """Adds the supplementary head W^ (``model.sup_head``), seeded from the experiment seed."""
        super().setup(model, data, trainer)
        head = model.head
        if not isinstance(head, nn.Linear) or head.out_features != self.num_classes:
            raise ValueError("RedGrape needs a linear head nn.Linear(num_features, num_classes) as model.head")
        d, c = head.in_features, head.out_features
        gen = torch.Generator().manual_seed(derive_seed(self.run.seed, _INIT_TAG))
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) and the bias bound
        weight = (torch.rand(c, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        bias = (torch.rand(c, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        sup = nn.utils.skip_init(nn.Linear, d, c, device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            sup.weight.copy_(weight)
            sup.bias.copy_(bias)
        model.sup_head = sup

    @property
    def _head(self) -> nn.Linear:
        """W, the re-balanced classifier (``model.head``, an ``nn.Linear``: checked in :meth:`setup`)."""
        return submodule(self.model, "head", nn.Linear)

    @property
    def _sup_head(self) -> nn.Linear:
        """W^, the supplementary classifier (``model.sup_head``, added in :meth:`setup`)."""
        return submodule(self.model, "sup_head", nn.Linear)

    def configure_reducer(self) -> Reducer:
        head = self._head
        return RedGrapeReducer(head.out_features, head.in_features)

    # -- client half -----------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        """Local prototypes on the received model, the round's balanced set and the global prototype part."""
        self._reset_round()
        idx = self.data.client_indices[ctx.client_id]
        upload = self.local_prototypes(idx, ctx.generator)
        self._upload: tuple[Tensor, Tensor, Tensor] | None = upload
        if ctx.round <= 1 and not self.rebalance_first_round:
            return
        self._restarts = bool((upload[2] >= self.threshold).any())
        if self.lam == 0:
            return
        bal_classes = self._draw_balanced_set(idx, upload[2], ctx.generator)
        self._proto_part = self._global_prototype_part(bal_classes, ctx.message.extras)
        self._active = self._n_bal > 0 or self._proto_part is not None

    @torch.no_grad()
    def local_prototypes(self, idx: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """g_{k,c} on the workspace model (eval mode, training augmentation), W only.

        Returns:
            (proto_w (C, C, d), proto_b (C, C), counts (C,)).
        """
        head, c = self._head, self.num_classes
        was_training = self.model.training
        self.model.eval()
        device = head.weight.device
        sum_w = torch.zeros(c, c, head.in_features, device=device)
        sum_b = torch.zeros(c, c, device=device)
        counts = torch.zeros(c, device=device)
        for chunk in idx.split(_CHUNK):
            x, y = self.data.get_batch(self.data.train, chunk, generator, train=True)
            with self.trainer.autocast():
                h = self.model.forward_features(x)
            with torch.autocast(device.type, enabled=False):
                sw, sb, n = class_gradient_sums(h.float(), y, head.weight, head.bias, c)
            sum_w += sw
            sum_b += sb
            counts += n
        self.model.train(was_training)
        return _divide(sum_w, sum_b, counts)

    def _draw_balanced_set(self, idx: Tensor, counts: Tensor, generator: torch.Generator) -> Tensor:
        """T random samples of every class with n_{k,c} >= T, augmented once; returns the (C,) L^bal mask."""
        labels = self.data.train.y[idx]
        bal = counts >= self.threshold
        picks = []
        for c in bal.nonzero().flatten().tolist():
            pool = idx[labels == c]
            perm = torch.randperm(int(pool.numel()), generator=generator)[: self.threshold]
            picks.append(pool[perm.to(pool.device)])
        self._n_bal = len(picks)
        if picks:
            self._x_bal, self._y_bal = self.data.get_batch(self.data.train, torch.cat(picks), generator, train=True)
        return bal

    def _global_prototype_part(self, bal: Tensor, extras: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """Mean of G_c over the classes outside L^bal that have a prototype (``None`` if there are none).

        A client whose L^bal holds every class never touches the global prototypes."""
        missing = ~bal
        if not bool(missing.any()) or "has_proto" not in extras:
            return None
        use = missing & extras["has_proto"].to(missing.device, torch.bool)
        if not bool(use.any()):
            return None
        return extras["proto_w"][use].float().mean(0), extras["proto_b"][use].float().mean(0)

    def balanced_gradient(self, carried: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
        """g_bal: the real part on the frozen balanced set (train-mode forward, no gradient into P) combined with
        the global prototype part.

        Args:
            carried: (W, b) gradients added to the real part (``grad_accumulation``: the previous step's clipped
                head gradient that the official balanced backward adds onto).
        """
        head, c = self._head, self.num_classes
        parts_w, parts_b, weights = [], [], []
        if self._n_bal > 0:
            assert self._x_bal is not None and self._y_bal is not None  # drawn with the _n_bal classes
            with torch.no_grad():
                h = self.model.forward_features(self._x_bal)
                with torch.autocast(h.device.type, enabled=False):
                    w, b = classifier_grad(h.float(), self._y_bal, head.weight.float(), _float(head.bias))
            if carried is not None:
                w = w + carried[0].float()
                b = b + carried[1].float() if b is not None and carried[1] is not None else b
            parts_w.append(w)
            parts_b.append(b)
            weights.append(float(self._n_bal))
        if self._proto_part is not None:
            parts_w.append(self._proto_part[0])
            parts_b.append(self._proto_part[1])
            weights.append(float(c - self._n_bal))
        if len(parts_w) == 1:
            return parts_w[0], parts_b[0]
        g_w = (weights[0] * parts_w[0] + weights[1] * parts_w[1]) / c
        g_b = (weights[0] * parts_b[0] + weights[1] * parts_b[1]) / c
        return g_w, g_b

    def _local_head_grad(self) -> tuple[Tensor, Tensor | None]:
        """The true (unscaled, unclipped) gradient of the local loss w.r.t. W and b."""
        head = self._head
        assert head.weight.grad is not None  # read after the local backward
        inv = 1.0 / self.trainer.scaler.get_scale() if self.trainer.scaler is not None else 1.0
        g_w = head.weight.grad.float() * inv
        g_b: Tensor | None = None
        if head.bias is not None:
            assert head.bias.grad is not None
            g_b = head.bias.grad.float() * inv
        return g_w, g_b

    def _restore_carried(self) -> tuple[Tensor, Tensor | None] | None:
        """``grad_accumulation``: puts the previous step's gradients back into ``.grad`` (times the current
        gradient scale) so that the next backward adds onto them; on a restarting client they are dropped instead
        and only the head's part is returned (for the real part of g_bal)."""
        carried, self._carried = self._carried, None
        if carried is None:
            return None
        if self._restarts:
            head = self._head
            grads = {id(p): g for p, g in carried}
            if id(head.weight) not in grads:
                return None
            bias = grads.get(id(head.bias)) if head.bias is not None else None
            return grads[id(head.weight)], bias
        scale = self.trainer.scaler.get_scale() if self.trainer.scaler is not None else 1.0
        for p, g in carried:
            p.grad = g.mul_(scale) if scale != 1.0 else g
        return None

    def _held_grads(self, opt: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor]]:
        """The gradient tensors the next step will use; unscaling and clipping act on them in place, so after
        :meth:`LocalTrainer.step` they hold what the optimizer stepped with (zero_grad only drops them)."""
        return [(p, p.grad) for group in opt.param_groups for p in group["params"] if p.grad is not None]

    def _keep_carried(self, held: list[tuple[Tensor, Tensor]]) -> None:
        if self.trainer.scaler is not None:  # a skipped (non-finite) step restarts the accumulation
            if not bool(torch.stack([torch.isfinite(g).all() for _, g in held]).all()):
                return
        self._carried = held

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        x, y = batch[0], batch[1]
        (opt,) = self._optimizers
        carried_head = self._restore_carried() if self.grad_accumulation else None
        h = self.model.forward_features(x)
        z = self.model.head(h) + self._sup_head(h)
        loss = self.loss(z, y, ctx.class_counts, ctx.round)
        self.trainer.backward(loss)
        clip = self.grad_clip if self.update == "code" else None
        held = self._held_grads(opt) if self.grad_accumulation else None
        if not self._active:
            self.trainer.step(opt, clip)
            if held is not None:
                self._keep_carried(held)
            return StepOutput(loss=None, parts={"loss": loss.detach()})
        bal_w, bal_b = self.balanced_gradient(carried_head)
        loc_w, loc_b = self._local_head_grad()
        hat_w, hat_b = norm_match(bal_w, bal_b, loc_w, loc_b, self.norm_match)
        if self.update == "code":
            self.trainer.step(opt, clip)
            if held is not None:
                self._keep_carried(held)
            self._rebalancing_step(hat_w, hat_b)
        else:
            self._add_rebalancing_grad(hat_w, hat_b)
            self.trainer.step(opt, None)
        return StepOutput(loss=None, parts={"loss": loss.detach()})

    @torch.no_grad()
    def _rebalancing_step(self, hat_w: Tensor, hat_b: Tensor | None) -> None:
        """``update="code"``: the separate momentum-free, unclipped step W <- W - lr lam g^ (weight and bias)."""
        head = self._head
        head.weight.sub_(hat_w.to(head.weight.dtype), alpha=self.current_lr * self.lam)
        if head.bias is not None:
            assert hat_b is not None  # the bias has a local gradient, so g^ has a bias part
            head.bias.sub_(hat_b.to(head.bias.dtype), alpha=self.current_lr * self.lam)

    @torch.no_grad()
    def _add_rebalancing_grad(self, hat_w: Tensor, hat_b: Tensor | None) -> None:
        """``update="paper"``: W.grad += lam g^ (in the gradient scaler's scale)."""
        head = self._head
        scale = self.trainer.scaler.get_scale() if self.trainer.scaler is not None else 1.0
        assert head.weight.grad is not None  # after the local backward
        head.weight.grad.add_(hat_w.to(head.weight.grad.dtype), alpha=self.lam * scale)
        if head.bias is not None:
            assert head.bias.grad is not None and hat_b is not None
            head.bias.grad.add_(hat_b.to(head.bias.grad.dtype), alpha=self.lam * scale)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """Model tensors (weight n_k) plus the local prototypes of the owned classes."""
        assert self._upload is not None  # computed in on_client_start
        proto_w, proto_b, counts = self._upload
        self._upload = None
        self._reset_round()
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors,
                            extras={"proto_w": proto_w, "proto_b": proto_b, "proto_owner": (counts > 0).float()})

    # -- inference -------------------------------------------------------------------------------------------
    def predict_global(self, x: Tensor) -> Tensor:
        """GM: the re-balanced classifier W only (W^ discarded)."""
        return self.model.head(self.model.forward_features(x))


def _float(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None else None
