"""The backbone contract shared by every model: a feature extractor and a replaceable linear head.

docs/architecture.md section 2: methods work on the features/head split (FedLoGe's SSE-C and personal heads, RedGrape's
decoupled classifier, FedPuReL's residual head, ...), so every backbone exposes it the same way.
"""

from __future__ import annotations

import abc

from torch import Tensor, nn


class FedModel(nn.Module, abc.ABC):
    """Base class of all fedlt backbones: ``forward(x) = head(forward_features(x))``.

    Contract for subclasses:

    * set ``self.num_features`` (d, the feature dimension) and ``self.num_classes`` (C);
    * implement :meth:`forward_features` mapping an input batch to features of shape (B, d);
    * build ``self.head = nn.Linear(d, C)`` *after* the feature layers, so that parameter initialisation under
      a fixed seed follows the usual layer order.

    Contract for methods: a method may replace ``head`` (any module mapping (B, d) to (B, C), e.g. a fixed
    SSE-C classifier) or wrap it, but must keep the attribute name, so that the state-dict keys of the classifier
    are exactly those starting with ``"head."`` and everything else belongs to the feature extractor. Parameter
    policies (shared vs personal keys) rely on this prefix.
    """

    num_features: int
    num_classes: int
    head: nn.Module

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """Maps an input batch to features h = f_theta(x) of shape (B, num_features)."""

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) = head(forward_features(x))."""
        return self.head(self.forward_features(x))

    def head_state_keys(self) -> list[str]:
        """State-dict keys of the classifier (those starting with ``"head."``)."""
        return [key for key in self.state_dict() if key.startswith("head.")]
