"""Blockwise absmax NormalFloat NF-k quantization (ALGORITHMS.md §1.1, §1.2).

    W (out × in) → row-major blocks of B0 values;  s1_b = max |w| over block b
    code = nearest NF level of w / s1'_b,          ŵ = level[code] · s1'_b

``s1'`` are the stored scales: s1 itself (``scale_bits=None``) or its double-quantized form.
"""

from __future__ import annotations

import torch

from lorq.config import QuantConfig
from lorq.quant.codebook import nf_grid
from lorq.quant.double_quant import quantize_scales, round_up_to_dtype
from lorq.quant.packing import pack_blocks
from lorq.quant.tensor import QuantizedTensor, block_range, check_weight, storage_dtype


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x, with 0 where x == 0 (an all-zero block quantizes to code 0 / level 0)."""
    return torch.where(x != 0, 1.0 / x, torch.zeros_like(x))


def quantize_nf(weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Quantize a 2-D float ``weight`` to NF-``config.bits``; ``numel`` must be a multiple of B0."""
    check_weight(weight)
    if weight.numel() % config.block_size:
        raise ValueError(
            f"block_size={config.block_size} does not divide the matrix of shape "
            f"{tuple(weight.shape)} ({weight.numel()} values); choose a block_size that divides it"
        )
    blocks = weight.detach().reshape(-1, config.block_size)
    low, high = block_range(blocks)
    absmax = torch.maximum(-low, high)
    if config.double_quant:
        assert config.scale_bits is not None
        scales = quantize_scales(
            absmax, config.scale_bits, config.scale_block_size, config.super_scale_dtype
        )
        used = scales.dequantize()
    else:
        scales = round_up_to_dtype(absmax, storage_dtype(config.scale_dtype), "scale_dtype")
        used = scales.float()
    inverse = safe_reciprocal(used)
    grid = nf_grid(config.bits)

    def encode(values: torch.Tensor, rows: slice) -> torch.Tensor:
        return grid.codes(values * inverse[rows, None])

    codes = pack_blocks(blocks, config.bits, encode)
    return QuantizedTensor(config, (weight.shape[0], weight.shape[1]), codes, scales)
