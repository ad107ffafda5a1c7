"""llama.cpp's block formats (GGUF tensor types) as lorq formats; docs/algorithms.md §1.8.

The buffer is the GGUF bytes themselves, row after row (``blocks``, uint8, out · in/32 · bytes per
block), so import and export copy them and decoding follows ggml's definition. Blocks of 32
weights; d, m in fp16; nibble j holds weight j (low) and weight j + 16 (high):

    type   bytes  layout                 decode                     bits/weight
    Q8_0   34     d, q[32] int8          d · q                      8.5
    Q4_0   18     d, qs[16]              d · (q − 8)                4.5
    Q5_0   22     d, qh[4], qs[16]       d · (q − 16)               5.5    q = low 4 | qh bit << 4
    Q5_1   24     d, m, qh[4], qs[16]    d · q + m                  6.0
    IQ4_NL 18     d, qs[16]              d · kvalues[q]             4.5    16 non-uniform levels
    Q2_K … Q6_K: 84 / 110 / 144 / 176 / 210 bytes per 256 weights (``lorq.quant.kquants``)

Encoding is llama.cpp's reference rounding (``quantize_row_*_ref``), as the ``gguf`` package ports
it bit for bit (the oracle): Q8_0 d = max|x|/127, q = roundf(x/d); Q4_0 / Q5_0 d = x_max/−8
(/−16) with x_max the value of largest magnitude, q = min(15 (31), trunc(x/d + 8.5 (16.5)));
Q5_1 d = (max − min)/31, m = min, q = trunc((x − m)/d + 0.5). d and m are stored in fp16 after
the codes were chosen from their float32 values. IQ4_NL is what ``llama-quantize`` writes without an
importance matrix (``quantize_iq4_nl``; the ``gguf`` package has no encoder for it, so the oracle
is llama.cpp itself, tests/test_llamacpp.py): the scale d maximising (Σ w·q·x)² / Σ w·q² with
w = x² over 1/d ∈ {127/x_max} ∪ {(k − 127)/x_max : k = −7 … 7} (x_max the value of largest
magnitude; sums in float32 in weight order, as llama.cpp adds them), q the nearest level of x/d.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from lorq.quant import kquants
from lorq.quant.base import (
    QuantConfig,
    QuantFormat,
    check_choice,
    check_weight,
    register_format,
)
from lorq.quant.packing import fp16_at, fp16_bytes
from lorq.quant.tensor import QuantizedTensor
from lorq.quant.trainable import Trainable, linear_trainable, to_float

BLOCK = 32
CHUNK_BLOCKS = 1 << 14  # blocks encoded / decoded at once: bounds temporary memory


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes → (n, 16) bytes: low nibble code j, high nibble code j + 16."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_nibbles` for the low four bits: (n, 16) → (n, 32)."""
    return torch.cat([qs & 0x0F, qs >> 4], 1)


