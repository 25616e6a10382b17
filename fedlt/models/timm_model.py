"""Any timm backbone behind the FedModel features/head split (``build_model("timm:<name>", ...)``).

timm is imported inside the constructor: importing it costs seconds and most runs use the built-in models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.registry import UnknownNameError


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights of a timm model could not be downloaded or loaded (docs/architecture.md section 8)."""

    def __init__(self, model_name: str, cause: BaseException, checkpoint_path: str | Path | None = None) -> None:
        if checkpoint_path is not None:
            where = f"could not be loaded from checkpoint_path {str(checkpoint_path)!r}"
        else:
            where = "could not be downloaded (no internet access, or HF_HUB_OFFLINE=1 and not in the local cache)"
        super().__init__(
            f"pretrained weights for timm model {model_name!r} {where}: {type(cause).__name__}: {cause}. "
            "To fix it: connect to the internet once so that the weights are cached; or point HF_HOME to a "
            "Hugging Face cache that already holds them; or pass a local weights file with "
            "`checkpoint_path: /path/to/weights.safetensors` (model kwargs); or train from scratch with "
            "`pretrained: false`."
        )
        self.model_name = model_name


class TimmModel(FedModel):
    """A timm model without its classifier (``num_classes=0``) as feature extractor plus a fresh linear head.

    Args:
        model_name: timm model name (see ``timm.list_models()``), without the ``timm:`` prefix.
        num_classes: C.
        in_channels: input channels (timm adapts the stem, also of pretrained weights).
        image_size: input side length; not forwarded (most timm CNNs take any size). Pass ``img_size`` in
            ``kwargs`` for models with a fixed input size such as ViTs.
        pretrained: load pretrained weights (from the Hugging Face cache / hub, or ``checkpoint_path``).
        checkpoint_path: local weights file; implies loading pretrained weights from it instead of the hub.
        **kwargs: forwarded to ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).

    Raises:
        UnknownNameError: timm does not know ``model_name``.
        PretrainedWeightsUnavailable: weights were requested but could not be fetched or read.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        pretrained: bool = False,
        checkpoint_path: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.image_size = image_size
        self.backbone = _create_backbone(model_name, in_channels, pretrained, checkpoint_path, kwargs)
        num_features = self.backbone.num_features  # every timm model sets it: the size of its pooled features
        assert isinstance(num_features, int)
        self.num_features = num_features
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled pre-logit features (B, num_features) of the timm model."""
        return self.backbone(x)


def _create_backbone(
    model_name: str, in_channels: int, pretrained: bool, checkpoint_path: str | Path | None, kwargs: dict[str, Any]
) -> nn.Module:
    """Creates the timm model with its classifier removed, turning download failures into a clear error."""
    import timm

    if not timm.is_model(model_name):
        similar = timm.list_models(f"*{model_name}*")[:10]
        hint = f"; similar names: {', '.join(similar)}" if similar else ""
        raise UnknownNameError(f"unknown timm model {model_name!r}; see timm.list_models(){hint}")
    load_weights = pretrained or checkpoint_path is not None
    if checkpoint_path is not None:
        # timm resolves a pretrained_cfg "file" before the hub, and drops the checkpoint's classifier since
        # num_classes=0 differs from the checkpoint's class count.
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"file": str(checkpoint_path)}}
    try:
        return timm.create_model(model_name, pretrained=load_weights, num_classes=0, in_chans=in_channels, **kwargs)
    except OSError as err:  # hub / URL / file errors (LocalEntryNotFoundError, URLError, FileNotFoundError, ...)
        if not load_weights:
            raise
        raise PretrainedWeightsUnavailable(model_name, err, checkpoint_path) from err
