"""Model registry and the single entry point :func:`build_model`.

Registered builders share one signature ``(num_classes, in_channels, image_size, pretrained)``, followed by their
model-specific keyword options (with defaults); names of the form ``"timm:<timm model name>"`` are resolved by
:class:`~fedlt.models.timm_model.TimmModel` instead.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedlt.models.base import FedModel
from fedlt.registry import Registry, UnknownNameError

TIMM_PREFIX = "timm:"
CLIP_PREFIX = "clip:"


class ModelBuilder(Protocol):
    """Signature of a registered model builder.

    A builder may take model-specific keyword options after these (each with a default, e.g. ``hidden`` of
    ``mlp``); :func:`build_model` checks ``model.kwargs`` against its signature before forwarding them.
    """

    def __call__(
        self, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False
    ) -> FedModel:
        """Builds the model."""
        ...


MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    pretrained: bool = False,
    class_names: list[str] | None = None,
    dataset: str | None = None,
    **kwargs: Any,
) -> FedModel:
    """Builds a registered backbone, any timm model (``"timm:<name>"``) or an open_clip model (``"clip:<name>"``).

    Args:
        name: a registered name (see ``MODELS.names()``) or ``"timm:<timm model name>"``.
        num_classes: C, the output size of the linear head.
        in_channels: input channels (1 for MNIST-like data, 3 for RGB).
        image_size: input side length in pixels (models with a flatten layer need it).
        pretrained: load pretrained feature-extractor weights (only timm models have them).
        class_names: the class names (CLIP models build their text classifier from them; others ignore them).
        dataset: the data source's name (CLIP models pick their zero-shot prompt templates by it).
        **kwargs: model-specific options (e.g. ``hidden`` for ``mlp``, ``checkpoint_path`` for timm, ``peft`` for
            CLIP; see :class:`fedlt.models.clip.ClipModel`).

    Returns:
        The model, with a freshly initialised ``head``.

    Raises:
        UnknownNameError: the name is neither registered nor a timm model; the message lists the valid names.
        ValueError: a registered model without pretrained weights was asked for ``pretrained=True``.
    """
    if name.lower().startswith(TIMM_PREFIX):
        # Imported here because importing timm costs seconds, and most runs never use it.
        from fedlt.models.timm_model import TimmModel

        return TimmModel(name[len(TIMM_PREFIX) :], num_classes, in_channels, image_size, pretrained, **kwargs)
    if name.lower().startswith(CLIP_PREFIX):
        from fedlt.models.clip import ClipModel, build_clip

        _check_kwargs(ClipModel, name, kwargs)
        return build_clip(name[len(CLIP_PREFIX) :], num_classes, in_channels, image_size, pretrained,
                          class_names=class_names, dataset=dataset, **kwargs)
    try:
        builder = MODELS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; or '{TIMM_PREFIX}<timm model name>' for any timm model, or "
                               f"'{CLIP_PREFIX}<open_clip model name>' for CLIP") from None
    _check_kwargs(builder, name, kwargs)
    return builder(num_classes, in_channels=in_channels, image_size=image_size, pretrained=pretrained, **kwargs)


def _check_kwargs(builder: Any, name: str, kwargs: dict[str, Any]) -> None:
    """An unknown ``model.kwargs`` key is a user error naming the valid ones (not a TypeError traceback)."""
    import inspect

    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    fixed = {"num_classes", "in_channels", "image_size", "pretrained", "class_names", "dataset", "name",
             "model_name"}
    valid = sorted(k for k, p in params.items() if k not in fixed and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} has no argument {', '.join(map(repr, unknown))} (model.kwargs); valid: "
                         f"{', '.join(valid) or 'none'}")


def no_pretrained_weights(name: str, pretrained: bool) -> None:
    """Raises ValueError when ``pretrained`` is requested for a model trained from scratch only.

    Silently ignoring the flag would report a from-scratch run as a pretrained one.
    """
    if pretrained:
        raise ValueError(
            f"model {name!r} has no pretrained weights; use pretrained: false, or a '{TIMM_PREFIX}<name>' model"
        )
