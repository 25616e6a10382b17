"""Bring your own model: any importable ``nn.Module`` behind the features/head split.

``model: {class_path: mypkg.nets.MyNet, init_args: {...}, head: fc}`` builds ``MyNet(**init_args)`` (with
``num_classes``, ``in_channels`` and ``image_size`` filled in from the data when its constructor takes them and
``init_args`` does not set them) and wraps it in :class:`UserModel`: the submodule named by ``head`` becomes the
classifier (state-dict keys ``head.*``, which methods treat as the classifier) and the rest, with the head replaced
by an identity, the feature extractor (``body.*``).

The protocol, checked at start on one example batch: the module's ``forward(x)`` must end with ``head`` applied to
a (batch, features) tensor, i.e. ``forward(x) == head(features(x))``, and ``head`` must output ``num_classes``
logits. A module that breaks it is refused with a message that says which part fails.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fedlt.errors import ConfigError
from fedlt.models.base import FedModel

DATA_ARGS = ("num_classes", "in_channels", "image_size")


class ModelSpecError(ConfigError):
    """A user model that cannot be imported, built or split into features and head."""


class _HeadSlot(nn.Module):
    """Stands where the user's module had its head; holds no parameters. It applies the wrapping
    :class:`UserModel`'s ``head``, so that the user's ``forward`` (and a LightningModule's ``training_step``) still
    returns logits, except while :meth:`UserModel.forward_features` runs, when it passes the features through."""

    _owner: UserModel

    def __init__(self, owner: UserModel) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # a plain reference, not a submodule (no second copy of the head)

    def forward(self, x: Tensor) -> Tensor:
        owner = self._owner
        return x if owner._features_only else owner.head(x)


class UserModel(FedModel):
    """A user's module split at its ``head`` submodule.

    Args:
        module: the user's module (its head submodule is moved to ``self.head``; in its place a slot that applies
            ``self.head``, so ``module(x)`` still gives logits).
        head: dotted name of the classifier submodule inside ``module``.
        num_classes: C (the head's output size).
        num_features: d (the head's input size).
    """

    def __init__(self, module: nn.Module, head: str, num_classes: int, num_features: int) -> None:
        super().__init__()
        parent, leaf = _parent(module, head)
        classifier = getattr(parent, leaf)
        self._features_only = False
        setattr(parent, leaf, _HeadSlot(self))
        self.body = module
        self.head = classifier
        self.head_name = head
        self.num_classes = num_classes
        self.num_features = num_features

    def forward_features(self, x: Tensor) -> Tensor:
        self._features_only = True
        try:
            return self.body(x)
        finally:
            self._features_only = False

    @contextlib.contextmanager
    def whole(self) -> Iterator[nn.Module]:
        """The user's module as they built it, its head back in place, for the duration (a LightningModule's
        ``configure_optimizers`` and ``training_step`` then see every parameter, ``self.parameters()`` included)."""
        parent, leaf = _parent(self.body, self.head_name)
        slot = parent._modules[leaf]
        parent._modules[leaf] = self.head
        try:
            yield self.body
        finally:
            parent._modules[leaf] = slot

    @property
    def lightning_module(self) -> nn.Module | None:
        """The user's module when it is a ``LightningModule`` (its ``training_step`` and ``configure_optimizers``
        then drive local training), else ``None``."""
        return self.body if is_lightning_module(self.body) else None


def is_lightning_module(module: Any) -> bool:
    """Whether ``module`` is a ``lightning.pytorch`` (or ``pytorch_lightning``) LightningModule; never imports
    Lightning (a module of that class has imported it already)."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        pkg = sys.modules.get(name)
        if pkg is not None and isinstance(module, pkg.LightningModule):
            return True
    return False


