"""Accuracy metrics: pure count math (functional) and torchmetrics classes (classification)."""

from __future__ import annotations

from fedlt.metrics.classification import GroupedAccuracy, PersonalizedAccuracy
from fedlt.metrics.functional import (
    BALANCEDNESS_KINDS,
    DEFAULT_BALANCEDNESS,
    GROUP_NAMES,
    balancedness,
    classification_summary,
    per_class_accuracy,
    personal_summary,
)

__all__ = [
    "BALANCEDNESS_KINDS",
    "DEFAULT_BALANCEDNESS",
    "GROUP_NAMES",
    "GroupedAccuracy",
    "PersonalizedAccuracy",
    "balancedness",
    "classification_summary",
    "per_class_accuracy",
    "personal_summary",
]
