"""The FedAvg CNN of McMahan et al. 2017, the small CNN of most federated benchmarks.

Reference: "Communication-Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.models.registry import MODELS, no_pretrained_weights


class CNN(FedModel):
    """conv5x5(32) - pool - conv5x5(64) - pool - fc(512) features and a linear head.

    With 3 input channels, 32x32 images and 10 classes it has exactly 2,156,490 parameters.

    Args:
        num_classes: C.
        in_channels: input channels.
        image_size: input side length; must be at least 4 (two 2x2 max-pools).
        channels: output channels of the two convolutions.
        hidden: width of the fully connected layer (= num_features).
        norm: ``"none"`` (McMahan et al.) or ``"batch"``: BatchNorm after each convolution and after the fully
            connected layer, as in the CNN of the FedBN paper (Li et al., ICLR 2021). With ``"batch"`` the layer
            order (and so the seeded initialisation) differs from the plain CNN.
    """

    stackable_forward = True  # per-sample layers only: vectorized cohorts run it on stacked client weights

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"cnn norm must be 'none' or 'batch', got {norm!r}")
        if len(channels) != 2:
            raise ValueError(f"cnn needs two conv widths in channels, got {list(channels)}")
        if image_size < 4:
            raise ValueError(f"cnn needs image_size >= 4 (two 2x2 max-pools), got {image_size}")
        c1, c2 = channels
        side = image_size // 4  # each MaxPool2d(2) floors the side length
        # Built in the order conv1, conv2, fc, head so that a fixed seed gives the same weights as the
        # equivalent nn.Sequential (tested): initialisation consumes the RNG in construction order.
        def bn(layer: nn.Module, width: int, two_d: bool) -> list[nn.Module]:
            if norm == "none":
                return [layer]
            return [layer, nn.BatchNorm2d(width) if two_d else nn.BatchNorm1d(width)]

        self.features = nn.Sequential(
            *bn(nn.Conv2d(in_channels, c1, 5, padding=2), c1, True),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *bn(nn.Conv2d(c1, c2, 5, padding=2), c2, True),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            *bn(nn.Linear(c2 * side * side, hidden), hidden, False),
            nn.ReLU(),
        )
        self.num_features = hidden
        self.num_classes = num_classes
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Features (B, hidden)."""
        return self.features(x)


@MODELS.register("cnn")
def build_cnn(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    pretrained: bool = False,
    channels: Sequence[int] = (32, 64),
    hidden: int = 512,
    norm: str = "none",
) -> CNN:
    """Registry builder for :class:`CNN` (``channels`` and ``hidden`` shrink it; ``norm: batch`` adds BN)."""
    no_pretrained_weights("cnn", pretrained)
    return CNN(num_classes, in_channels, image_size, channels, hidden, norm)
