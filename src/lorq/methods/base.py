"""What a method receives and returns.

Target      one matrix W (out × in) of the source model: its module (nn.Linear, GPT-2
            Conv1D or a packed QuantLinear), its planned QuantConfig, H (in × in) and
            F (out × in) when the config needs them, and a precomputed Q when one is given
Compressed  the layer that replaces the module, and ‖W − Ŵ‖ / ‖W‖ of what it computes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.quant import QuantConfig, QuantizedTensor


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    quant: QuantConfig
    hessian: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    given: QuantizedTensor | None = None  # a precomputed Q (qa-lora's base)


@dataclass(frozen=True)
class Compressed:
    layer: nn.Module
    error: float


class Method(Protocol):
    def compress(self, target: Target, config: CompressConfig) -> Compressed:
        """The layer replacing ``target.module`` (on the module's device)."""
        ...
