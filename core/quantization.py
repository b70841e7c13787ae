"""What a quantization method plugin is (hook: ``register_quantization_methods``)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class QuantizationMethod(ABC):
    name: str = ""
    priority: int = 0

    @classmethod
    def supports(cls, **_: object) -> bool:
        return True

    @abstractmethod
    def quantize_model(self, model: nn.Module) -> nn.Module:
        """Replace the linear layers this method handles; return the model."""
