"""NormalFloat NF-k with absmax block scales, optionally double-quantized (docs/algorithms.md §1.1,
§1.2; QLoRA arXiv 2305.14314, LQ-LoRA arXiv 2311.12023).

    W (out × in) → row-major blocks of B0 values;  s1_b = max |w| over block b
    code = nearest NF level of w / s1'_b,          ŵ = level[code] · s1'_b

``s1'`` are the stored scales: s1 itself in ``scale_dtype`` (``scale_bits=None``) or its
double-quantized form (``lorq.quant.double_quant``). Buffers (n = out·in, nb = n / B0):

    codes                                  uint8, packed_nbytes(n, bits)
    scales                                 (nb,) scale_dtype                  scale_bits=None
    scales.codes / .super_scales / .offset packed b0-bit, (⌈nb/B1⌉,) b1, (1,) fp32   otherwise

    bits/param = k + b0/B0 + bits(b1)/(B0·B1)     (+ 32 bits per matrix for the offset)
    bits/param = k + bits(scale_dtype)/B0         without the second level
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lorq.quant.base import (
    FLOAT_BITS,
    SUPPORTED_BITS,
    QuantConfig,
    QuantFormat,
    block_range,
    check_choice,
    check_power_of_two,
    check_weight,
    format_of,
    register_format,
    round_up_to_dtype,
    safe_reciprocal,
    storage_dtype,
)
from lorq.quant.codebook import nf_grid, nf_levels, nf_midpoints
from lorq.quant.double_quant import QuantizedScales, quantize_scales
from lorq.quant.packing import decode_packed, pack, pack_blocks, packed_nbytes
from lorq.quant.tensor import QuantizedTensor
from lorq.quant.trainable import Trainable, float_buffers

BLOCK_RANGE = (16, 4096)
SCALE_KEYS = ("scales.codes", "scales.super_scales", "scales.offset")


@dataclass(frozen=True)
class NFConfig(QuantConfig):
    """NF-``bits`` with blocks of ``block_size`` (B0) values; second level (``scale_bits`` b0 per
    scale, super-blocks of ``scale_block_size`` B1 scales whose max is ``super_scale_dtype`` b1)
    or, with ``scale_bits=None``, scales stored as ``scale_dtype`` floats."""

    FORMAT: ClassVar[str] = "nf"

    scale_bits: int | None = 8
    scale_block_size: int = 256
    super_scale_dtype: str = "fp32"
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_power_of_two("block_size", self.block_size, *BLOCK_RANGE)
        check_choice("scale_bits", self.scale_bits, (None, *SUPPORTED_BITS))
        check_power_of_two("scale_block_size", self.scale_block_size, 2, 4096)
        check_choice("super_scale_dtype", self.super_scale_dtype, tuple(FLOAT_BITS))
        check_choice("scale_dtype", self.scale_dtype, tuple(FLOAT_BITS))

    @property
    def double_quant(self) -> bool:
        """True when the scales are themselves quantized (LQ-LoRA's second level)."""
        return self.scale_bits is not None


def nf_scales(q: QuantizedTensor) -> torch.Tensor:
    """s1' of every block as float32, shape (num_blocks,)."""
    config = q.config
    assert isinstance(config, NFConfig)
    if config.scale_bits is None:
        return q.buffers["scales"].float()
    codes, supers, offset = (q.buffers[k] for k in SCALE_KEYS)
    blocks = q.num_blocks
    return QuantizedScales(
        codes, supers, offset, config.scale_bits, config.scale_block_size, blocks
    ).dequantize()


def absmax_scales(
    blocks: torch.Tensor, config: NFConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stored scales s1' of ``blocks`` (num_blocks × B0) as float32, and their buffers."""
    low, high = block_range(blocks)
    absmax = torch.maximum(-low, high)
    if config.scale_bits is not None:
        scales = quantize_scales(
            absmax, config.scale_bits, config.scale_block_size, config.super_scale_dtype
        )
        return scales.dequantize(), {f"scales.{k}": v for k, v in scales.tensors().items()}
    stored = round_up_to_dtype(absmax, storage_dtype(config.scale_dtype), "scale_dtype")
    return stored.float(), {"scales": stored}


class NFGrid:
    """GPTQ's rounding on the NF grid: the (double-quantized) absmax scales of the weight being
    rounded are fixed before the sweep, so every code is rounded with its stored scale."""

    group = 0

    def __init__(self, weight: torch.Tensor, config: NFConfig) -> None:
        self.config, self.shape = config, (weight.shape[0], weight.shape[1])
        used, self.buffers = absmax_scales(weight.reshape(-1, config.block_size), config)
        # the scale of every (row, column): blocks run row-major, possibly across rows
        blocks = torch.arange(weight.numel(), device=weight.device) // config.block_size
        self.used = used[blocks].view(self.shape).T.contiguous()  # (in × out): a row per column
        self.inverse = safe_reciprocal(self.used)
        # one bucketize per column: the same codes as round to nearest's LevelGrid (ties low)
        self.mids = nf_midpoints(config.bits).to(weight.device)
        self.levels = nf_levels(config.bits).to(weight.device)
        self.codes = torch.empty(self.shape[::-1], dtype=torch.int64, device=weight.device)

    def start(self, columns: torch.Tensor, first: int) -> None:
        """Nothing: the scales are fixed."""

    def round(self, column: torch.Tensor, j: int) -> torch.Tensor:
        code = torch.bucketize(column * self.inverse[j], self.mids, out=self.codes[j])
        return self.levels[code].mul_(self.used[j])

    def result(self) -> QuantizedTensor:
        codes = pack(self.codes.T.reshape(-1).to(torch.uint8), self.config.bits)
        return QuantizedTensor(self.config, self.shape, {"codes": codes, **self.buffers})


def double_quant_trainable(q: QuantizedTensor, config: NFConfig) -> Trainable:
    """s1' rounds to offset + code·m_j / (2^b0 − 1), code in 0 … 2^b0 − 1 (the stored grid)."""
    codes, supers, offset = (q.buffers[k] for k in SCALE_KEYS)
    levels, n = 2**config.scale_bits - 1, q.num_blocks  # type: ignore[operator]
    step = (supers.float() / levels).repeat_interleave(config.scale_block_size)[:n]

    def grid(v: torch.Tensor) -> torch.Tensor:
        index = torch.round((v - offset.float()) * safe_reciprocal(step))
        return torch.where(step > 0, index, torch.zeros_like(index)).clamp_(0, levels)

    def write(values: dict[str, torch.Tensor]) -> QuantizedTensor:
        packed = pack(grid(values["scales"]).to(torch.uint8), config.scale_bits)
        return QuantizedTensor(config, q.shape, {**q.buffers, "scales.codes": packed})

    plain = dataclasses.replace(config, scale_bits=None, scale_dtype="fp32")
    ones = torch.ones(n, device=codes.device)
    unscaled = QuantizedTensor(plain, q.shape, {"codes": q.codes, "scales": ones})
    basis = format_of(plain).decode(unscaled, torch.float32)
    rounder = lambda _, v: offset.float() + grid(v) * step  # noqa: E731
    return Trainable({"scales": nf_scales(q)}, {"scales": basis}, rounder, write)


class NormalFloat(QuantFormat):
    name = "nf"
    config_type = NFConfig
    description = "NormalFloat, absmax block scales (LQ-LoRA double quantization)"

    def presets(self) -> dict[str, QuantConfig]:
        nf = {f"nf{b}": NFConfig(bits=b, block_size=64) for b in (4, 3, 2, 8)}
        return {**nf, "nf4-fp32-scales": NFConfig(bits=4, block_size=64, scale_bits=None)}

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        assert isinstance(config, NFConfig)
        return ("codes", *(SCALE_KEYS if config.double_quant else ("scales",)))

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        assert isinstance(config, NFConfig)
        check_weight(weight)
        self.check_shape(config, (weight.shape[0], weight.shape[1]))
        blocks = weight.detach().reshape(-1, config.block_size)
        used, buffers = absmax_scales(blocks, config)
        inverse = safe_reciprocal(used)
        grid = nf_grid(config.bits)

        def encode(values: torch.Tensor, rows: slice) -> torch.Tensor:
            return grid.codes(values * inverse[rows, None])

        codes = pack_blocks(blocks, config.bits, encode)
        shape = (weight.shape[0], weight.shape[1])
        return QuantizedTensor(config, shape, {"codes": codes, **buffers})

    def check_gptq(self, config: QuantConfig) -> None:
        """Every config of this format has a GPTQ grid."""

    def gptq_grid(self, weight: torch.Tensor, config: QuantConfig) -> NFGrid:
        assert isinstance(config, NFConfig)
        return NFGrid(weight, config)

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        return nf_scales(q)

    def trainable_keys(self, config: QuantConfig) -> tuple[str, ...]:
        return ("scales",)

    def trainable(self, q: QuantizedTensor) -> Trainable:
        """The absmax s1' of every block: on the second level's grid with double quantization
        (its offset and super-block maxima stay), else in ``scale_dtype``."""
        config = q.config
        assert isinstance(config, NFConfig)
        if config.scale_bits is None:
            return float_buffers(q, ("scales",))
        return double_quant_trainable(q, config)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        scales = nf_scales(q)

        def scale(values: torch.Tensor, blocks: slice, out: torch.Tensor) -> None:
            torch.mul(values, scales[blocks, None], out=out)

        table = nf_levels(q.config.bits).to(q.device)
        cfg = q.config
        return decode_packed(q.codes, cfg.bits, q.shape, cfg.block_size, table, scale, dtype)

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        assert isinstance(config, NFConfig)
        numel = shape[0] * shape[1]
        blocks = numel // config.block_size
        nbytes = packed_nbytes(numel, config.bits)
        if config.scale_bits is None:
            return nbytes + blocks * FLOAT_BITS[config.scale_dtype] // 8
        supers = -(-blocks // config.scale_block_size)
        nbytes += packed_nbytes(blocks, config.scale_bits) + 4  # codes + fp32 offset
        return nbytes + supers * FLOAT_BITS[config.super_scale_dtype] // 8

    def nominal_bits(self, config: QuantConfig) -> float:
        assert isinstance(config, NFConfig)
        if config.scale_bits is None:
            return config.bits + FLOAT_BITS[config.scale_dtype] / config.block_size
        supers = FLOAT_BITS[config.super_scale_dtype] / (
            config.block_size * config.scale_block_size
        )
        return config.bits + config.scale_bits / config.block_size + supers

    def label(self, config: QuantConfig) -> str:
        assert isinstance(config, NFConfig)
        if config.scale_bits is None:
            return f"nf{config.bits}-b{config.block_size}-{config.scale_dtype}"
        return (
            f"nf{config.bits}-b{config.block_size}-s{config.scale_bits}"
            f"x{config.scale_block_size}-{config.super_scale_dtype}"
        )


NORMAL_FLOAT = register_format(NormalFloat())
