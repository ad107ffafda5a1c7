"""Affine INT-k, group-wise, round to nearest: integer zeros (GPTQ layout) and float mins (GGUF
Q4_1 layout) — docs/algorithms.md §1.3, §1.4.

Per output row, groups of G consecutive input features (G = ``block_size``, in % G == 0):

    scale = (max - min) / (2^k - 1)                       stored in scale_dtype (fp16 default)
    IntConfig  (integer zero):  min ≤ 0 ≤ max enforced, zero = round(-min / scale) ∈ [0, 2^k - 1]
                                code = clamp(round(w / scale) + zero),   ŵ = scale · (code - zero)
    FloatMinConfig (float min): m = min stored in scale_dtype
                                code = clamp(round((w - m) / scale)),    ŵ = scale · code + m

Buffers (nb = out·in / G): ``codes`` (packed k-bit), ``scales`` (nb,) scale_dtype, ``zeros``:
packed k-bit integers or (nb,) scale_dtype mins. Codes are computed from the *stored* (rounded)
scale and min, so they are optimal for what is decoded. ``affine_params`` / ``affine_codes`` are
shared with GPTQ rounding. Both formats take a per-group shift Δ into their zeros / mins
(QA-LoRA's merge, §2.5): exact up to rounding for float mins, rounded to whole steps for integer
zeros. The float-min preset ``q4_1`` is GGUF's Q4_1 (its codes convert to GGUF blocks as they are).
"""

from __future__ import annotations

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
    register_format,
    round_up_to_dtype,
    safe_reciprocal,
    storage_dtype,
)
from lorq.quant.packing import decode_packed, pack, pack_blocks, packed_nbytes, unpack
from lorq.quant.tensor import QuantizedTensor
from lorq.quant.trainable import Trainable, float_buffers

BLOCK_RANGE = (16, 1024)
BUFFERS = ("codes", "scales", "zeros")


@dataclass(frozen=True)
class AffineConfig(QuantConfig):
    """Affine INT-``bits`` over groups of ``block_size`` (G) inputs, ``scale_dtype`` scales."""

    ZERO: ClassVar[str] = ""  # "int": integer zero points, "float": float mins

    block_size: int = 32
    scale_dtype: str = "fp16"

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_power_of_two("block_size", self.block_size, *BLOCK_RANGE)
        check_choice("scale_dtype", self.scale_dtype, tuple(FLOAT_BITS))


@dataclass(frozen=True)
class IntConfig(AffineConfig):
    """INT-k with k-bit integer zero points (GPTQ's layout)."""

    FORMAT: ClassVar[str] = "int"
    ZERO: ClassVar[str] = "int"


@dataclass(frozen=True)
class FloatMinConfig(AffineConfig):
    """INT-k with float mins in ``scale_dtype`` (HQQ / GGUF Q4_1 layout)."""

    FORMAT: ClassVar[str] = "fmin"
    ZERO: ClassVar[str] = "float"


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


def affine_values(
    codes: torch.Tensor, scale: torch.Tensor, zero_or_min: torch.Tensor, zero: str
) -> torch.Tensor:
    """ŵ of ``codes`` (float32) for broadcastable per-group ``scale`` / ``zero_or_min``."""
    if zero == "int":
        return scale * (codes.float() - zero_or_min)
    return scale * codes.float() + zero_or_min


def pack_zeros(zero_or_min: torch.Tensor, config: AffineConfig) -> torch.Tensor:
    """Stored form of zeros: k-bit packed integers, or mins in ``scale_dtype``."""
    if config.ZERO == "int":
        return pack(zero_or_min.to(torch.uint8), config.bits)
    return zero_or_min.to(storage_dtype(config.scale_dtype))


def block_zeros(q: QuantizedTensor) -> torch.Tensor:
    """Integer zeros or float mins of every group as float32, shape (num_blocks,)."""
    config = q.config
    assert isinstance(config, AffineConfig)
    if config.ZERO == "int":
        return unpack(q.buffers["zeros"], config.bits, q.num_blocks).float()
    return q.buffers["zeros"].float()


