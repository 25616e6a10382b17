"""ResNets for small images: He et al. 2016's CIFAR ResNet-6n+2 and CIFAR variants of ResNet-18/34.

Both families use BasicBlocks with a 1x1 convolution + BatchNorm ("option B") shortcut where the shape changes,
a 3x3 stride-1 stem without max-pool, and global average pooling, so they work for any input channel count
and any image side >= 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.models.base import FedModel
from fedlt.models.registry import MODELS, no_pretrained_weights

MIN_IMAGE_SIZE = 8


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)) (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Option B: a learned projection, so any channel count / stride change is supported.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(FedModel):
    """Stem conv3x3 + BN + ReLU, stages of BasicBlocks (the first at stride 1, the others at stride 2), GAP.

    Args:
        num_classes: C.
        blocks: number of BasicBlocks per stage.
        widths: channels per stage; ``num_features`` is the last one.
        in_channels: input channels.
        stem_width: output channels of the stem convolution.
    """

    def __init__(
        self, num_classes: int, blocks: Sequence[int], widths: Sequence[int], in_channels: int = 3, stem_width: int = 16
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks and widths need one entry per stage, got {list(blocks)} and {list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        stages: list[nn.Module] = []
        in_planes = stem_width
        for index, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            first_stride = 1 if index == 0 else 2
            strides = [first_stride] + [1] * (n - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.num_classes = num_classes
        self.head = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions (He et al. 2015, fan-out as in torchvision), BN at identity."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Globally average-pooled features (B, num_features)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.pool(out).flatten(1)


class ProjectedCifarResNet(CifarResNet):
    """A :class:`CifarResNet` whose pooled features pass through a linear projection without activation.

    FedSM's prototype code (docs/reference.md Appendix R S17): "ResNet-8, scaling 4" (64-channel stem, stages 64/128/256
    with one BasicBlock each) pooled to 256-d, then a 256 -> 512 linear layer ("add_mlp") giving the 512-d
    feature that the classifier, the prototypes and the pseudo-features live in.

    Args:
        proj_dim: output size of the projection (``num_features``).
        **kwargs: arguments of :class:`CifarResNet`.
    """

    def __init__(self, num_classes: int, blocks: Sequence[int], widths: Sequence[int], in_channels: int = 3,
                 stem_width: int = 16, proj_dim: int = 512) -> None:
        super().__init__(num_classes, blocks, widths, in_channels, stem_width)
        self.proj = nn.Linear(self.num_features, proj_dim)
        self.num_features = proj_dim
        self.head = nn.Linear(proj_dim, num_classes)  # rebuilt after the projection (FedModel layer order)

    def forward_features(self, x: Tensor) -> Tensor:
        """Projected pooled features (B, proj_dim)."""
        return self.proj(super().forward_features(x))


def _check_image_size(name: str, image_size: int) -> None:
    """Three stride-2 stages would shrink a side below 1 pixel for images smaller than 8."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"{name} needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet of depth 6n+2: 16/32/64 channels, n BasicBlocks per stage.

    Raises:
        ValueError: if ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(num_classes, [n, n, n], [16, 32, 64], in_channels, stem_width=16)


def _register_he(depth: int) -> None:
    """Registers ``resnet{depth}`` (He et al. CIFAR family)."""
    name = f"resnet{depth}"

    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> FedModel:
        no_pretrained_weights(name, pretrained)
        _check_image_size(name, image_size)
        return cifar_resnet(depth, num_classes, in_channels)

    build.__doc__ = f"Registry builder for the CIFAR ResNet-{depth} of He et al. 2016 (num_features 64)."
    MODELS.register(name)(build)


def _register_imagenet_style(name: str, blocks: Sequence[int]) -> None:
    """Registers a CIFAR variant of an ImageNet ResNet (64..512 channels, 3x3 stem, no max-pool)."""

    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> FedModel:
        no_pretrained_weights(name, pretrained)
        _check_image_size(name, image_size)
        return CifarResNet(num_classes, blocks, [64, 128, 256, 512], in_channels, stem_width=64)

    build.__doc__ = f"Registry builder for the CIFAR variant of {name} (blocks {list(blocks)}, num_features 512)."
    MODELS.register(name)(build)


@MODELS.register("resnet8_fedsm")
def build_resnet8_fedsm(num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False,
                        proj_dim: int = 512) -> FedModel:
    """FedSM's CIFAR backbone: ResNet-8 with widths x4 (64/128/256) and a 256 -> ``proj_dim`` projection."""
    no_pretrained_weights("resnet8_fedsm", pretrained)
    _check_image_size("resnet8_fedsm", image_size)
    return ProjectedCifarResNet(num_classes, [1, 1, 1], [64, 128, 256], in_channels, stem_width=64,
                                proj_dim=proj_dim)


for _depth in (8, 20, 32, 56):
    _register_he(_depth)
_register_imagenet_style("resnet18", (2, 2, 2, 2))
_register_imagenet_style("resnet34", (3, 4, 6, 3))
