"""Backbones with a features/head split (docs/architecture.md section 2) and the model registry.

Importing this package registers every built-in model in :data:`MODELS`.
"""

from __future__ import annotations

from fedlt.models.base import FedModel
from fedlt.models.cnn import CNN, build_cnn
from fedlt.models.mlp import MLP, build_mlp
from fedlt.models.registry import MODELS, TIMM_PREFIX, ModelBuilder, build_model
from fedlt.models.resnet_cifar import BasicBlock, CifarResNet, cifar_resnet
from fedlt.models.timm_model import PretrainedWeightsUnavailable, TimmModel

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "TIMM_PREFIX",
    "BasicBlock",
    "CifarResNet",
    "FedModel",
    "ModelBuilder",
    "PretrainedWeightsUnavailable",
    "TimmModel",
    "build_cnn",
    "build_mlp",
    "build_model",
    "cifar_resnet",
]
