"""BalanceFL (local self-balancing for long-tailed federated learning).

Paper: X. Shuai, Y. Shen, S. Jiang, Z. Zhao, Z. Yan, G. Xing, "BalanceFL: Addressing Class Imbalance in Long-Tail
Federated Learning", IPSN 2022, pp. 271-284, doi:10.1109/IPSN54338.2022.00029 (no arXiv version; official code:
github sxontheway/BalanceFL, ``train_ours.py``, ``fed.py``, ``loss/LwFloss.py``).

Idea: the local update of client k should behave as if its data were complete and class-balanced. Client k holds
n_{k,c} samples of class c; P_k = {c : n_{k,c} > 0} are its classes, M_k = {c : n_{k,c} = 0} the ones it lacks.
Client (local self-balancing), three components, each switchable off by its own argument:

1. Knowledge inheritance (``knowledge_inheritance``): the classification loss is the cross-entropy over the
   client's own classes only, CE_P(z, y) = -log softmax(z_P)_y (the logits of M_k are left out of the softmax, so
   the local update does not push the missing classes down), and the missing classes are distilled from the
   round's global model w^t (the teacher, frozen, received from the server):
   L_KD = mean_i KL( softmax(z^t_{i,M} / T) || softmax(z_{i,M} / T) ), both softmaxes over M_k only, z^t the
   teacher's logits and z the local model's (un-augmented) logits on the same batch; no T^2 factor (as the code).
   The code computes the soft cross-entropy -sum p^t log p, which differs from the KL by the teacher's entropy (a
   constant): the same gradients; the KL is reported so that the term is 0 when the local model agrees with the
   global one on the missing classes. With |M_k| <= 1 the term is 0.
2. Inter-class balancing by re-sampling (``balanced_sampling``): every local sample is drawn with replacement with
   probability proportional to 1 / n_{k, y_i}, i.e. one of the client's classes uniformly, then one of its
   samples uniformly (the code's ``WeightedRandomSampler`` with n_k draws per epoch). The engine's batch sizes
   and step count are kept (E passes of n_k draws).
3. Tail-class feature augmentation (``feature_augmentation``): at the start of the round the client passes its
   training samples (no data augmentation) through the global model's feature extractor and estimates one shared
   covariance Sigma_k, the n_{k,c}-weighted mean of the per-class unbiased covariances (a class with one sample
   contributes a zero matrix, with its weight). During training, sample i is augmented with probability
   p_{y_i} = 1 - n_{k,y_i} / max_c n_{k,c} (never the local head class, most often the rarest): its features
   h_i (the backbone's output, the classifier's input) become h_i + eps_i, eps_i ~ N(0, Sigma_k). CE_P is taken
   on the classifier's logits of the augmented features, L_KD on the un-augmented ones; the gradient flows through
   h_i into the backbone. (This is a Gaussian feature-space augmentation; BalanceFL has no mixup.)

Local loss: L = CE_P(head(h + eps), y) + lambda * L_KD(head(h), teacher(x)), with h = forward_features(x).
Server: FedAvg (sample-weighted mean of every tensor, BatchNorm statistics included).
With all three components off the local loss is the configured ``loss`` (cross-entropy) on the engine's batch:
BalanceFL is then exactly FedAvg (tested).
Hyperparameters (paper symbol): ``temperature`` (T, 2), ``lam`` (lambda, weight of L_KD, 1): the values of the
authors' configs for all three datasets (CIFAR-10, Speech Commands, IMU). Those configs train 200 rounds with
full participation of 10 (CIFAR-10, Speech) or 30 (IMU) clients, E = 5 local epochs, B = 64, and Adam (lr 5e-3,
IMU 5e-4, weight decay 1e-4); fedlt's local optimizer is FedMethod's SGD (the ``lr``, ``momentum``, ... arguments).

Implementation choices: the local loop has no sampler hook, so with ``balanced_sampling`` the training step draws
its balanced batch (of the engine's batch size) from ``ctx.generator`` and reads it with the data's training
augmentation; the engine's uniformly shuffled batch is discarded. Sigma_k is computed in float64 on the CPU and
eps is drawn through its eigendecomposition (negative rounding-level eigenvalues clipped to 0: Sigma_k is singular
whenever the client has fewer samples than d); the augmentation coin flips and the standard normals come from
``ctx.generator`` (the code: the global torch and numpy RNGs), so the result does not depend on the ranks.
Remaining known differences (not method arguments): the code builds one Adam optimizer per client once and keeps
its moments across rounds (fedlt's local optimizer is fresh every round); its networks (a bias-free classifier
whose logits are scaled by 2 on CIFAR-10) are model choices.

Paper vs released code (``BalanceFL.released_code``; docs/paper_vs_code.md):
- ``missing_classes="batch"``: the paper's missing classes are the classes the client lacks; the code's LwF loss
  takes them per mini-batch (``torch.unique(labels)``): CE_P is over the classes present in the batch and L_KD
  over all the others, including client classes that the batch happens not to contain.
- ``teacher_mode="train"``: the code runs the global model (the teacher) in train mode, both for the features of
  Sigma_k (shuffled batches of B) and for the teacher logits of every step (BatchNorm on the batch's statistics,
  dropout on); the paper's teacher is the received global model, which fedlt's default runs as such, in eval mode
  (its running statistics, no dropout; as MOON's frozen global model).
- ``noise_pool=500``: the code draws 500 noise vectors per client and round and hands them out in order, starting
  again from the first when fewer than a batch's need remain; the paper's augmentation draws a fresh eps per
  augmented feature (``None``).
- ``entropy_weight=0.002``: the code's LwF loss also subtracts 0.002 times the softmax entropy over the CE's
  classes of the un-augmented logits, summed (not averaged) over the batch; the paper's loss has no such term (0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.engine.params import copy_tensors_, model_tensors
from fedlt.losses import CrossEntropy
from fedlt.methods._lt_common import frozen_copy
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef, StepOutput

if TYPE_CHECKING:
    from fedlt.engine.local_loop import LocalTrainer
    from fedlt.models.base import FedModel

MISSING_CLASSES = ("client", "batch")
TEACHER_MODES = ("eval", "train")
_STATS_CHUNK = 512  # samples per forward pass of the eval-mode statistics pass


# -- the loss terms ----------------------------------------------------------------------------------------------
def present_class_ce(logits: Tensor, target: Tensor, classes: Tensor) -> Tensor:
    """CE_P: the mean cross-entropy of the softmax over ``classes`` only, -log softmax(z[:, classes])_y.

    Args:
        logits: (B, C) logits.
        target: (B,) labels, each in ``classes``.
        classes: (|P|,) int64 class ids (ascending), on the logits' device.
    """
    remap = torch.full((logits.shape[1],), -1, dtype=torch.long, device=logits.device)
    remap[classes] = torch.arange(classes.numel(), device=logits.device)
    return F.cross_entropy(logits.index_select(1, classes), remap[target])


def missing_class_kd(student: Tensor, teacher: Tensor, classes: Tensor, temperature: float) -> Tensor:
    """L_KD: mean over the batch of KL(softmax(z^t_M / T) || softmax(z_M / T)), both softmaxes over ``classes`` (M)
    only, no T^2 factor; 0 when M is empty.

    Args:
        student: (B, C) logits of the local model.
        teacher: (B, C) logits of the global model (no gradient).
        classes: (|M|,) int64 class ids, on the logits' device.
        temperature: T > 0.
    """
    if classes.numel() == 0:
        return student.new_zeros((), dtype=torch.float32)
    log_s = F.log_softmax(student.index_select(1, classes).float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.index_select(1, classes).float() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean()


def present_class_entropy_sum(logits: Tensor, classes: Tensor) -> Tensor:
    """The released code's entropy term: the softmax entropy over ``classes``, summed over the batch."""
    log_p = F.log_softmax(logits.index_select(1, classes).float(), dim=1)
    return -(log_p.exp() * log_p).sum()


