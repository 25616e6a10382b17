"""CReFF (Classifier Re-training with Federated Features).

Paper: X. Shang, Y. Lu, G. Huang, H. Wang, "Federated Learning on Heterogeneous and Long-Tailed Data via
Classifier Re-training with Federated Features", IJCAI 2022, arXiv:2204.13399.

State (server): federated features F (``num_of_feature`` learnable d-dim features per class, initialised from a
seeded standard normal) and the re-trained classifier (W', b'). Both are broadcast-side server state and
checkpointed with the reducer.
Client, start of round, before local training: on the broadcast model's feature extractor (eval mode) with the
*re-trained* classifier (W', b') of the previous round, for every class c it owns, the gradient of the mean
cross-entropy of ``batch_real`` random real samples of class c w.r.t. (W', b'), averaged over ``real_repeats``
draws (the paper's real feature gradients g_c^k). They are uploaded as extras next to the FedAvg update.
Local training: plain FedAvg (the FedAvg model never sees the re-trained classifier).
Server, after the FedAvg step: g_c = unweighted mean of g_c^k over the participants owning c; then
``match_epoch`` SGD steps (lr ``lr_feature``) on F minimising sum_c D(grad_{(W', b')} CE(W' F_c + b', c), g_c) with
the gradient-matching distance of the official code, D = sum over the C rows of the weight gradient of
(1 - cos(A_row, B_row)) plus (1 - cos) of the (C,) bias gradients taken as one more row (``match_bias``; the
code's 1-D case is kept, its ``return 0`` is commented out), cos with 1e-6 added to the norm product; then a fresh
linear classifier (seeded init like ``nn.Linear``) is trained for ``crt_epoch`` epochs (SGD lr ``lr_net``, batch
``crt_batch_size``, reshuffled every epoch) on F and becomes (W', b').
Inference: GM = FedAvg feature extractor + re-trained classifier (``predict_global``).
Hyperparameters (paper defaults): ``num_of_feature`` 100, ``match_epoch`` 100, ``crt_epoch`` 300, ``lr_feature``
0.1, ``lr_net`` 0.01, ``batch_real`` 32, ``real_repeats`` 10 (official code), ``crt_batch_size`` 32 (the local
batch size in the official code), plus FedAvg's.
Deviations / choices: the real-sample draws use a generator seeded from (seed, round, client) separate from the
client's training generator, so the FedAvg trajectory is bit-identical to FedAvg's (tested). A class no participant
owns this round is left out of the matching loss (official code).

Paper vs released code (``CReFF.released_code``):
- ``real_augment``: the paper computes the real feature gradients on the (normalised) local samples and describes
  no augmentation of them ("none", the default); the released code (``--method DSA``, its default) applies
  differentiable Siamese augmentation to every draw of real samples before the forward pass ("dsa", with
  ``dsa_strategy`` "color_crop_cutout_flip_scale_rotate": one family per draw, its parameters shared by the batch;
  :mod:`fedlt.methods._dsa`). fedlt draws the augmentation from a generator seeded from (seed, round, client),
  separate from the sample draws (the code seeds it from the wall clock).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.sharding import seeded_generator
from fedlt.methods._dsa import DSA_STRATEGY, dsa_augment, parse_dsa_strategy
from fedlt.methods._lt_common import classifier_grad
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

_INIT_TAG, _REAL_TAG, _CRT_TAG, _DSA_TAG = 0xC5EF0, 0xC5EF1, 0xC5EF2, 0xC5EF3
REAL_AUGMENTS = ("none", "dsa")


def gradient_match_distance(syn: Tensor, real: Tensor) -> Tensor:
    """The official per-parameter distance between two gradients: sum over rows of ``1 - cos(syn_row, real_row)``
    (1e-6 added to the norm product); a 1-D gradient (a bias) is one row.

    Args:
        syn: (..., R, d) or (R,) gradient induced by the federated features.
        real: same shape, the aggregated real-feature gradient.

    Returns:
        (...) distances (a scalar for one (R, d) or (R,) pair).
    """
    if syn.dim() == 1:
        syn, real = syn.unsqueeze(0), real.unsqueeze(0)
    cos = (syn * real).sum(-1) / (syn.norm(dim=-1) * real.norm(dim=-1) + 1e-6)
    return (1.0 - cos).sum(-1)


def class_match_distances(syn_w: Tensor, syn_b: Tensor, real_w: Tensor, real_b: Tensor,
                          match_bias: bool = True) -> Tensor:
    """Per class c, the official ``match_loss``: D(weight gradients) + D(bias gradients), the bias gradient as one
    row (left out when ``match_bias`` is False).

    Args:
        syn_w, real_w: (C, C, d) weight gradients per class.
        syn_b, real_b: (C, C) bias gradients per class.
        match_bias: include the bias term.

    Returns:
        (C,) distances.
    """
    dist = gradient_match_distance(syn_w, real_w)
    if match_bias:
        dist = dist + gradient_match_distance(syn_b.unsqueeze(-2), real_b.unsqueeze(-2))
    return dist


def synthetic_class_gradients(features: Tensor, weight: Tensor, bias: Tensor, num_classes: int) -> tuple[Tensor,
                                                                                                         Tensor]:
    """For every class c, the (weight, bias) gradient of the mean CE of its federated features labelled c, in closed
    form (differentiable w.r.t. the features): ``((softmax(W F_c + b) - e_c)^T F_c / M, mean(softmax - e_c))``, all
    classes in one batch.

    Args:
        features: (C * M, d) federated features, grouped by class.
        weight: (C, d) classifier weight W'.
        bias: (C,) classifier bias b'.
        num_classes: C.

    Returns:
        (C, C, d) and (C, C): entry c is (grad_W, grad_b) of CE(W F_c + b, c).
    """
    per = features.view(num_classes, -1, features.shape[-1])  # (C, M, d)
    err = torch.softmax(per @ weight.t() + bias, dim=-1)  # (C, M, C)
    err = err - torch.eye(num_classes, device=err.device, dtype=err.dtype).unsqueeze(1)
    return err.transpose(1, 2) @ per / per.shape[1], err.mean(1)


def linear_init(num_classes: int, dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(W, b) drawn like ``nn.Linear``'s default init: U(-1/sqrt(d), 1/sqrt(d)) for both, from ``generator``."""
    bound = 1.0 / math.sqrt(dim)
    w = (torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    return w, b


@torch.no_grad()
def train_linear_head(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, lr: float, epochs: int,
                      batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mini-batch SGD (no momentum, reshuffled every epoch) on the mean CE of ``features @ W.T + b``; returns the new
    (W, b) and leaves the inputs untouched.

    Uses the closed-form gradient of a linear layer's mean CE: the same steps as autograd + SGD, without the per-step
    autograd overhead (CReFF re-trains with ~10^4 tiny steps per round).
    """
    w, b = weight.clone().float(), bias.clone().float()
    n = int(labels.numel())
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator).to(features.device).split(batch_size):
            gw, gb = classifier_grad(features[idx], labels[idx], w, b)
            w.sub_(gw, alpha=lr)
            b.sub_(gb, alpha=lr)
    return w, b


class CReFFReducer(Reducer):
    """FedAvg, then federated-feature gradient matching and classifier re-training (server state)."""

    def __init__(self, method: CReFF, num_classes: int, dim: int) -> None:
        super().__init__(extras={"grad": (num_classes, num_classes * (dim + 1)), "owners": (num_classes,)})
        self.method = method
        self.num_classes = num_classes
        self.dim = dim

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        m, c, d = self.method, self.num_classes, self.dim
        gen = seeded_generator(m.seed_value, _INIT_TAG)
        self.features = torch.randn(c * m.num_of_feature, d, generator=gen).to(device)
        self.labels = torch.arange(c, device=device).repeat_interleave(m.num_of_feature)
        w, b = linear_init(c, d, gen)
        self.head_w, self.head_b = w.to(device), b.to(device)

    def real_gradients(self) -> tuple[Tensor, Tensor, Tensor]:
        """Aggregated real gradients: (C, C, d) weight part, (C, C) bias part, (C,) bool mask of owned classes."""
        c, d = self.num_classes, self.dim
        owners = self.extras_sum["owners"]
        g = self.extras_sum["grad"].view(c, c, d + 1) / owners.clamp(min=1.0).view(c, 1, 1)
        return g[..., :d], g[..., d], owners > 0.5

    def matching_loss(self, feats: Tensor, real_w: Tensor, real_b: Tensor, owned: Tensor) -> Tensor:
        """Gradient-matching loss of the federated features ``feats`` at (W', b'): the sum over owned classes of
        :func:`class_match_distances`."""
        syn_w, syn_b = synthetic_class_gradients(feats, self.head_w, self.head_b, self.num_classes)
        return class_match_distances(syn_w, syn_b, real_w, real_b, self.method.match_bias)[owned].sum()

    def feature_objective(self, feats: Tensor, real_w: Tensor, real_b: Tensor, owned: Tensor) -> Tensor:
        """The loss the federated features minimise (CReFF: the matching loss)."""
        return self.matching_loss(feats, real_w, real_b, owned)

    def match_features(self) -> None:
        """``match_epoch`` SGD steps on the federated features (gradient matching at the current (W', b'))."""
        m = self.method
        real_w, real_b, owned = self.real_gradients()
        if not bool(owned.any()) or m.match_epoch == 0:
            return
        feats = self.features.clone().requires_grad_(True)
        opt = torch.optim.SGD([feats], lr=m.lr_feature)
        for _ in range(m.match_epoch):
            loss = self.feature_objective(feats, real_w, real_b, owned)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.features = feats.detach()

    @torch.no_grad()
    def retrain_head(self, round: int) -> None:
        """Trains a fresh linear classifier on the federated features; it becomes (W', b')."""
        m = self.method
        gen = seeded_generator(m.seed_value, _CRT_TAG, round)
        w0, b0 = linear_init(self.num_classes, self.dim, gen)
        device = self.features.device
        self.head_w, self.head_b = train_linear_head(self.features, self.labels, w0.to(device), b0.to(device),
                                                     m.lr_net, m.crt_epoch, m.crt_batch_size, gen)

    def server_step(self, round: int) -> None:
        if float(self.weight_sum.item()) <= 0:
            return
        super().server_step(round)
        with torch.enable_grad():
            self.match_features()
        self.retrain_head(round)

    def broadcast_extras(self, round: int) -> dict[str, Any]:
        return {"crt_weight": self.head_w, "crt_bias": self.head_b}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["creff"] = {k: getattr(self, k).detach().cpu().clone() for k in ("features", "head_w", "head_b")}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k, v in state["creff"].items():
            setattr(self, k, v.to(self.buffer.device).clone())


@METHODS.register("creff")
class CReFF(FedAvg):
    """FedAvg plus server-side classifier re-training on gradient-matched federated features.

    Args:
        num_of_feature: federated features per class.
        match_epoch: gradient-matching steps on the federated features per round.
        crt_epoch: classifier re-training epochs over the federated features per round.
        lr_feature: learning rate of the federated features.
        lr_net: learning rate of the classifier re-training.
        batch_real: real samples per class per draw for the client's real-feature gradient.
        real_repeats: draws averaged per class on the client.
        crt_batch_size: mini-batch size of the classifier re-training.
        seed: seed of the server-side draws; ``None`` uses the data (experiment) seed.
        real_augment: augmentation of the real samples of the client's real-feature gradients: ``none`` (paper:
            the normalised samples) or ``dsa`` (released code: differentiable Siamese augmentation, one draw per
            batch of real samples).
        dsa_strategy: underscore-separated DSA families (``color``, ``crop``, ``cutout``, ``flip``, ``scale``,
            ``rotate``) for ``real_augment: dsa``; the code's default uses all six.
        match_bias: include the bias gradient in the gradient-matching distance (official code; ``False`` gives
            the weight-only distance fedlt used before).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    released_code: ClassVar[dict[str, Any]] = {"real_augment": "dsa"}

    paper = PaperRef(
        title="Federated Learning on Heterogeneous and Long-Tailed Data via Classifier Re-training with Federated "
        "Features",
        venue="IJCAI 2022",
        arxiv="2204.13399",
    )

    def __init__(self, num_of_feature: int = 100, match_epoch: int = 100, crt_epoch: int = 300,
                 lr_feature: float = 0.1, lr_net: float = 0.01, batch_real: int = 32, real_repeats: int = 10,
                 crt_batch_size: int = 32, seed: int | None = None, real_augment: str = "none",
                 dsa_strategy: str = DSA_STRATEGY, match_bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if min(num_of_feature, batch_real, real_repeats, crt_batch_size) < 1 or min(match_epoch, crt_epoch) < 0:
            raise ValueError("CReFF sizes must be >= 1 and epochs >= 0")
        if real_augment not in REAL_AUGMENTS:
            raise ValueError(f"unknown real_augment {real_augment!r}; valid: {', '.join(REAL_AUGMENTS)}")
        if not isinstance(match_bias, bool):
            raise ValueError(f"match_bias must be a bool, got {match_bias!r}")
        self.dsa_families = parse_dsa_strategy(dsa_strategy)
        self.real_augment = real_augment
        self.dsa_strategy = dsa_strategy
        self.match_bias = match_bias
        self.num_of_feature = num_of_feature
        self.match_epoch = match_epoch
        self.crt_epoch = crt_epoch
        self.lr_feature = lr_feature
        self.lr_net = lr_net
        self.batch_real = batch_real
        self.real_repeats = real_repeats
        self.crt_batch_size = crt_batch_size
        self.seed = seed

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        self.seed_value = self.run.seed if self.seed is None else int(self.seed)
        self.dim = int(self.model.num_features)

    def configure_reducer(self) -> Reducer:
        self.reducer = CReFFReducer(self, self.num_classes, self.dim)
        return self.reducer

    @torch.no_grad()
    def real_feature_gradients(self, ctx: ClientContext) -> tuple[Tensor, Tensor]:
        """The client's (C, C*(d+1)) real-feature gradients (zeros for absent classes) and (C,) ownership."""
        c, d = self.num_classes, self.dim
        w, b = ctx.message.extras["crt_weight"], ctx.message.extras["crt_bias"]
        idx = self.data.client_indices[ctx.client_id]
        labels = self.data.train.y[idx]
        gen = seeded_generator(self.seed_value, _REAL_TAG, ctx.round, ctx.client_id)
        dsa_gen = seeded_generator(self.seed_value, _DSA_TAG, ctx.round, ctx.client_id)
        grads = torch.zeros(c, c, d + 1, device=ctx.device)
        owned = torch.zeros(c, device=ctx.device)
        # Eval mode and no augmentation make a sample's feature deterministic, so one forward pass over the local
        # set serves every draw (the draws then pick rows of this cache). With DSA every draw is its own batch.
        feats = self._features_of(idx) if self.real_augment == "none" else None
        for cls in labels.unique().tolist():
            pool = (labels == cls).nonzero().flatten()
            for _ in range(self.real_repeats):
                pick = pool[torch.randperm(int(pool.numel()), generator=gen)[: self.batch_real].to(pool.device)]
                if feats is None:
                    h = self._augmented_features_of(idx[pick], dsa_gen)
                else:
                    h = feats[pick]
                gw, gb = classifier_grad(h, labels[pick], w, b)
                grads[cls, :, :d] += gw / self.real_repeats
                grads[cls, :, d] += gb / self.real_repeats
            owned[cls] = 1.0
        return grads.view(c, c * (d + 1)), owned

    def _features_of(self, idx: Tensor) -> Tensor:
        """Eval-mode features of the training samples ``idx`` (un-augmented), as float."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for chunk in idx.split(512):
            x, _ = self.data.get_batch(self.data.train, chunk, None, train=False)
            with self.trainer.autocast():
                out.append(self.model.forward_features(x).float())
        self.model.train(was_training)
        return torch.cat(out)

    def _augmented_features_of(self, idx: Tensor, generator: torch.Generator) -> Tensor:
        """Eval-mode features of the training samples ``idx`` after one DSA draw on the normalised batch, as float."""
        was_training = self.model.training
        self.model.eval()
        x, _ = self.data.get_batch(self.data.train, idx, None, train=False)
        x = dsa_augment(x, self.dsa_families, generator)
        with self.trainer.autocast():
            out = self.model.forward_features(x).float()
        self.model.train(was_training)
        return out

    def on_client_start(self, ctx: ClientContext) -> None:
        self._real = self.real_feature_gradients(ctx)

    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        grad, owners = self._real
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors,
                            extras={"grad": grad, "owners": owners})

    def predict_global(self, x: Tensor) -> Tensor:
        """Feature extractor of the FedAvg model + the re-trained classifier."""
        h = self.model.forward_features(x)
        return F.linear(h, self.reducer.head_w.to(h.dtype), self.reducer.head_b.to(h.dtype))
