"""Affine INT-k group-wise quantization, round to nearest (ALGORITHMS.md §1.3).

Per output row, groups of G consecutive input features (G = ``block_size``, in % G == 0):

    scale = (max - min) / (2^k - 1)                       stored in scale_dtype (fp16 default)
    int zero (GPTQ):    min ≤ 0 ≤ max enforced, zero = round(-min / scale) ∈ [0, 2^k - 1]
                        code = clamp(round(w / scale) + zero),   ŵ = scale · (code - zero)
    float min (Q4_1):   m = min stored in scale_dtype
                        code = clamp(round((w - m) / scale)),    ŵ = scale · code + m

Codes are computed from the *stored* (rounded) scale and min, so they are optimal for what is
decoded. ``affine_params`` / ``affine_codes`` are shared with GPTQ rounding.
"""

from __future__ import annotations

import torch

from lorq.config import QuantConfig
from lorq.quant.double_quant import round_up_to_dtype
from lorq.quant.normal_float import safe_reciprocal
from lorq.quant.packing import pack, pack_blocks
from lorq.quant.tensor import QuantizedTensor, block_range, check_weight, storage_dtype


def affine_params(
    groups: torch.Tensor, bits: int, zero: str, scale_dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored scale and zero (integer-valued) or min of each group; groups: (num_groups, G).

    Returns ``(scale, zero_or_min)`` as float32 tensors of shape (num_groups,) holding exactly the
    values that will be stored.
    """
    low, high = block_range(groups)
    maxq = 2**bits - 1
    if zero == "int":
        low, high = low.clamp(max=0), high.clamp(min=0)
    dtype = storage_dtype(scale_dtype)
    scale = round_up_to_dtype((high - low) / maxq, dtype, "scale_dtype").float()
    if zero == "int":
        return scale, torch.round(-low * safe_reciprocal(scale)).clamp_(0, maxq)
    return scale, low.to(dtype).float()


def affine_codes(
    values: torch.Tensor, scale: torch.Tensor, zero_or_min: torch.Tensor, bits: int, zero: str
) -> torch.Tensor:
    """uint8 codes of ``values`` (…, G) for per-group ``scale``/``zero_or_min`` of shape (…, 1)."""
    inverse = safe_reciprocal(scale)
    if zero == "int":
        codes = torch.round(values * inverse) + zero_or_min
    else:
        codes = torch.round((values - zero_or_min) * inverse)
    return codes.clamp_(0, 2**bits - 1).to(torch.uint8)


def check_groups(weight: torch.Tensor, group_size: int) -> None:
    if weight.shape[1] % group_size:
        raise ValueError(
            f"block_size={group_size} does not divide in_features={weight.shape[1]} of the matrix "
            f"of shape {tuple(weight.shape)}; choose a group size that divides in_features"
        )


def pack_zeros(zero_or_min: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Stored form of zeros: k-bit packed integers, or mins in ``scale_dtype``."""
    if config.zero == "int":
        return pack(zero_or_min.to(torch.uint8), config.bits)
    return zero_or_min.to(storage_dtype(config.scale_dtype))


def quantize_int(weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Round-to-nearest group-wise INT-``config.bits`` quantization of a 2-D float ``weight``."""
    check_weight(weight)
    check_groups(weight, config.block_size)
    groups = weight.detach().reshape(-1, config.block_size)
    scale, zero_or_min = affine_params(
        groups, config.bits, config.zero, config.scale_dtype or "fp16"
    )

    def encode(values: torch.Tensor, rows: slice) -> torch.Tensor:
        return affine_codes(
            values, scale[rows, None], zero_or_min[rows, None], config.bits, config.zero
        )

    codes = pack_blocks(groups, config.bits, encode)
    return QuantizedTensor(
        config,
        (weight.shape[0], weight.shape[1]),
        codes,
        scale.to(storage_dtype(config.scale_dtype)),
        pack_zeros(zero_or_min, config),
    )
