"""Linear layers as lorq sees them: weight W (out × in), whatever the storage.

A linear layer is an ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored in × out) or a plain
:class:`~lorq.nn.QuantLinear` (frozen packed Q, no adapter: e.g. a Q4_1 layer of a GGUF file
loaded packed), whose W is its dequantized Q, decoded when asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from lorq.nn.quant_linear import QuantLinear


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in × out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_packed_linear(module: nn.Module) -> bool:
    """A frozen QuantLinear without an adapter: a linear layer whose W is stored packed."""
    return isinstance(module, QuantLinear) and not module.has_lora


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_packed_linear(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out × in): a view of a dense layer's weight (Conv1D transposed),
    a freshly dequantized float32 tensor for a packed one."""
    if is_packed_linear(module):
        return module.q.dequantize()
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, without decoding a packed one."""
    if isinstance(module, QuantLinear):
        return module.shape
    shape = module.weight.shape
    return (shape[1], shape[0]) if is_conv1d(module) else (shape[0], shape[1])


def device_of(module: nn.Module) -> torch.device:
    """Where a linear layer's weight lives (its packed buffers for a QuantLinear)."""
    return next(iter((*module.parameters(), *module.buffers()))).device