BIT_WEIGHTS = (2 ** torch.arange(8)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit codes → (n, 4) bytes of their fifth bits, little-endian (code i: bit i)."""
    bits = (q >> 4) & 1
    return (bits.view(-1, 4, 8) * BIT_WEIGHTS.to(q.device)).sum(-1, dtype=torch.uint8)


def _unhigh_bits(qh: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_high_bits`: (n, 4) → (n, 32) values 0 / 16."""
    bits = (qh[:, :, None] & BIT_WEIGHTS.to(qh.device)) != 0
    return bits.reshape(-1, BLOCK).to(torch.uint8) << 4


def _largest(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of every block (first one on ties), (n, 1)."""
    return x.gather(1, x.abs().argmax(1, keepdim=True))


def _encode_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(1, keepdim=True) / 127
    v = x * _safe_inverse(d)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # C's roundf
    return torch.cat([fp16_bytes(d), q.view(torch.uint8)], 1)


def _put_q8_0(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``raw``'s d with codes (n, 32) in [0, 255] standing for the int8 levels code − 128."""
    return torch.cat(
        [raw[:, :2], (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)], 1
    )


def _decode_q8_0(raw: torch.Tensor) -> torch.Tensor:
    return raw[:, 2:].contiguous().view(torch.int8).float() * fp16_at(raw, 0)


def _signed_codes(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: d = x_max / −levels, q = min(2·levels − 1, trunc(x / d + levels + ½))."""
    d = _largest(x) / -levels
    q = torch.trunc(x * _safe_inverse(d) + (levels + 0.5)).clamp(0, 2 * levels - 1)
    return d, q.to(torch.uint8)


def _weighted_codes(x: torch.Tensor, w: torch.Tensor, levels: int):
    """Q4_0 / Q5_0 with importance weights (llama.cpp's imatrix path): make_qx_quants."""
    scale, codes = kquants.make_qx_quants(x, levels, w)
    return scale[:, None], (codes + levels).to(torch.uint8)


def _encode_q4_0(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    d, q = _signed_codes(x, 8) if w is None else _weighted_codes(x, w, 8)
    return torch.cat([fp16_bytes(d), _nibbles(q)], 1)


def _put_nibbles(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Q4_0 / IQ4_NL: ``raw``'s d with 4-bit ``codes`` (n, 32)."""
    return torch.cat([raw[:, :2], _nibbles(codes)], 1)


def _decode_q4_0(raw: torch.Tensor) -> torch.Tensor:
    return (_unnibble(raw[:, 2:]).float() - 8) * fp16_at(raw, 0)


def _encode_q5_0(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    d, q = _signed_codes(x, 16) if w is None else _weighted_codes(x, w, 16)
    return torch.cat([fp16_bytes(d), _high_bits(q), _nibbles(q)], 1)


def _put_q5_0(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([raw[:, :2], _high_bits(codes), _nibbles(codes)], 1)


def _decode_q5_0(raw: torch.Tensor) -> torch.Tensor:
    q = _unnibble(raw[:, 6:]) | _unhigh_bits(raw[:, 2:6])
    return (q.float() - 16) * fp16_at(raw, 0)


def _encode_q5_1(x: torch.Tensor) -> torch.Tensor:
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (high - low) / 31
    q = torch.trunc((x - low) * _safe_inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([fp16_bytes(d), fp16_bytes(low), _high_bits(q), _nibbles(q)], 1)


def _put_q5_1(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([raw[:, :4], _high_bits(codes), _nibbles(codes)], 1)


def _decode_q5_1(raw: torch.Tensor) -> torch.Tensor:
    q = _unnibble(raw[:, 8:]) | _unhigh_bits(raw[:, 4:8])
    return q.float() * fp16_at(raw, 0) + fp16_at(raw, 2)


# IQ4_NL's 16 non-uniform levels (llama.cpp's kvalues_iq4nl), d · kvalues[q]
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4NL_TRIES = 7  # llama-quantize's search: 1/d = (k − 127) / x_max for k = −7 … 7
GROUP_MAX_EPS = 1e-15


def _best_index(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's best_index_int8: the nearest level, the upper one on a tie or beyond.

    Counted as the number of k with x − v_k ≥ v_{k+1} − x (true for every k below the answer,
    false above it; the bracketing pair compared in float32 exactly as llama.cpp does)."""
    index = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for k in range(values.numel() - 1):
        index += (x - values[k]) >= (values[k + 1] - x)
    return index


def _weighted_sums(x, w, values, inverse) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·q·x and Σ w·q² with q = values[best index of x · inverse], summed in float32 one
    weight after another as llama.cpp does (the order decides near-ties between tries)."""
    q = values[_best_index(x * inverse, values)]
    wq = w * q
    sumqx = torch.zeros_like(inverse[:, 0])
    sumq2 = torch.zeros_like(sumqx)
    for j in range(x.shape[1]):
        sumqx = sumqx + wq[:, j] * x[:, j]
        sumq2 = sumq2 + wq[:, j] * q[:, j]
    return sumqx, sumq2


def iq4nl_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's IQ4_NL scale search (quantize_row_iq4_nl_impl, 32-value blocks, 7 tries):
    the d maximising (Σ w·q·x)² / Σ w·q² over 1/d ∈ {127/x_max, (k − 127)/x_max}, (n, 1)."""
    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=x.device)
    largest = _largest(x)
    sumqx, sumq2 = _weighted_sums(x, weight, values, 1 / (largest / 127))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumq2))
    best = d * sumqx
    for k in range(-IQ4NL_TRIES, IQ4NL_TRIES + 1):
        sumqx, sumq2 = _weighted_sums(x, weight, values, (k - 127) / largest)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    tiny = x.abs().amax(1) < GROUP_MAX_EPS
    return torch.where(tiny, torch.zeros_like(d), d)[:, None]


def _encode_iq4_nl(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=x.device)
    d = iq4nl_scale(x, x * x if w is None else w)
    q = _best_index(x * _safe_inverse(d), values).to(torch.uint8)
    return torch.cat([fp16_bytes(d), _nibbles(q)], 1)


def _decode_iq4_nl(raw: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=raw.device)
    return values[_unnibble(raw[:, 2:]).long()] * fp16_at(raw, 0)


class BlockType(NamedTuple):
    """One llama.cpp type: its codec, and what GPTQ needs to round to its grid (``put``,
    ``levels``: every block decodes as a·levels[code] + b per weight, a and b set by the head)."""

    bits: int
    nbytes: int  # per block of ``block`` weights
    encode: Callable[..., torch.Tensor]  # (n, block) float32 [, weights] → (n, nbytes) uint8
    decode: Callable[[torch.Tensor], torch.Tensor]  # (n, nbytes) uint8 → (n, block) float32
    put: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (raw, codes) → raw, new codes
    levels: tuple[int, ...] = ()  # the level of each code, increasing; () for 0 … 2^bits − 1
    block: int = BLOCK  # weights per block along a row: 32, or 256 for the K-quants
    weighted: bool = True  # ``encode(x, w)`` searches its scales under importance weights w
    fields: tuple[tuple[str, int], ...] = (("d", 0),)  # its fp16 parameters: name, byte offset

    def level_values(self, device: torch.device) -> torch.Tensor:
        levels = self.levels or tuple(range(1 << self.bits))
        return torch.tensor(levels, dtype=torch.float32, device=device)


K = kquants
DMIN = (("d", 0), ("dmin", 2))  # Q4_K, Q5_K: d and dmin open the block
Q2K_FIELDS = (("d", 80), ("dmin", 82))  # Q2_K: they close it
TYPES: dict[str, BlockType] = {
    "q8_0": BlockType(
        8, 34, _encode_q8_0, _decode_q8_0, _put_q8_0, tuple(range(-128, 128)), weighted=False
    ),
    "q4_0": BlockType(4, 18, _encode_q4_0, _decode_q4_0, _put_nibbles),
    "q5_0": BlockType(5, 22, _encode_q5_0, _decode_q5_0, _put_q5_0),
    "q5_1": BlockType(
        5, 24, _encode_q5_1, _decode_q5_1, _put_q5_1, weighted=False, fields=(("d", 0), ("m", 2))
    ),
    "iq4_nl": BlockType(4, 18, _encode_iq4_nl, _decode_iq4_nl, _put_nibbles, IQ4NL_VALUES),
    "q4_k": BlockType(4, 144, K.encode_q4_k, K.decode_q4_k, K.put_q4_k, block=K.SUPER, fields=DMIN),
    "q5_k": BlockType(5, 176, K.encode_q5_k, K.decode_q5_k, K.put_q5_k, block=K.SUPER, fields=DMIN),
    "q6_k": BlockType(
        6, 210, K.encode_q6_k, K.decode_q6_k, K.put_q6_k, block=K.SUPER, fields=(("d", 208),)
    ),
    "q2_k": BlockType(
        2, 84, K.encode_q2_k, K.decode_q2_k, K.put_q2_k, block=K.SUPER, fields=Q2K_FIELDS
    ),
    "q3_k": BlockType(
        3, 110, K.encode_q3_k, K.decode_q3_k, K.put_q3_k, block=K.SUPER, fields=(("d", 108),)
    ),
}


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """A llama.cpp block type by its lower-case name (``q8_0``); bits and block size follow."""

    FORMAT: ClassVar[str] = "ggml"

    ggml_type: str = "q8_0"
    bits: int = 8
    block_size: int = BLOCK

    def __post_init__(self) -> None:
        check_choice("ggml_type", self.ggml_type, tuple(TYPES))
        object.__setattr__(self, "bits", TYPES[self.ggml_type].bits)
        if self.block_size == BLOCK:  # the field's default: the type's own block
            object.__setattr__(self, "block_size", TYPES[self.ggml_type].block)
        check_choice("block_size", self.block_size, (TYPES[self.ggml_type].block,))

    @property
    def block_type(self) -> BlockType:
        return TYPES[self.ggml_type]


def _importance_weights(values: torch.Tensor, importance: torch.Tensor, shape) -> torch.Tensor:
    """importance_j · sqrt(σ² + x_j²) for blocks ``values`` (n, block) of a matrix of ``shape``."""
    if tuple(importance.shape) != (shape[1],) or not torch.isfinite(importance).all():
        raise ValueError(
            f"importance must be {shape[1]} finite values (one per input column, e.g. diag H), "
            f"got shape {tuple(importance.shape)}"
        )
    columns = importance.float().to(values.device).clamp(min=0).expand(shape[0], -1)
    sigma2 = 2 * (values * values).mean(1, keepdim=True)
    return columns.reshape(values.shape) * torch.sqrt(sigma2 + values * values)


def _chunks(values: torch.Tensor, step: int = CHUNK_BLOCKS):
    return (values[start : start + step] for start in range(0, values.shape[0], step))


class BlockGrid:
    """GPTQ's column rounding (``lorq.quant.gptq.ColumnGrid``) on a llama.cpp type.

    When a block of columns starts (32 weights, or a K-quant's whole 256-weight super-block, whose
    sub-block scales are quantized together), the type's reference encoder chooses the block's
    head (d, mins, sub-block scales) from the current, error-updated weights; every column is then
    rounded to the nearest level under that head, w ≈ a·levels[code] + b. ``result`` writes the
    chosen codes into the heads (``BlockType.put``): the bytes are the type's own.
    """

    def __init__(self, weight: torch.Tensor, config: GGMLConfig) -> None:
        self.config, self.type = config, config.block_type
        self.group = self.type.block
        self.shape = (weight.shape[0], weight.shape[1])
        self.levels = self.type.level_values(weight.device)
        span = range(int(self.levels[0]), int(self.levels[-1]) + 1)
        self.uniform = not self.type.levels or self.type.levels == tuple(span)  # step-1 integers
        self.midpoints = (self.levels[1:] + self.levels[:-1]) / 2  # nearest level: count ≤
        blocks = (self.shape[0], self.shape[1] // self.group, self.type.nbytes)
        self.heads = torch.empty(blocks, dtype=torch.uint8, device=weight.device)
        self.codes = torch.empty(self.shape, dtype=torch.uint8, device=weight.device)
        self.first = 0

    def _decode_with(self, raw: torch.Tensor, code: int) -> torch.Tensor:
        codes = torch.full((raw.shape[0], self.group), code, dtype=torch.uint8, device=raw.device)
        return self.type.decode(self.type.put(raw, codes))

    def start(self, columns: torch.Tensor, first: int) -> None:
        raw = self.type.encode(columns.float().contiguous())
        self.heads[:, first // self.group] = raw
        self.first = first
        low, high = self._decode_with(raw, 0), self._decode_with(raw, self.levels.numel() - 1)
        self.scale = (high - low) / (self.levels[-1] - self.levels[0])
        self.offset = low - self.scale * self.levels[0]

    def round(self, column: torch.Tensor, j: int) -> torch.Tensor:
        scale, offset = self.scale[:, j - self.first], self.offset[:, j - self.first]
        flat = scale == 0  # every code decodes to the offset
        target = (column - offset) / torch.where(flat, torch.ones_like(scale), scale)
        target = torch.where(flat, torch.zeros_like(target), target)
        if self.uniform:  # consecutive integer levels: the nearest one (the upper one on a tie)
            top = self.levels.numel() - 1
            codes = torch.floor(target - self.levels[0] + 0.5).clamp_(0, top).long()
        else:  # IQ4_NL's levels
            codes = torch.bucketize(target, self.midpoints, right=True)
        self.codes[:, j] = codes.to(torch.uint8)
        return scale * self.levels[codes] + offset

    def result(self) -> QuantizedTensor:
        heads = self.heads.view(-1, self.type.nbytes)
        raw = self.type.put(heads, self.codes.view(-1, self.group))
        return QuantizedTensor(self.config, self.shape, {"blocks": raw.reshape(-1)})


class GGMLBlocks(QuantFormat):
    name = "ggml"
    config_type = GGMLConfig
    description = "llama.cpp block types, stored as their GGUF bytes"

    def presets(self) -> dict[str, QuantConfig]:
        return {name: GGMLConfig(ggml_type=name) for name in TYPES}

    def check_shape(self, config: QuantConfig, shape: tuple[int, int]) -> None:
        if shape[1] % config.block_size:
            fit = [n for n, t in TYPES.items() if shape[1] % t.block == 0]
            raise ValueError(
                f"{config.name} stores blocks of {config.block_size} weights along a row; "
                f"in_features={shape[1]} of the matrix of shape {shape} is not a multiple "
                f"(types that fit it: {', '.join(fit) or 'none'})"
            )

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        return ("blocks",)

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        return self.quantize_weighted(weight, config, None)

    def quantize_weighted(
        self, weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None
    ) -> QuantizedTensor:
        """With ``importance`` (in,), e.g. diag H: each block's scales searched under the weights
        importance_j · sqrt(σ² + x_j²), σ² = 2·mean(x²) of the block, as llama.cpp's imatrix
        path weighs them. Q8_0 (llama.cpp ignores an imatrix there) and Q5_1 (its imatrix search,
        make_qkx3_quants, is not ported) stay the reference."""
        assert isinstance(config, GGMLConfig)
        check_weight(weight)
        shape = (weight.shape[0], weight.shape[1])
        self.check_shape(config, shape)
        values = weight.detach().float().reshape(-1, config.block_size)
        if not torch.isfinite(values).all():
            raise ValueError("weight contains NaN or Inf values; quantize only finite weights")
        block_type = config.block_type
        if importance is None or not block_type.weighted:
            encoded = [block_type.encode(chunk) for chunk in _chunks(values)]
        else:
            weights = _importance_weights(values, importance, shape)
            pairs = zip(_chunks(values), _chunks(weights), strict=True)
            encoded = [block_type.encode(chunk, w) for chunk, w in pairs]
        return QuantizedTensor(config, shape, {"blocks": torch.cat(encoded).reshape(-1)})

    def _raw(self, q: QuantizedTensor) -> torch.Tensor:
        assert isinstance(q.config, GGMLConfig)
        return q.buffers["blocks"].view(-1, q.config.block_type.nbytes)

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        assert isinstance(q.config, GGMLConfig)
        decode, raw = q.config.block_type.decode, self._raw(q)
        out = torch.empty(q.shape, dtype=dtype, device=raw.device).view(-1, q.config.block_size)
        for start, chunk in zip(range(0, raw.shape[0], CHUNK_BLOCKS), _chunks(raw), strict=True):
            out[start : start + chunk.shape[0]] = decode(chunk).to(dtype)
        return out.view(q.shape)

    def decode_rows(self, q: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype):
        assert isinstance(q.config, GGMLConfig)
        block_type = q.config.block_type
        raw = q.buffers["blocks"].view(q.shape[0], -1)[rows.reshape(-1)]
        values = block_type.decode(raw.reshape(-1, block_type.nbytes)).to(dtype)
        return values.view(*rows.shape, q.shape[1])

    def check_gptq(self, config: QuantConfig) -> None:
        """Every llama.cpp type takes GPTQ rounding (:class:`BlockGrid`)."""

    def check_weighted(self, config: QuantConfig) -> None:
        """Every llama.cpp type takes an importance (Q8_0 and Q5_1 leave it unused)."""

    def gptq_grid(self, weight: torch.Tensor, config: QuantConfig) -> BlockGrid:
        assert isinstance(config, GGMLConfig)
        return BlockGrid(weight, config)

    def trainable_keys(self, config: QuantConfig) -> tuple[str, ...]:
        assert isinstance(config, GGMLConfig)
        return tuple(name for name, _ in config.block_type.fields)

    def trainable(self, q: QuantizedTensor) -> Trainable:
        """Every block's fp16 ``d`` (and ``dmin`` / ``m``); codes and 6-bit sub-scales stay."""
        assert isinstance(q.config, GGMLConfig)
        raw, fields = self._raw(q), dict(q.config.block_type.fields)

        def write(values: dict[str, torch.Tensor]) -> QuantizedTensor:
            out = raw.clone()
            for name, at in fields.items():
                out[:, at : at + 2] = fp16_bytes(values[name][:, None])
            return QuantizedTensor(q.config, q.shape, {"blocks": out.reshape(-1)})

        values = {name: fp16_at(raw, at).reshape(-1) for name, at in fields.items()}
        return linear_trainable(q, values, lambda _, v: to_float(v, torch.float16), write)

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        """d of every block (its magnitude is the grid step; Q4_0 / Q5_0 store it negative)."""
        return fp16_at(self._raw(q), 0).reshape(-1)

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        assert isinstance(config, GGMLConfig)
        return shape[0] * shape[1] // config.block_size * config.block_type.nbytes

    def nominal_bits(self, config: QuantConfig) -> float:
        assert isinstance(config, GGMLConfig)
        return 8 * config.block_type.nbytes / config.block_size

    def label(self, config: QuantConfig) -> str:
        assert isinstance(config, GGMLConfig)
        return config.ggml_type


GGML_BLOCKS = register_format(GGMLBlocks())
