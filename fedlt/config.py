"""Typed configuration sections that are not constructor arguments of a library class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class TrainerConfig:
    """Round loop, hardware and checkpointing.

    Args:
        rounds: number of server rounds R.
        clients_per_round: clients sampled per round (>= num_clients means full participation).
        eval_every: evaluate GM/PM every this many rounds (and after the last round); 0 disables evaluation.
        accelerator: ``auto`` (every visible GPU, else the CPU), ``gpu``/``cuda`` or ``cpu``; asking for a GPU that
            is not there is an error.
        devices: processes per node (one per GPU), or ``auto``: every visible GPU of the node, else one CPU
            process; on CPU, >1 simulates DDP ranks with gloo. More GPUs than the node has is an error.
        num_nodes: number of nodes (SLURM multi-node).
        precision: Fabric precision: ``32-true``, ``bf16-mixed``, ``16-mixed`` or ``auto`` (``bf16-mixed`` on a GPU
            that computes in bfloat16, compute capability 8.0 and newer; ``32-true`` elsewhere). The run prints
            and ``config.yaml`` records the resolved accelerator, devices and precision.
        client_state: where per-client persistent tensors live: ``memory``, ``cpu`` or ``disk``.
        checkpoint_every: write a checkpoint every this many rounds (and after the last); 0 only at the end.
        keep_checkpoints: how many round checkpoints to keep (0 keeps all).
        eval_batch_size: batch size for evaluation forward passes.
        exact_reduction: aggregate client contributions with exact, order-independent fixed-point sums, so that
            1, 2 or N ranks give bitwise identical results; ``false`` sums in float (faster for very large models,
            results then differ across world sizes in the last bits).
        vectorize_cohort: train a rank's clients of a round simultaneously (stacked parameters, ``torch.func``)
            instead of one after another; for the methods that support it (``fedlt.engine.vectorized``), equal to
            the sequential engine up to float rounding.
    """

    rounds: int = 50
    clients_per_round: int = 10
    eval_every: int = 5
    accelerator: str = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    client_state: str = "cpu"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    eval_batch_size: int = 512
    exact_reduction: bool = True
    vectorize_cohort: bool = False

    def __post_init__(self) -> None:
        # Ranges are checked here, when the config is instantiated: before any file or W&B run exists.
        minimum = {"rounds": 1, "clients_per_round": 1, "eval_every": 0, "num_nodes": 1,
                   "checkpoint_every": 0, "keep_checkpoints": 0, "eval_batch_size": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"trainer.{name} must be >= {low}, got {value}")
        if self.devices != "auto" and self.devices < 1:
            raise ValueError(f"trainer.devices must be >= 1 or 'auto', got {self.devices}")
        from fedlt.engine.hardware import ACCELERATORS, PRECISIONS

        if str(self.accelerator).lower() not in ACCELERATORS:
            raise ValueError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class ModelConfig:
    """The backbone: a registered short form (``name``) or any importable ``nn.Module`` (``class_path``).

    Args:
        name: a registered model (``cnn``, ``mlp``, ``resnet8/20/32/56``, ``resnet18/34``), ``timm:<name>`` for
            any timm model or ``clip:<name>`` for an open_clip model. Ignored when ``class_path`` is set.
        pretrained: load pretrained weights (timm and CLIP models; needs internet or a local cache).
        kwargs: extra constructor arguments of a registered model (e.g. ``hidden: 256``).
        class_path: dotted import path of your own ``torch.nn.Module`` (e.g. ``mypkg.nets.MyNet``), built with
            ``init_args``; its constructor's ``num_classes``, ``in_channels`` and ``image_size`` are filled in from
            the data unless ``init_args`` sets them.
        init_args: constructor arguments of ``class_path``; one it does not take is an error naming the valid ones.
        head: with ``class_path``: the (dotted) name of the classifier submodule, applied last in ``forward`` to a
            (batch, features) tensor. It becomes the model's ``head`` (personal heads, classifier re-training, ...);
            the rest is the feature extractor. Checked on an example batch at start.
    """

    name: str = "cnn"
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    head: str = "head"

    def __post_init__(self) -> None:
        if self.class_path is None:
            if self.init_args:
                raise ValueError("model.init_args is for model.class_path (your own module); a registered model "
                                 f"({self.name!r}) takes model.kwargs")
            return
        if self.kwargs:
            raise ValueError("model.kwargs is for registered models; with model.class_path pass model.init_args")
        if self.pretrained:
            raise ValueError("model.pretrained is for timm and CLIP models; with model.class_path load the weights "
                             "in your module's constructor")


@dataclass
class LoggingConfig:
    """Where metrics go besides the console and ``metrics.csv``.

    Args:
        wandb: log to Weights & Biases.
        wandb_mode: ``auto`` (online with credentials, else offline), ``online``, ``offline`` or ``disabled``.
        project: W&B project.
        entity: W&B entity (team or user).
        tags: W&B tags (added to the automatic ones: method, dataset, IF, alpha, seed).
        group: W&B group (``fedlt sweep`` sets the sweep's name, so its runs are compared together).
        job_type: W&B job type (default: the method's registry name).
        progress_bar: show the live progress bar.
    """

    wandb: bool = True
    wandb_mode: str = "auto"
    project: str = "fedlt"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        modes = ("auto", "online", "offline", "disabled")
        if self.wandb_mode not in modes:
            raise ValueError(f"logging.wandb_mode must be one of {', '.join(modes)}, got {self.wandb_mode!r}")
