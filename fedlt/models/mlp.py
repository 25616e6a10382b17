"""A one-hidden-layer perceptron on flattened inputs (quick tests and embedded / tabular data)."""

from __future__ import annotations

from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.models.registry import MODELS, no_pretrained_weights


class MLP(FedModel):
    """features = ReLU(Linear(in_features, hidden)(x.flatten(1))), head = Linear(hidden, C).

    Args:
        num_classes: C.
        in_features: input dimension after flattening.
        hidden: hidden width (= num_features).
    """

    stackable_forward = True  # per-sample layers only: vectorized cohorts run it on stacked client weights

    def __init__(self, num_classes: int, in_features: int, hidden: int = 128) -> None:
        super().__init__()
        # fc before head: with a fixed seed this initialises like nn.Sequential(fc, ReLU, head) (tested).
        self.fc = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.num_features = hidden
        self.num_classes = num_classes
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Features (B, hidden) of the flattened input."""
        return self.act(self.fc(x.flatten(1)))


@MODELS.register("mlp")
def build_mlp(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    pretrained: bool = False,
    in_features: int | None = None,
    hidden: int = 128,
) -> MLP:
    """Registry builder for :class:`MLP`; ``in_features`` defaults to in_channels * image_size**2."""
    no_pretrained_weights("mlp", pretrained)
    dim = in_features if in_features is not None else in_channels * image_size**2
    return MLP(num_classes, dim, hidden)
