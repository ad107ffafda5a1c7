"""Second-level quantization of the NF block scales (LQ-LoRA, docs/algorithms.md §1.2).

    offset = min(s1)                                   one fp32 scalar per matrix
    s2     = s1 - offset                               ≥ 0, shape (n_scales,)
    m_j    = max(s2 over super-block j of B1 scales)   stored in b1 (fp16 / bf16 / fp32)
    code   = round(s2 · (2^b0 - 1) / m_j)              unsigned b0-bit, bit-packed
    s1'    = offset + code · m_j / (2^b0 - 1)          the scales used to quantize and dequantize W

The last super-block may be partial. Storage: b0 bits per scale + bits(b1) per B1 scales + 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorq.quant.base import TORCH_FLOAT, round_up_to_dtype
from lorq.quant.packing import pack, unpack


@dataclass(frozen=True, eq=False)
class QuantizedScales:
    """Double-quantized scales: packed ``codes``, ``super_scales`` (b1), fp32 ``offset`` (1,)."""

    codes: torch.Tensor
    super_scales: torch.Tensor
    offset: torch.Tensor
    bits: int
    block_size: int
    numel: int

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.codes, self.super_scales, self.offset)
        )

    def dequantize(self) -> torch.Tensor:
        """The scales s1' as float32, shape (numel,)."""
        codes = unpack(self.codes, self.bits, self.numel).float()
        step = self.super_scales.float() / (2**self.bits - 1)
        step = step.repeat_interleave(self.block_size)[: self.numel]
        return self.offset.float() + codes * step

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "super_scales": self.super_scales, "offset": self.offset}


def quantize_scales(
    scales: torch.Tensor, bits: int, block_size: int, super_scale_dtype: str
) -> QuantizedScales:
    """Quantize fp32 scales ``s1`` (shape (n,)) as above."""
    scales = scales.float().reshape(-1)
    n = scales.numel()
    offset = scales.min().reshape(1)
    shifted = scales - offset
    pad = (-n) % block_size
    padded = torch.cat([shifted, shifted.new_zeros(pad)]) if pad else shifted
    maxima = padded.view(-1, block_size).amax(1)
    super_scales = round_up_to_dtype(maxima, TORCH_FLOAT[super_scale_dtype], "super_scale_dtype")
    levels = 2**bits - 1
    step = super_scales.float() / levels
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    codes = torch.round(padded.view(-1, block_size) * inv[:, None]).clamp_(0, levels)
    packed = pack(codes.reshape(-1)[:n].to(torch.uint8), bits)
    return QuantizedScales(packed, super_scales, offset, bits, block_size, n)
