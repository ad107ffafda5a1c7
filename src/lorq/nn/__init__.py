"""nn.Module layers: the only place with nn.Module subclasses."""

from lorq.nn.lora_linear import QuantLoraLinear

__all__ = ["QuantLoraLinear"]