def block_scales(q: QuantizedTensor) -> torch.Tensor:
    """The scale of every group as float32, shape (num_blocks,)."""
    return q.buffers["scales"].float()


def unpacked_codes(q: QuantizedTensor) -> torch.Tensor:
    """The k-bit codes as uint8, shape (out, in)."""
    return unpack(q.codes, q.config.bits, q.numel).view(q.shape)


def affine_tensor(
    config: AffineConfig,
    shape: tuple[int, int],
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_or_min: torch.Tensor,
) -> QuantizedTensor:
    """A QuantizedTensor from packed codes and float32 per-group scales and zeros / mins."""
    stored = scale.to(storage_dtype(config.scale_dtype))
    zeros = pack_zeros(zero_or_min, config)
    return QuantizedTensor(config, shape, {"codes": codes, "scales": stored, "zeros": zeros})


class AffineGrid:
    """GPTQ's rounding on an affine grid: a group's scale and zero (or min) are chosen from the
    current, error-updated columns when the group starts (``lorq.quant.gptq``)."""

    def __init__(self, weight: torch.Tensor, config: AffineConfig) -> None:
        self.config, self.group = config, config.block_size
        self.shape = (weight.shape[0], weight.shape[1])
        groups = (weight.shape[0], weight.shape[1] // config.block_size)
        self.codes = torch.empty(self.shape, dtype=torch.uint8, device=weight.device)
        self.scales = torch.empty(groups, device=weight.device)
        self.zeros = torch.empty(groups, device=weight.device)

    def start(self, columns: torch.Tensor, first: int) -> None:
        c = self.config
        scale, zero = affine_params(columns, c.bits, c.ZERO, c.scale_dtype)
        self.scales[:, first // self.group], self.zeros[:, first // self.group] = scale, zero

    def round(self, column: torch.Tensor, j: int) -> torch.Tensor:
        c, g = self.config, j // self.group
        scale, zero = self.scales[:, g], self.zeros[:, g]
        code = affine_codes(column[:, None], scale[:, None], zero[:, None], c.bits, c.ZERO)[:, 0]
        self.codes[:, j] = code
        return affine_values(code, scale, zero, c.ZERO)

    def result(self) -> QuantizedTensor:
        codes = pack(self.codes.reshape(-1), self.config.bits)
        scales, zeros = self.scales.reshape(-1), self.zeros.reshape(-1)
        return affine_tensor(self.config, self.shape, codes, scales, zeros)


class Affine(QuantFormat):
    """The operations both affine layouts share; ``config_type`` picks zeros or mins."""

    def check_shape(self, config: QuantConfig, shape: tuple[int, int]) -> None:
        if shape[1] % config.block_size:
            raise ValueError(
                f"block_size={config.block_size} does not divide in_features={shape[1]} of the "
                f"matrix of shape {shape}; choose a group size that divides in_features"
            )

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        return BUFFERS

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        return block_scales(q)

    def block_zeros(self, q: QuantizedTensor) -> torch.Tensor | None:
        return block_zeros(q)

    def trainable_keys(self, config: QuantConfig) -> tuple[str, ...]:
        assert isinstance(config, AffineConfig)
        return ("scales",) if config.ZERO == "int" else ("scales", "zeros")

    def trainable(self, q: QuantizedTensor) -> Trainable:
        """The scales (and float mins) in ``scale_dtype``; integer zero points stay."""
        return float_buffers(q, self.trainable_keys(q.config))

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        assert isinstance(config, AffineConfig)
        check_weight(weight)
        shape = (weight.shape[0], weight.shape[1])
        self.check_shape(config, shape)
        groups = weight.detach().reshape(-1, config.block_size)
        scale, zero_or_min = affine_params(groups, config.bits, config.ZERO, config.scale_dtype)

        def encode(values: torch.Tensor, rows: slice) -> torch.Tensor:
            s, z = scale[rows, None], zero_or_min[rows, None]
            return affine_codes(values, s, z, config.bits, config.ZERO)

        codes = pack_blocks(groups, config.bits, encode)
        return affine_tensor(config, shape, codes, scale, zero_or_min)

    def check_gptq(self, config: QuantConfig) -> None:
        """Every config of this format has a GPTQ grid."""

    def gptq_grid(self, weight: torch.Tensor, config: QuantConfig) -> AffineGrid:
        assert isinstance(config, AffineConfig)
        return AffineGrid(weight, config)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        config = q.config
        assert isinstance(config, AffineConfig)
        scales, zeros = block_scales(q), block_zeros(q)

        def scale(values: torch.Tensor, blocks: slice, out: torch.Tensor) -> None:
            s, z = scales[blocks, None], zeros[blocks, None]
            if config.ZERO == "int":
                torch.mul(values.sub_(z), s, out=out)
            else:
                torch.addcmul(z, values, s, out=out)

        table = torch.arange(2**config.bits, dtype=torch.float32, device=q.device)
        return decode_packed(q.codes, config.bits, q.shape, config.block_size, table, scale, dtype)

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        assert isinstance(config, AffineConfig)
        numel = shape[0] * shape[1]
        blocks = numel // config.block_size
        scale_bytes = FLOAT_BITS[config.scale_dtype] // 8
        zeros = packed_nbytes(blocks, config.bits) if config.ZERO == "int" else blocks * scale_bytes
        return packed_nbytes(numel, config.bits) + blocks * scale_bytes + zeros

    def nominal_bits(self, config: QuantConfig) -> float:
        assert isinstance(config, AffineConfig)
        scale_bits = FLOAT_BITS[config.scale_dtype]
        zero_bits = config.bits if config.ZERO == "int" else scale_bits
        return config.bits + (scale_bits + zero_bits) / config.block_size


class IntZeros(Affine):
    name = "int"
    config_type = IntConfig
    description = "affine INT-k, integer zero points (GPTQ layout)"

    def presets(self) -> dict[str, QuantConfig]:
        groups = {8: (128,), 4: (32, 64, 128), 3: (32, 128), 2: (32,)}
        return {
            f"int{b}-g{g}": IntConfig(bits=b, block_size=g) for b in (8, 4, 3, 2) for g in groups[b]
        }

    def label(self, config: QuantConfig) -> str:
        return f"int{config.bits}-g{config.block_size}"


INT_ZEROS = register_format(IntZeros())

Q4_1 = FloatMinConfig(bits=4, block_size=32)


class FloatMins(Affine):
    """Float mins; the preset ``q4_1`` (4 bits, G = 32, fp16) holds GGUF's Q4_1 codes, scales and
    mins (``lorq.io.gguf_types`` converts the blocks)."""

    name = "fmin"
    config_type = FloatMinConfig
    description = "affine INT-k, float mins (GGUF Q4_1 layout)"

    def presets(self) -> dict[str, QuantConfig]:
        return {
            "q4_1": Q4_1,
            "int3-g32-fmin": FloatMinConfig(bits=3, block_size=32),
            "int2-g32-fmin": FloatMinConfig(bits=2, block_size=32),
        }

    def label(self, config: QuantConfig) -> str:
        return f"int{config.bits}-g{config.block_size}-fmin"

    def check_weighted(self, config: QuantConfig) -> None:
        """``q4_1`` takes an importance as llama.cpp's other types do and leaves it unused (its
        imatrix search, make_qkx3_quants, is not ported): Q is the reference rounding."""
        if config != Q4_1:
            super().check_weighted(config)

    def quantize_weighted(
        self, weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None
    ) -> QuantizedTensor:
        if importance is not None:
            self.check_weighted(config)
        return self.quantize(weight, config)


FLOAT_MINS = register_format(FloatMins())

__all__ = [
    "FLOAT_MINS",
    "INT_ZEROS",
    "AffineConfig",
    "FloatMinConfig",
    "IntConfig",
    "affine_codes",
    "affine_params",
    "affine_values",
    "block_scales",
    "block_zeros",
    "unpacked_codes",
]
