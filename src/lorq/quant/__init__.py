"""Quantization formats: Tensor → QuantizedTensor, pure functions (docs/algorithms.md §1).

Each format is one unit (``quant/<family>.py``: its config type, quantize, decode, buffers, byte
count, nominal bits, presets and identity in other tools' files), registered by importing it
here. ``format_of(config)`` finds a config's format; ``presets()`` lists every named preset.
"""

from __future__ import annotations

import torch

# registry lines: one import per format family, in the order `lorq presets` lists them
from lorq.quant import normal_float  # noqa: F401  isort: skip
from lorq.quant import affine  # noqa: F401  isort: skip
from lorq.quant import ggml  # noqa: F401  isort: skip
from lorq.quant import bnb  # noqa: F401  isort: skip
from lorq.quant.affine import AffineConfig, FloatMinConfig, IntConfig
from lorq.quant.base import (
    QuantConfig,
    QuantFormat,
    as_config,
    format_of,
    formats,
    preset,
    presets,
    register_format,
)
from lorq.quant.bnb import BnbConfig
from lorq.quant.ggml import GGMLConfig
from lorq.quant.normal_float import NFConfig
from lorq.quant.tensor import QuantizedTensor


def quantize(weight: torch.Tensor, config: QuantConfig | str) -> QuantizedTensor:
    """Quantize a 2-D float ``weight`` (out × in) with a QuantConfig or a preset name."""
    config = as_config(config)
    return format_of(config).quantize(weight, config)


__all__ = [
    "AffineConfig",
    "BnbConfig",
    "FloatMinConfig",
    "GGMLConfig",
    "IntConfig",
    "NFConfig",
    "QuantConfig",
    "QuantFormat",
    "QuantizedTensor",
    "as_config",
    "format_of",
    "formats",
    "preset",
    "presets",
    "quantize",
    "register_format",
]
