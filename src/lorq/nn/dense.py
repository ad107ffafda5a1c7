"""Dense linear layers as lorq sees them: weight (out × in), whatever the storage layout."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in × out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out × in), whatever its storage layout (Conv1D is transposed)."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight
