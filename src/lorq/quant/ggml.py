"""llama.cpp's block formats (GGUF tensor types) as lorq formats; docs/algorithms.md §1.8.

The buffer is the GGUF bytes themselves, row after row (``blocks``, uint8, out · in/32 · bytes
per block), so import and export copy them and decoding follows ggml's definition:

    Q8_0   32 weights in 34 bytes: d (fp16) + 32 int8 codes q        ŵ = d · q        8.5 bits

Encoding is llama.cpp's reference rounding (``quantize_row_q8_0_ref``):

    d = max |x| / 127,   q = roundf(x / d)   (half away from zero; x · (1/d) in float32)

and d is stored in fp16 after the codes were chosen from the float32 d. The oracle is the
``gguf`` package (its ``quantize`` and ``dequantize`` are bit-exact ports of ggml's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorq.quant.base import (
    QuantConfig,
    QuantFormat,
    check_choice,
    check_weight,
    register_format,
)
from lorq.quant.tensor import QuantizedTensor

Q8_0_BLOCK, Q8_0_BYTES = 32, 34
CHUNK_BLOCKS = 1 << 14  # blocks decoded at once: bounds temporary memory


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """A llama.cpp block type by its lower-case name (``q8_0``); bits and block size follow."""

    FORMAT: ClassVar[str] = "ggml"
    TYPES: ClassVar[dict[str, tuple[int, int]]] = {"q8_0": (8, Q8_0_BLOCK)}

    ggml_type: str = "q8_0"
    bits: int = 8
    block_size: int = Q8_0_BLOCK

    def __post_init__(self) -> None:
        check_choice("ggml_type", self.ggml_type, tuple(self.TYPES))
        bits, block = self.TYPES[self.ggml_type]
        check_choice("bits", self.bits, (bits,))
        check_choice("block_size", self.block_size, (block,))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _encode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 → (n, 34) uint8 GGUF Q8_0 blocks."""
    d = blocks.abs().amax(1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _roundf(blocks * inverse).to(torch.int8)
    scale = d.to(torch.float16).view(torch.uint8)
    return torch.cat([scale, codes.view(torch.uint8)], 1)


def _decode_q8_0(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 34) uint8 → (n, 32) ``dtype``: d · q computed in float32."""
    d = raw[:, :2].contiguous().view(torch.float16).float()
    codes = raw[:, 2:].contiguous().view(torch.int8).float()
    return (codes * d).to(dtype)


class GGMLBlocks(QuantFormat):
    name = "ggml"
    config_type = GGMLConfig
    description = "llama.cpp block types, stored as their GGUF bytes"

    def presets(self) -> dict[str, QuantConfig]:
        return {"q8_0": GGMLConfig(ggml_type="q8_0")}

    def check_shape(self, config: QuantConfig, shape: tuple[int, int]) -> None:
        if shape[1] % config.block_size:
            raise ValueError(
                f"{config.name} stores blocks of {config.block_size} weights along a row; "
                f"in_features={shape[1]} of the matrix of shape {shape} is not a multiple"
            )

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        return ("blocks",)

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        check_weight(weight)
        shape = (weight.shape[0], weight.shape[1])
        self.check_shape(config, shape)
        values = weight.detach().float().reshape(-1, Q8_0_BLOCK)
        if not torch.isfinite(values).all():
            raise ValueError("weight contains NaN or Inf values; quantize only finite weights")
        parts = [
            _encode_q8_0(values[start : start + CHUNK_BLOCKS])
            for start in range(0, values.shape[0], CHUNK_BLOCKS)
        ]
        return QuantizedTensor(config, shape, {"blocks": torch.cat(parts).reshape(-1)})

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        raw = q.buffers["blocks"].view(-1, Q8_0_BYTES)
        out = torch.empty(q.shape, dtype=dtype, device=raw.device).view(-1, Q8_0_BLOCK)
        for start in range(0, raw.shape[0], CHUNK_BLOCKS):
            stop = start + CHUNK_BLOCKS
            out[start:stop] = _decode_q8_0(raw[start:stop], dtype)
        return out.view(q.shape)

    def decode_rows(self, q: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype):
        raw = q.buffers["blocks"].view(q.shape[0], -1)[rows.reshape(-1)]
        values = _decode_q8_0(raw.reshape(-1, Q8_0_BYTES), dtype)
        return values.view(*rows.shape, q.shape[1])

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        raw = q.buffers["blocks"].view(-1, Q8_0_BYTES)
        return raw[:, :2].contiguous().view(torch.float16).float().reshape(-1)

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] // Q8_0_BLOCK * Q8_0_BYTES

    def nominal_bits(self, config: QuantConfig) -> float:
        return 8 * Q8_0_BYTES / Q8_0_BLOCK

    def label(self, config: QuantConfig) -> str:
        assert isinstance(config, GGMLConfig)
        return config.ggml_type

    def gguf_config(self) -> QuantConfig:
        return GGMLConfig(ggml_type="q8_0")

    def gguf_type(self, config: QuantConfig) -> int | None:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType.Q8_0 if config == self.gguf_config() else None

    def to_gguf(self, q: QuantizedTensor) -> torch.Tensor:
        return q.buffers["blocks"].cpu().view(q.shape[0], -1)

    def from_gguf(self, raw: torch.Tensor, shape: tuple[int, int]) -> QuantizedTensor:
        blocks = raw.reshape(-1).contiguous()
        return QuantizedTensor(self.gguf_config(), shape, {"blocks": blocks})


GGML_BLOCKS = register_format(GGMLBlocks())
