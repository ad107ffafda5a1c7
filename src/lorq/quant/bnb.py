"""bitsandbytes' 4-bit storage (NF4 / FP4) as a lorq format: QLoRA's base, bit for bit
(docs/algorithms.md §8; Dettmers et al., arXiv 2305.14314).

    W (out × in) → row-major blocks of B values;   a_b = max |w| over block b      (fp32)
    code = bucketize(clamp(w · (1/a_b), -1, 1), midpoints of the sorted 4-bit table)
    ŵ    = table[code] · a_b'

With bitsandbytes' double quantization (``double_quant``, its ``compress_statistics``) the fp32
absmax is stored as 8-bit codes of the signed dynamic map (``dynamic_map``), in blocks of 256:

    offset = mean(a)                       n_b = max |a − offset| over 256-block j      (fp32)
    c_b    = nearest dynamic-map level of (a_b − offset) / n_j
    a_b'   = dynamic[c_b] · n_j + offset

This is not LQ-LoRA's second level (§1.2: min offset, unsigned linear codes, per-matrix); it is
its own format so that an exported base is what ``bitsandbytes.functional.quantize_4bit`` writes.
Buffers (n = out·in, nb = n / B): ``codes`` uint8 (n/2,), two codes per byte, high nibble first
(bitsandbytes' order, lorq's packing); ``absmax`` (nb,) fp32, or with double quantization (nb,)
uint8 plus ``nested_absmax`` (⌈nb/256⌉,) fp32 and ``offset`` (1,) fp32. The two lookup tables
are constants of the format, not stored per matrix.

    bits/param = 4 + 32/B          = 4.5     (B = 64, fp32 absmax)
    bits/param = 4 + 8/B + 32/(256·B) ≈ 4.127 (B = 64, double quantization; + 32 bits per matrix)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch

from lorq.quant.base import (
    QuantConfig,
    QuantFormat,
    block_range,
    check_choice,
    check_power_of_two,
    check_weight,
    format_of,
    register_format,
)
from lorq.quant.codebook import nf_levels
from lorq.quant.packing import decode_packed, pack_blocks, packed_nbytes
from lorq.quant.tensor import QuantizedTensor
from lorq.quant.trainable import Trainable, float_buffers

NESTED_BLOCK = 256  # bitsandbytes' block of absmax values in the second level
QUANT_TYPES = ("nf4", "fp4")
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, before normalisation
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0)
FP4_VALUES = (*_FP4, -3.0)


@dataclass(frozen=True)
class BnbConfig(QuantConfig):
    """bitsandbytes 4-bit: ``quant_type`` nf4 | fp4, blocks of ``block_size``, absmax double
    quantized (``double_quant``, bitsandbytes' ``bnb_4bit_use_double_quant``) or fp32."""

    FORMAT: ClassVar[str] = "bnb"

    quant_type: str = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (4,))
        check_power_of_two("block_size", self.block_size, 32, 4096)
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_choice("double_quant", self.double_quant, (True, False))


@cache
def code_table(quant_type: str) -> torch.Tensor:
    """bitsandbytes' 16 values of ``quant_type`` (index = code), in [-1, 1], float32."""
    if quant_type == "nf4":
        return nf_levels(4)
    data = torch.tensor(FP4_VALUES, dtype=torch.float32)
    return data / data.abs().max()


@cache
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted table and the code of each sorted position."""
    table = code_table(quant_type)
    order = torch.argsort(table)
    return (table[order[:-1]] + table[order[1:]]) / 2, order.to(torch.uint8)


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 ascending values in [-1, 1], float32):
    for exponent i = 0…6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6),
    with both signs, plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0  # scaled in float32, as bitsandbytes does
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def encode_absmax(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """The double-quantized buffers of fp32 block absmax values (see the module docstring)."""
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-centred.numel()) % NESTED_BLOCK
    blocks = torch.cat([centred, centred.new_zeros(pad)]).view(-1, NESTED_BLOCK)
    nested = blocks.abs().amax(1)
    scaled = torch.clamp(blocks * (1.0 / nested.clamp(min=1e-38))[:, None], -1, 1)
    table = dynamic_map().to(absmax.device)
    codes = torch.bucketize(scaled, (table[:-1] + table[1:]) / 2).to(torch.uint8)
    return {
        "absmax": codes.reshape(-1)[: absmax.numel()],
        "nested_absmax": nested,
        "offset": offset.reshape(1),
    }


def block_absmax(q: QuantizedTensor) -> torch.Tensor:
    """The absmax a_b' every block is decoded with, float32 (num_blocks,)."""
    assert isinstance(q.config, BnbConfig)
    if not q.config.double_quant:
        return q.buffers["absmax"].float()
    codes, nested, offset = (q.buffers[k] for k in ("absmax", "nested_absmax", "offset"))
    table = dynamic_map().to(codes.device)
    index = torch.arange(codes.numel(), device=codes.device) // NESTED_BLOCK
    return table[codes.long()] * nested[index] + offset


