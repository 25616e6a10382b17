"""Federating a user's LightningModule: its ``training_step`` and ``configure_optimizers`` become the client half of
a method whose client step is the plain loss (FedAvg, FedProx, FedPer, ...).

The module comes in as ``model.class_path`` (with ``model.head`` naming its classifier, see
:mod:`fedlt.models.custom`). During a client's local fit the adapter calls ``module.training_step((x, y),
batch_idx)`` (a loss tensor, or a dict with ``"loss"``; with ``automatic_optimization = False`` the module steps
itself through ``self.optimizers()`` and ``self.manual_backward``) and, once per client, ``configure_optimizers()``
(any of Lightning's return forms). ``self.log`` / ``self.log_dict`` inside the module reach the round's train
metrics like a method's own :meth:`FedMethod.log`. Lightning's other hooks (``on_train_epoch_end``, validation
steps, ...) are not called: fedlt's evaluator measures GM and PM accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor

from fedlt.errors import ConfigError
from fedlt.types import ClientContext, StepOutput

if TYPE_CHECKING:
    from fedlt.methods.base import FedMethod
    from fedlt.models.custom import UserModel


class LightningUnsupported(ConfigError):
    """The method, or one of its settings, cannot train with a user's LightningModule (the message says why)."""


class _LightningModule(Protocol):
    """What the adapter uses of a ``LightningModule`` (Lightning itself is never imported here): its two hooks and
    the attributes through which Lightning's ``log``, ``optimizers`` and ``manual_backward`` reach a Fabric."""

    _fabric: Any
    _fabric_optimizers: list[Any]
    _device: torch.device

    def training_step(self, batch: Any, batch_idx: int) -> Any: ...

    def configure_optimizers(self) -> Any: ...


class _FabricShim:
    """What a LightningModule set up with Fabric reaches through ``self._fabric`` and ``self.trainer``: logging,
    backward and the current fit's schedulers, all routed to fedlt's local trainer."""

    def __init__(self, method: FedMethod) -> None:
        self._method = method

    def log_dict(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._method.log_dict(metrics)

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self._method.log(name, value)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        self._method.manual_backward(loss, *args, **kwargs)

    @property
    def lr_scheduler_configs(self) -> list[Any]:
        return list(self._method.trainer.schedulers)

    @property
    def world_size(self) -> int:
        return 1  # a client's local fit runs in one process

    @property
    def global_rank(self) -> int:
        return 0

    local_rank = global_rank


class LightningClient:
    """Drives a LightningModule as the client step of ``method`` (set up by :meth:`FedMethod.setup`)."""

    def __init__(self, method: FedMethod, model: UserModel) -> None:
        check_supported(method)
        module = cast(_LightningModule, model.body)  # a LightningModule: FedMethod.setup checked lightning_module
        self.method = method
        self.model = model
        self.module = module
        method.automatic_optimization = bool(getattr(module, "automatic_optimization", True))
        module._fabric = _FabricShim(method)  # LightningModule.log / manual_backward / lr_schedulers route here
        module._fabric_optimizers = []
        self._batch_idx = 0

    def configure_optimizers(self) -> Any:
        """The module's optimizers for one client's fit (its batch index starts again at 0)."""
        self._batch_idx = 0
        with self.model.whole():  # yields the body, i.e. self.module
            return self.module.configure_optimizers()

    def training_step(self, batch: tuple[Tensor, ...], ctx: ClientContext) -> StepOutput:
        module = self.module
        module._fabric_optimizers = self.method.trainer.optimizers
        module._device = batch[0].device
        with self.model.whole():
            out = module.training_step((batch[0], batch[1]), self._batch_idx)
        self._batch_idx += 1
        loss = out.get("loss") if isinstance(out, dict) else out
        if loss is None:
            if self.method.automatic_optimization:
                raise ConfigError(f"{type(module).__name__}.training_step returned no loss: with automatic "
                                 "optimization it must return the loss (a tensor, or a dict with 'loss')")
            return StepOutput(loss=None, parts={})
        if not isinstance(loss, Tensor):
            raise ConfigError(f"{type(module).__name__}.training_step returned {type(loss).__name__}; expected the "
                             "loss tensor (or a dict with 'loss')")
        if not self.method.automatic_optimization:
            return StepOutput(loss=None, parts={"loss": loss.detach()})
        return StepOutput(loss=loss, parts={"loss": loss.detach()})


def supported_methods() -> list[str]:
    from fedlt.methods import METHODS

    return [cls.__name__ for _, cls in METHODS.items() if cls.__dict__.get("lightning_client", False)]


def check_supported(method: FedMethod) -> None:
    """Refuses a method or setting that cannot use the module's own training step."""
    from fedlt.losses import CrossEntropy

    name = type(method).__name__
    if not type(method).__dict__.get("lightning_client", False):
        raise LightningUnsupported(
            f"model.class_path is a LightningModule, and {name} has its own client step, which would not use the "
            f"module's training_step; methods whose client step is the plain loss take one: "
            f"{', '.join(supported_methods())}")
    if type(method.loss) is not CrossEntropy:
        raise LightningUnsupported(f"{name}: method.init_args.loss {type(method.loss).__name__} cannot apply: the "
                                   "LightningModule's training_step computes the loss")
    if method.lr_schedule is not None or method.local_lr_schedule is not None:
        raise LightningUnsupported(f"{name}: lr_schedule / local_lr_schedule do not apply to a LightningModule; "
                                   "return an lr_scheduler from its configure_optimizers")
