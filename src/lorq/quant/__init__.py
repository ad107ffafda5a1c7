"""Quantizers: Tensor → QuantizedTensor, pure functions (ALGORITHMS.md §1)."""

from __future__ import annotations

import torch

from lorq.config import QuantConfig
from lorq.quant.affine import quantize_int
from lorq.quant.normal_float import quantize_nf
from lorq.quant.tensor import QuantizedTensor


def quantize(weight: torch.Tensor, config: QuantConfig | str) -> QuantizedTensor:
    """Quantize a 2-D float ``weight`` (out × in) with a QuantConfig or a preset name."""
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    if config.format == "nf":
        return quantize_nf(weight, config)
    return quantize_int(weight, config)


__all__ = ["QuantConfig", "QuantizedTensor", "quantize"]