def _nested_trainable(q: QuantizedTensor, config: BnbConfig) -> Trainable:
    """a_b' rounds to dynamic[c]·n_j + offset, c the nearest of the 256 levels."""
    nested, offset = q.buffers["nested_absmax"], q.buffers["offset"]
    table = dynamic_map().to(nested.device)
    index = torch.arange(q.num_blocks, device=nested.device) // NESTED_BLOCK

    def grid(v: torch.Tensor) -> torch.Tensor:
        scaled = torch.clamp((v - offset) * (1.0 / nested.clamp(min=1e-38))[index], -1, 1)
        return torch.bucketize(scaled.contiguous(), (table[:-1] + table[1:]) / 2)

    def write(values: dict[str, torch.Tensor]) -> QuantizedTensor:
        codes = grid(values["absmax"]).to(torch.uint8)
        return QuantizedTensor(config, q.shape, {**q.buffers, "absmax": codes})

    plain = dataclasses.replace(config, double_quant=False)
    ones = torch.ones(q.num_blocks, device=nested.device)
    unscaled = QuantizedTensor(plain, q.shape, {"codes": q.codes, "absmax": ones})
    basis = format_of(plain).decode(unscaled, torch.float32)
    rounder = lambda _, v: table[grid(v)] * nested[index] + offset  # noqa: E731
    return Trainable({"absmax": block_absmax(q)}, {"absmax": basis}, rounder, write)


class Bitsandbytes(QuantFormat):
    name = "bnb"
    config_type = BnbConfig
    description = "bitsandbytes 4-bit (NF4 / FP4, its own double quantization): QLoRA's storage"

    def presets(self) -> dict[str, QuantConfig]:
        return {f"bnb-{t}": BnbConfig(quant_type=t) for t in QUANT_TYPES}

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        assert isinstance(config, BnbConfig)
        nested = ("nested_absmax", "offset") if config.double_quant else ()
        return ("codes", "absmax", *nested)

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        assert isinstance(config, BnbConfig)
        check_weight(weight)
        shape = (weight.shape[0], weight.shape[1])
        self.check_shape(config, shape)
        blocks = weight.detach().reshape(-1, config.block_size)
        low, high = block_range(blocks)
        absmax = torch.maximum(-low, high)
        inverse = 1.0 / absmax.clamp(min=1e-38)
        bounds, order = (t.to(weight.device) for t in _bounds(config.quant_type))

        def encode(values: torch.Tensor, rows: slice) -> torch.Tensor:
            scaled = torch.clamp(values * inverse[rows, None], -1, 1)
            return order[torch.bucketize(scaled.contiguous(), bounds)]

        codes = pack_blocks(blocks, 4, encode)
        stored = encode_absmax(absmax) if config.double_quant else {"absmax": absmax}
        return QuantizedTensor(config, shape, {"codes": codes, **stored})

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        return block_absmax(q)

    def trainable_keys(self, config: QuantConfig) -> tuple[str, ...]:
        return ("absmax",)

    def trainable(self, q: QuantizedTensor) -> Trainable:
        """The absmax of every block: fp32, or on the dynamic map's grid of its 256-block
        (whose nested absmax and the offset stay) with double quantization."""
        assert isinstance(q.config, BnbConfig)
        if not q.config.double_quant:
            return float_buffers(q, ("absmax",))
        return _nested_trainable(q, q.config)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        absmax = block_absmax(q)

        def scale(values: torch.Tensor, blocks: slice, out: torch.Tensor) -> None:
            torch.mul(values, absmax[blocks, None], out=out)

        assert isinstance(q.config, BnbConfig)
        table = code_table(q.config.quant_type).to(q.device)
        return decode_packed(q.codes, 4, q.shape, q.config.block_size, table, scale, dtype)

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        assert isinstance(config, BnbConfig)
        numel = shape[0] * shape[1]
        blocks = numel // config.block_size
        if not config.double_quant:
            return packed_nbytes(numel, 4) + 4 * blocks
        return packed_nbytes(numel, 4) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4

    def nominal_bits(self, config: QuantConfig) -> float:
        assert isinstance(config, BnbConfig)
        if not config.double_quant:
            return 4 + 32 / config.block_size
        return 4 + 8 / config.block_size + 32 / (NESTED_BLOCK * config.block_size)

    def label(self, config: QuantConfig) -> str:
        assert isinstance(config, BnbConfig)
        second = "dq" if config.double_quant else "fp32"
        return f"bnb-{config.quant_type}-b{config.block_size}-{second}"


BITSANDBYTES = register_format(Bitsandbytes())