def import_class(class_path: str) -> type[nn.Module]:
    """The class at a dotted import path (``package.module.Class``)."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ModelSpecError(f"model.class_path {class_path!r}: expected a dotted import path such as "
                             "'mypkg.nets.MyNet'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"model.class_path {class_path!r}: cannot import {module_name!r} ({err}); is the "
                             "package installed or on PYTHONPATH?") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ModelSpecError(f"model.class_path {class_path!r}: module {module_name!r} has no {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSpecError(f"model.class_path {class_path!r} is not a torch.nn.Module subclass")
    return cls


def constructor_args(cls: type[nn.Module], init_args: dict[str, Any], data_args: dict[str, Any]) -> dict[str, Any]:
    """``init_args`` plus the data's ``num_classes`` / ``in_channels`` / ``image_size`` where the constructor
    takes them and ``init_args`` leaves them out; an argument the constructor does not take names the valid ones."""
    params = inspect.signature(cls.__init__).parameters
    named = {k: p for k, p in params.items() if k != "self"
             and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(init_args) - set(named))
    if unknown and not takes_any:
        raise ModelSpecError(f"model {cls.__qualname__} has no argument {', '.join(map(repr, unknown))} "
                             f"(model.init_args); valid: {', '.join(named) or 'none'}")
    args = {k: v for k, v in data_args.items() if k in named and k not in init_args}
    args.update(init_args)
    missing = [k for k, p in named.items() if p.default is inspect.Parameter.empty and k not in args]
    if missing:
        raise ModelSpecError(f"model {cls.__qualname__} needs {', '.join(map(repr, missing))}; set "
                             f"{', '.join('model.init_args.' + k for k in missing)}")
    return args


def build_user_model(class_path: str, init_args: dict[str, Any], head: str, num_classes: int, in_channels: int,
                     image_size: int) -> UserModel:
    """Imports, builds and splits a user's module (see the module docstring); raises :class:`ModelSpecError`."""
    cls = import_class(class_path)
    data_args = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        module = cls(**constructor_args(cls, init_args, data_args))
    except (TypeError, ValueError) as err:
        raise ModelSpecError(f"model {class_path}({_args_text(init_args)}) failed: {err}") from None
    try:
        parent, leaf = _parent(module, head)
        classifier = getattr(parent, leaf)
    except AttributeError:
        children = ", ".join(name for name, _ in module.named_children()) or "none"
        raise ModelSpecError(f"model.head {head!r}: {cls.__qualname__} has no submodule {head!r} (its submodules: "
                             f"{children}); name the classifier that produces the logits") from None
    if not isinstance(classifier, nn.Module):
        raise ModelSpecError(f"model.head {head!r} of {cls.__qualname__} is not an nn.Module")
    num_features = _check_split(module, classifier, head, cls.__qualname__, num_classes, in_channels, image_size)
    return UserModel(module, head, num_classes, num_features)


def _check_split(module: nn.Module, classifier: nn.Module, head: str, name: str, num_classes: int,
                 in_channels: int, image_size: int) -> int:
    """Runs one example batch through the module with and without its head; returns the feature size."""
    x = torch.zeros(2, in_channels, image_size, image_size)
    seen: list[Tensor] = []
    handle = classifier.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = module(x)
    except Exception as err:  # the user's forward cannot take this data's images: their model, not a fedlt bug
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSpecError(f"{name}.forward fails on an example batch of this data's images, shape "
                             f"{tuple(x.shape)} ({type(err).__name__}: {first}); check its input channels and "
                             "image size against the data") from None
    finally:
        handle.remove()
        module.train(was_training)
    if len(seen) != 1:
        raise ModelSpecError(f"model.head {head!r}: {name}.forward calls it {len(seen)} times on one batch; the head "
                             "must be applied once, last")
    features = seen[0]
    if not isinstance(logits, Tensor) or logits.shape != (2, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ModelSpecError(f"{name}.forward returns {shape} for a batch of 2; expected (2, {num_classes}) logits "
                             "(num_classes of the data)")
    if features.dim() != 2:
        raise ModelSpecError(f"model.head {head!r} of {name} receives a tensor of shape {tuple(features.shape)}; "
                             "the head must take (batch, features): flatten before it, or name a head that does")
    with torch.no_grad():
        again = classifier(features)
    if again.shape != logits.shape or not torch.equal(again, logits):
        raise ModelSpecError(f"{name}.forward changes the output after model.head {head!r}; the head must be the "
                             "last step, so that forward(x) == head(features(x))")
    return int(features.shape[1])


def _parent(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    parent = module
    for part in path:
        parent = getattr(parent, part)
    if not hasattr(parent, leaf):
        raise AttributeError(dotted)
    return parent, leaf


def _args_text(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
