"""Private helpers of the CLIP methods (FedPuReL, FedSM, PromptFL, PromptFolio, CLIP2FL, zero-shot CLIP)."""

from __future__ import annotations

from typing import Any

from torch import nn


def require_clip(model: nn.Module, method: str) -> Any:
    """Returns ``model`` as a :class:`fedlt.models.clip.ClipModel`, or raises a ValueError saying how to configure one.

    Args:
        model: the workspace model handed to ``setup``.
        method: the method's name for the message.
    """
    from fedlt.models.clip import ClipModel

    if not isinstance(model, ClipModel):
        raise ValueError(f"{method} fine-tunes a CLIP model: set model.name to 'clip:<open_clip model>' (e.g. "
                         f"clip:ViT-B-16 with pretrained: true, or clip:fedlt-tiny-clip offline); got "
                         f"{type(model).__name__}")
    return model