# -- balanced sampling -----------------------------------------------------------------------------------------------
def balanced_positions(labels: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """``num`` positions into ``labels`` drawn with replacement with probability proportional to 1 / n_{y_i}: every
    class present in ``labels`` is equally likely, and within a class every sample.

    Args:
        labels: (n,) int64 labels of the client's samples (CPU).
        num: number of draws.
        generator: CPU generator of the draws.

    Returns:
        (num,) int64 positions (CPU).
    """
    counts = torch.bincount(labels).to(torch.float64)
    return torch.multinomial(1.0 / counts[labels], num, replacement=True, generator=generator)


# -- feature augmentation --------------------------------------------------------------------------------------------
def shared_covariance(features: Tensor, labels: Tensor) -> Tensor:
    """Sigma = sum_c n_c Sigma_c / sum_c n_c over the classes present, Sigma_c the unbiased covariance (divisor
    n_c - 1) of class c's features, a zero matrix for a class with one sample (float64, on the features' device).

    Args:
        features: (n, d) features.
        labels: (n,) int64 labels.
    """
    z = features.to(torch.float64)
    counts = torch.bincount(labels).to(torch.float64)
    means = torch.zeros(counts.numel(), z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, labels, z)
    means = means / counts.clamp(min=1.0)[:, None]
    centred = z - means[labels]
    n_y = counts[labels]
    weight = torch.where(n_y > 1, n_y / (n_y - 1).clamp(min=1.0), torch.zeros_like(n_y)) / labels.numel()
    return (centred * weight[:, None]).T @ centred


def gaussian_factor(cov: Tensor) -> Tensor:
    """A with A A^T = cov, from the eigendecomposition (negative rounding-level eigenvalues clipped to 0): eps = z A^T
    with z standard normal is N(0, cov), also for a singular (positive semi-definite) covariance."""
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp(min=0.0).sqrt()[None, :]


def augmentation_probabilities(counts: Tensor) -> Tensor:
    """p_c = 1 - n_c / max_c' n_c': the probability that a feature of class c is augmented (0 for the local head
    class)."""
    counts = counts.to(torch.float32)
    return 1.0 - counts / counts.max().clamp(min=1.0)


def augment_features(features: Tensor, mask: Tensor, noise: Tensor) -> Tensor:
    """h + eps on the rows of ``mask`` (in order, ``noise`` has one row per selected row), h elsewhere; differentiable
    in ``features``.

    Args:
        features: (B, d) features.
        mask: (B,) bool, the rows to augment.
        noise: (mask.sum(), d) the noise of the selected rows.
    """
    delta = torch.zeros_like(features)
    delta[mask] = noise.to(features.dtype)
    return features + delta


@METHODS.register("balancefl")
class BalanceFL(FedAvg):
    """FedAvg whose clients self-balance their local update: knowledge inheritance of the missing classes from the
    global model, class-balanced re-sampling and tail-class feature augmentation (Shuai et al., 2022).

    Args:
        knowledge_inheritance: the cross-entropy over the client's classes plus ``lam`` times the distillation of
            the missing classes from the global model (False: the plain ``loss`` over all classes).
        balanced_sampling: draw the local batches class-balanced (with replacement).
        feature_augmentation: add N(0, Sigma_k) noise to the features of locally rare classes.
        lam: lambda >= 0, weight of the distillation term.
        temperature: T > 0 of the distillation.
        missing_classes: the missing classes M: ``"client"`` (the classes the client lacks, the paper) or
            ``"batch"`` (the classes the mini-batch lacks, the released code).
        teacher_mode: the global model's mode for the teacher logits and the covariance features: ``"eval"`` or
            ``"train"`` (the released code: BatchNorm on batch statistics, dropout on).
        noise_pool: ``None`` (a fresh eps per augmented feature) or the size of the released code's pool of noise
            vectors drawn per client and round and handed out cyclically (500); at least ``batch_size``.
        entropy_weight: weight >= 0 of the released code's entropy bonus (0.002 there; 0: none).
        **kwargs: local-training arguments of :class:`fedlt.methods.base.FedMethod` (``loss`` only applies without
            knowledge inheritance).
    """

    paper = PaperRef(
        title="BalanceFL: Addressing Class Imbalance in Long-Tail Federated Learning",
        venue="IPSN 2022",
        url="https://doi.org/10.1109/IPSN54338.2022.00029",
    )
    # The official code's values (github sxontheway/BalanceFL: fed.py Fed_client.train_lt, loss/LwFloss.py).
    released_code: ClassVar[dict[str, Any]] = {"missing_classes": "batch", "teacher_mode": "train",
                                               "noise_pool": 500, "entropy_weight": 0.002}

    def __init__(self, knowledge_inheritance: bool = True, balanced_sampling: bool = True,
                 feature_augmentation: bool = True, lam: float = 1.0, temperature: float = 2.0,
                 missing_classes: str = "client", teacher_mode: str = "eval", noise_pool: int | None = None,
                 entropy_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if lam < 0 or entropy_weight < 0:
            raise ValueError(f"lam and entropy_weight must be >= 0, got {lam}, {entropy_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if missing_classes not in MISSING_CLASSES:
            raise ValueError(f"missing_classes must be one of {list(MISSING_CLASSES)}, got {missing_classes!r}")
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {list(TEACHER_MODES)}, got {teacher_mode!r}")
        if noise_pool is not None and noise_pool < self.batch_size:
            raise ValueError(f"noise_pool must be None or >= batch_size ({self.batch_size}), got {noise_pool}")
        if knowledge_inheritance and type(self.loss) is not CrossEntropy:
            raise ValueError("BalanceFL's loss with knowledge inheritance is the cross-entropy over the client's "
                             "classes; a custom loss applies only with knowledge_inheritance=False")
        self.knowledge_inheritance = knowledge_inheritance
        self.balanced_sampling = balanced_sampling
        self.feature_augmentation = feature_augmentation
        self.lam = lam
        self.temperature = temperature
        self.missing_classes = missing_classes
        self.teacher_mode = teacher_mode
        self.noise_pool = noise_pool
        self.entropy_weight = entropy_weight
        self._teacher: FedModel | None = None
        # Per client (set in on_client_start).
        self._present = self._missing = torch.zeros(0, dtype=torch.long)
        self._client_indices: Tensor | None = None  # the client's training indices (balanced sampling)
        self._client_labels = torch.zeros(0, dtype=torch.long)
        self._aug_prob: Tensor | None = None
        self._factor: Tensor | None = None  # A with A A^T = Sigma_k (float64, CPU)
        self._pool: Tensor | None = None
        self._pointer = 0

    @property
    def active(self) -> bool:
        """Whether any component is on (otherwise the client step is FedAvg's)."""
        return self.knowledge_inheritance or self.balanced_sampling or self.feature_augmentation

    @property
    def _needs_teacher(self) -> bool:
        return (self.knowledge_inheritance and self.lam > 0) or self.feature_augmentation

    def setup(self, model: nn.Module, data: Any, trainer: LocalTrainer) -> None:
        """Keeps one frozen copy of the network per rank for the global model (the teacher), reloaded per client."""
        super().setup(model, data, trainer)
        if self._needs_teacher:
            self._teacher = frozen_copy(self.model)

    # -- client half -----------------------------------------------------------------------------------------
    def on_client_start(self, ctx: ClientContext) -> None:
        if not self.active:
            return
        counts = ctx.class_counts
        self._present = (counts > 0).nonzero().flatten()
        self._missing = (counts <= 0).nonzero().flatten()
        indices = self.data.client_indices[ctx.client_id]
        if self._teacher is not None:
            tensors = model_tensors(self._teacher)
            keys = list(self.shared_tensors)
            copy_tensors_([tensors[k] for k in keys], [ctx.message.state[k] for k in keys])
            self._teacher.train(self.teacher_mode == "train")
        if self.balanced_sampling:
            self._client_indices = indices
            self._client_labels = self.data.train.y[indices].cpu()
        if self.feature_augmentation:
            self._start_augmentation(ctx, indices)

    def _start_augmentation(self, ctx: ClientContext, indices: Tensor) -> None:
        """Sigma_k from the global model's features of the client's samples, its factor, and (``noise_pool``) the
        round's pool of noise vectors."""
        feats, labels = self.teacher_features(indices, ctx.generator)
        self._factor = gaussian_factor(shared_covariance(feats.cpu(), labels.cpu()))
        self._aug_prob = augmentation_probabilities(ctx.class_counts).to(ctx.device)
        self._pool, self._pointer = None, 0
        if self.noise_pool is not None:
            z = torch.randn(self.noise_pool, self._factor.shape[0], generator=ctx.generator, dtype=torch.float64)
            self._pool = (z @ self._factor.T).to(device=ctx.device, dtype=torch.float32)

    @torch.no_grad()
    def teacher_features(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The global model's features (float32) and labels of the samples ``indices`` (no data augmentation): in
        eval mode in chunks of 512; in train mode (``teacher_mode="train"``) in shuffled batches of ``batch_size``
        (a trailing single sample joins the previous batch), as the code's data loader."""
        assert self._teacher is not None, "BalanceFL.setup() was not called"
        data = self.data
        if self.teacher_mode == "train":
            order = indices[torch.randperm(int(indices.numel()), generator=generator).to(indices.device)]
            chunks = list(order.split(self.batch_size))
            if len(chunks) > 1 and chunks[-1].numel() == 1:
                chunks[-2:] = [torch.cat(chunks[-2:])]
        else:
            order, chunks = indices, list(indices.split(_STATS_CHUNK))
        with self.trainer.autocast():
            feats = [self._teacher.forward_features(data.get_batch(data.train, part, None)[0]) for part in chunks]
        return torch.cat(feats).float(), data.train.y[order]

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        if not self.active:
            return super().training_step(batch, ctx)
        x, y = batch[0], batch[1]
        if self.balanced_sampling:
            x, y = self.balanced_batch(int(y.numel()), ctx.generator)
        h = self.model.forward_features(x)
        logits = self.model.head(h)
        cls_logits = self.model.head(self.augment(h, y, ctx.generator)) if self.feature_augmentation else logits
        present, missing = self.step_classes(y)
        parts: dict[str, Tensor] = {}
        if self.knowledge_inheritance:
            ce = present_class_ce(cls_logits, y, present)
            kd = self.distillation(x, logits, missing)
            loss = ce + self.lam * kd
            parts["kd"] = kd.detach()
        else:
            ce = self.loss(cls_logits, y, ctx.class_counts, ctx.round)
            loss = ce
        parts["ce"] = ce.detach()
        if self.entropy_weight > 0:
            ent = present_class_entropy_sum(logits, present)
            loss = loss - self.entropy_weight * ent
            parts["ent"] = ent.detach()
        return StepOutput(loss=loss, parts={"loss": loss.detach(), **parts})

    def balanced_batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A class-balanced training batch of ``size`` samples of the current client (with replacement), with the
        data's training augmentation, both drawn from ``generator``."""
        assert self._client_indices is not None, "balanced_batch outside a client's local fit"
        pos = balanced_positions(self._client_labels, size, generator).to(self._client_indices.device)
        out = self.data.get_batch(self.data.train, self._client_indices[pos], generator, train=True)
        return out[0], out[1]

    def step_classes(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(P, M) of the step: the client's classes and the ones it lacks, or (``missing_classes="batch"``) the
        classes in the batch and all the others; all classes and none without knowledge inheritance."""
        if not self.knowledge_inheritance:
            return torch.arange(self.num_classes, device=y.device), y.new_zeros(0)
        if self.missing_classes == "client":
            return self._present.to(y.device), self._missing.to(y.device)
        in_batch = torch.zeros(self.num_classes, dtype=torch.bool, device=y.device)
        in_batch[y] = True
        return in_batch.nonzero().flatten(), (~in_batch).nonzero().flatten()

    def distillation(self, x: Tensor, logits: Tensor, missing: Tensor) -> Tensor:
        """L_KD of the step (the teacher's forward pass is skipped when it cannot matter)."""
        if self.lam == 0 or missing.numel() == 0:
            return logits.new_zeros((), dtype=torch.float32)
        assert self._teacher is not None, "BalanceFL.setup() was not called"
        with torch.no_grad():
            teacher = self._teacher(x)
        return missing_class_kd(logits, teacher, missing, self.temperature)

    def augment(self, h: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """The step's augmented features: row i gets eps_i ~ N(0, Sigma_k) with probability p_{y_i}."""
        assert self._aug_prob is not None and self._factor is not None, "augment outside a client's local fit"
        coins = torch.rand(y.numel(), generator=generator).to(h.device)
        mask = coins < self._aug_prob[y]
        num = int(mask.sum())
        if num == 0:
            return h
        return augment_features(h, mask, self.noise(num, generator).to(h.device))

    def noise(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` noise vectors: fresh draws of N(0, Sigma_k), or the next ones of the round's pool (restarting
        from its first when ``pointer + num`` reaches its size, as the code)."""
        assert self._factor is not None
        if self._pool is None:
            z = torch.randn(num, self._factor.shape[0], generator=generator, dtype=torch.float64)
            return (z @ self._factor.T).float()
        if self._pointer + num >= self._pool.shape[0]:
            self._pointer = 0
        out = self._pool[self._pointer:self._pointer + num]
        self._pointer += num
        return out
