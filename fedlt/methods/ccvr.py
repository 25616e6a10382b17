"""CCVR (Classifier Calibration with Virtual Representations).

Paper: M. Luo, F. Chen, D. Hu, Y. Zhang, J. Liang, J. Feng, "No Fear of Heterogeneity: Classifier Calibration for
Federated Learning with Non-IID Data", NeurIPS 2021, arXiv:2106.05001.

Training: FedAvg, unchanged (the paper applies CCVR post hoc to a model trained by any method; this class
calibrates FedAvg's, the paper's main setting).
Post-training calibration (``on_fit_end``; the curves before it are FedAvg's):

1. Every client k computes, on the final global model's feature extractor f (eval mode, no augmentation), for
   every class c it holds: the count N_{c,k}, the mean mu_{c,k} of its features z = f(x) and their unbiased
   covariance Sigma_{c,k} (divisor N_{c,k} - 1), and uploads them.
2. The server pools them into the global class Gaussians (the paper's Eq. for the mean and covariance of the
   union): N_c = sum_k N_{c,k}, mu_c = sum_k (N_{c,k} / N_c) mu_{c,k} and
   Sigma_c = sum_k (N_{c,k} - 1)/(N_c - 1) Sigma_{c,k} + sum_k N_{c,k}/(N_c - 1) mu_{c,k} mu_{c,k}^T
   - N_c/(N_c - 1) mu_c mu_c^T, which equal the mean and unbiased covariance of all clients' features together
   (tested against a central computation).
3. It draws ``virtual_per_class`` (the paper's M_c) virtual features per class present anywhere from
   N(mu_c, Sigma_c) and re-trains the classifier g (the model's ``head``, starting from its trained weights) with
   cross-entropy on them: ``calibration_epochs`` passes of SGD (``calibration_lr``, ``calibration_momentum``,
   batches of ``calibration_batch_size``, reshuffled every pass). The calibrated head replaces the global
   head, so GM and PM (FedAvg's PM is the global model on each client's test set) are evaluated once more and
   reported under ``post_training``.

Hyperparameters (paper symbol): ``virtual_per_class`` (M_c; default 100), ``calibration_epochs``,
``calibration_lr`` (default: the local ``lr``), ``calibration_momentum`` (default: the local ``momentum``),
``calibration_batch_size`` (default: the local ``batch_size``), plus FedAvg's.
The authors did not release code; fedlt follows the paper. Choices the paper leaves open: a class with a single
sample overall gets a zero covariance (its virtual features are its mean); a covariance is sampled through its
eigendecomposition with negative rounding-level eigenvalues clipped to 0 (it is singular whenever N_c <= d); the
virtual features are drawn from a generator seeded from (seed, class), so every rank and every world size draws
the same ones, and the statistics are exact sums over clients (``Simulator.client_sums``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlt.engine.sharding import seeded_generator
from fedlt.methods._finetune import client_features, finetune, trainable_only
from fedlt.methods._lt_common import load_global_into_workspace
from fedlt.methods.base import METHODS
from fedlt.methods.fedavg import FedAvg
from fedlt.types import ClientContext, PaperRef

if TYPE_CHECKING:
    from fedlt.engine.simulator import Simulator

_STATS_TAG = 0xCC1A
_CHUNK_ELEMENTS = 1 << 22  # second-moment elements gathered per pass over the clients (32 MiB of float64 sums)


def class_statistics(features: Tensor, labels: Tensor, classes: range) -> tuple[Tensor, Tensor, Tensor]:
    """One client's upload for ``classes``: counts N_c (C',), means mu_c (C', d) and unbiased covariances
    Sigma_c (C', d, d), in float64; a class with fewer than two samples has a zero covariance, one without samples
    a zero mean."""
    z = features.double()
    d = z.shape[1]
    counts = torch.zeros(len(classes), dtype=torch.float64, device=z.device)
    means = torch.zeros(len(classes), d, dtype=torch.float64, device=z.device)
    covs = torch.zeros(len(classes), d, d, dtype=torch.float64, device=z.device)
    for i, c in enumerate(classes):
        zc = z[labels == c]
        n = zc.shape[0]
        counts[i] = n
        if n:
            means[i] = zc.mean(0)
        if n > 1:
            centred = zc - means[i]
            covs[i] = centred.T @ centred / (n - 1)
    return counts, means, covs


def pooled_gaussians(counts: Tensor, mean_sums: Tensor, moment_sums: Tensor) -> tuple[Tensor, Tensor]:
    """The server's pooled class means and covariances from the sums over clients of N_{c,k}, N_{c,k} mu_{c,k} and
    (N_{c,k} - 1) Sigma_{c,k} + N_{c,k} mu_{c,k} mu_{c,k}^T (the paper's formula); rows of absent classes are 0,
    a class seen once has a zero covariance."""
    n = counts.clamp(min=1.0)
    mu = mean_sums / n[:, None]
    outer = counts[:, None, None] * mu[:, :, None] * mu[:, None, :]
    denom = (counts - 1.0).clamp(min=1.0)[:, None, None]
    cov = (moment_sums - outer) / denom
    cov[counts < 2] = 0.0
    return mu, cov


def sample_gaussian(mean: Tensor, cov: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """``num`` draws from N(mean, cov) (float64): mean + eps V diag(sqrt(max(lambda, 0))) V^T's factor, with
    eps standard normal from ``generator``; exact for a singular (positive semi-definite) covariance."""
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs * evals.clamp(min=0.0).sqrt()[None, :]
    eps = torch.randn(num, mean.shape[0], generator=generator, dtype=torch.float64)
    return mean[None, :] + eps.to(mean.device) @ factor.T


@METHODS.register("ccvr")
class CCVR(FedAvg):
    """FedAvg, then the classifier calibrated on virtual features drawn from the pooled class Gaussians.

    Args:
        virtual_per_class: M_c, virtual features drawn per class present in the federation (>= 1).
        calibration_epochs: passes of SGD over the virtual features (>= 1).
        calibration_lr: SGD learning rate of the calibration; None: the local ``lr``.
        calibration_momentum: its momentum; None: the local ``momentum``.
        calibration_batch_size: its batch size; None: the local ``batch_size``.
        **kwargs: FedAvg's arguments.
    """

    paper = PaperRef(
        title="No Fear of Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data",
        venue="NeurIPS 2021",
        arxiv="2106.05001",
    )

    def __init__(self, virtual_per_class: int = 100, calibration_epochs: int = 1, calibration_lr: float | None = None,
                 calibration_momentum: float | None = None, calibration_batch_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if virtual_per_class < 1 or calibration_epochs < 1:
            raise ValueError("virtual_per_class and calibration_epochs must be >= 1, got "
                             f"{virtual_per_class} and {calibration_epochs}")
        if calibration_lr is not None and calibration_lr <= 0:
            raise ValueError(f"calibration_lr must be > 0, got {calibration_lr}")
        if calibration_batch_size is not None and calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be >= 1, got {calibration_batch_size}")
        self.virtual_per_class = virtual_per_class
        self.calibration_epochs = calibration_epochs
        self.calibration_lr = self.lr if calibration_lr is None else calibration_lr
        self.calibration_momentum = self.momentum if calibration_momentum is None else calibration_momentum
        self.calibration_batch_size = self.batch_size if calibration_batch_size is None else calibration_batch_size

    # -- step 1-2: the pooled class Gaussians -----------------------------------------------------------------
    def gather_gaussians(self, sim: Simulator) -> tuple[Tensor, Tensor, Tensor]:
        """(N_c, mu_c, Sigma_c) of every class, pooled from every client's upload on the current global model
        (every rank; the same bits for any world size). The second moments are gathered for a block of classes
        per pass over the clients, so memory stays bounded for many classes and wide features."""
        c, d = self.data.num_classes, int(self.model.num_features)
        block = max(1, _CHUNK_ELEMENTS // (d * d + d + 1))
        counts, means, covs = [], [], []
        for start in range(0, c, block):
            classes = range(start, min(c, start + block))

            def upload(ctx: ClientContext, indices: Tensor, classes: range = classes) -> list[Tensor]:
                feats, labels = client_features(self, ctx.client_id)
                n, mu, cov = class_statistics(feats, labels, classes)
                outer = n[:, None, None] * mu[:, :, None] * mu[:, None, :]
                return [n, n[:, None] * mu, (n - 1.0).clamp(min=0.0)[:, None, None] * cov + outer]

            k = len(classes)
            n_sum, mean_sum, moment_sum = sim.client_sums(upload, [k, k * d, k * d * d], _STATS_TAG)
            mu, cov = pooled_gaussians(n_sum, mean_sum.view(k, d), moment_sum.view(k, d, d))
            counts.append(n_sum)
            means.append(mu)
            covs.append(cov)
        return torch.cat(counts), torch.cat(means), torch.cat(covs)

    # -- step 3: virtual features and the calibrated head -----------------------------------------------------
    def virtual_features(self, counts: Tensor, means: Tensor, covs: Tensor) -> tuple[Tensor, Tensor]:
        """``virtual_per_class`` draws from N(mu_c, Sigma_c) for every class with N_c > 0, and their labels."""
        feats, labels = [], []
        for c in (counts > 0).nonzero().flatten().tolist():
            gen = seeded_generator(self.run.seed, "ccvr-virtual", c)
            feats.append(sample_gaussian(means[c], covs[c], self.virtual_per_class, gen))
            labels.append(torch.full((self.virtual_per_class,), c, dtype=torch.long, device=means.device))
        return torch.cat(feats).float(), torch.cat(labels)

    def calibrate_head(self, feats: Tensor, labels: Tensor) -> None:
        """Re-trains the workspace model's head (from its current weights) with cross-entropy on ``(feats,
        labels)``: SGD through the engine's trainer (:func:`~fedlt.methods._finetune.finetune`),
        ``calibration_epochs`` passes, batches reshuffled every pass from a seeded generator."""
        head = self.model.head
        with trainable_only(self.model, list(head.parameters())) as params:
            finetune(self, 0, params, lambda h, y: F.cross_entropy(head(h), y), self.calibration_epochs,
                     self.calibration_lr, seeded_generator(self.run.seed, "ccvr-shuffle"),
                     self.calibration_momentum, cached=(feats, labels), batch_size=self.calibration_batch_size)

    def on_fit_end(self, simulator: Any) -> bool:
        """Steps 1-3 of the module docstring on every rank; the calibrated head becomes the global head."""
        sim: Simulator = simulator
        counts, means, covs = self.gather_gaussians(sim)
        feats, labels = self.virtual_features(counts, means, covs)
        load_global_into_workspace(self, sim.global_state)
        self.calibrate_head(feats, labels)
        with torch.no_grad():
            for name, value in self.model.head.state_dict().items():
                key = f"head.{name}"
                if key in sim.global_state:
                    sim.global_state[key].copy_(value)
        sim.load_global()
        return True
