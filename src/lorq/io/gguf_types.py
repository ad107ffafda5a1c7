"""Which lorq formats a GGUF tensor type holds as they are, and the conversion of their codes:
the GGUF identity of a format, kept with the GGUF reader and writer.

    GGUF type          lorq config                     conversion of the stored bytes
    Q4_1               q4_1 (fmin: 4 bits, G = 32)     nibbles reordered, fp16 d and m copied
    Q4_0 … Q8_0,       ggml configs (q4_0 …)           none: lorq stores them as their blocks
    IQ4_NL, Q2_K … Q6_K

A GGUF tensor of ggml shape ne = (in, out) holds ``out`` rows of blocks along the input
dimension, the row-major block order of a lorq QuantizedTensor of shape (out, in); ``to_gguf``
gives those rows (out × bytes per row, uint8), ``from_gguf`` takes them back. A format is added
here by one entry in ``CODECS``, keyed by its name.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lorq.budget.grid import register_grid
from lorq.quant import QuantConfig, QuantizedTensor, format_of, presets
from lorq.quant.affine import Q4_1, unpacked_codes
from lorq.quant.ggml import TYPES, GGMLConfig

Q4_1_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles per block of 32 (ggml block_q4_1)


class GGUFCodec(Protocol):
    def ggml_type(self, config: QuantConfig) -> int | None: ...

    def config_of(self, ggml_type: int) -> QuantConfig | None: ...

    def to_gguf(self, q: QuantizedTensor) -> torch.Tensor: ...

    def from_gguf(
        self, raw: torch.Tensor, shape: tuple[int, int], config: QuantConfig
    ) -> QuantizedTensor: ...


class Q41Blocks:
    """GGUF's Q4_1 block: bytes 0-1 d (fp16 scale), 2-3 m (fp16 min), 4-19
    qs[j] = code[j] | code[j + 16] << 4 — lorq's q4_1 with its nibbles in another order (lorq
    packs the high nibble first)."""

    def ggml_type(self, config: QuantConfig) -> int | None:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType.Q4_1 if config == Q4_1 else None

    def config_of(self, ggml_type: int) -> QuantConfig | None:
        from gguf import GGMLQuantizationType

        return Q4_1 if ggml_type == GGMLQuantizationType.Q4_1 else None

    def to_gguf(self, q: QuantizedTensor) -> torch.Tensor:
        if q.config != Q4_1:
            raise ValueError(f"{q.config.name} is not GGUF's Q4_1 (that is preset q4_1)")
        group = q.config.block_size
        rows, groups = q.shape[0], q.shape[1] // group
        codes = unpacked_codes(q).cpu().view(rows, groups, 2, group // 2)
        out = torch.empty(rows, groups, Q4_1_BYTES, dtype=torch.uint8)
        out[..., 0:2] = _fp16_bytes(q.buffers["scales"], rows, groups)
        out[..., 2:4] = _fp16_bytes(q.buffers["zeros"], rows, groups)
        out[..., 4:] = torch.bitwise_left_shift(codes[:, :, 1], 4).bitwise_or_(codes[:, :, 0])
        return out.view(rows, groups * Q4_1_BYTES)

    def from_gguf(
        self, raw: torch.Tensor, shape: tuple[int, int], config: QuantConfig
    ) -> QuantizedTensor:
        if config != Q4_1:
            raise ValueError(f"{config.name} is not GGUF's Q4_1 (that is preset q4_1)")
        group = config.block_size
        rows, groups = shape[0], shape[1] // group
        blocks = raw.reshape(rows, groups, Q4_1_BYTES)
        halves = blocks[..., :4].contiguous().view(torch.float16)  # (rows, groups, 2): d, m
        nibbles = blocks[..., 4:]
        codes = torch.empty(rows, groups, 2, group // 2, dtype=torch.uint8)
        torch.bitwise_and(nibbles, 0x0F, out=codes[:, :, 0])  # code[j]
        torch.bitwise_right_shift(nibbles, 4, out=codes[:, :, 1])  # code[j + 16]
        pairs = codes.view(-1, 2)  # lorq's 4-bit packing (lorq.quant.packing.pack's bytes)
        packed = torch.bitwise_left_shift(pairs[:, 0], 4).bitwise_or_(pairs[:, 1])
        scales = halves[..., 0].flatten().contiguous()
        mins = halves[..., 1].flatten().contiguous()
        return QuantizedTensor(config, shape, {"codes": packed, "scales": scales, "zeros": mins})


def _fp16_bytes(values: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """The two bytes of each fp16 value, shape (rows, groups, 2)."""
    return values.detach().cpu().contiguous().view(torch.uint8).view(rows, groups, 2)


class GGMLBlocks:
    """llama.cpp's block types, which lorq stores as their GGUF bytes: nothing to convert."""

    def ggml_type(self, config: QuantConfig) -> int | None:
        from gguf import GGMLQuantizationType

        assert isinstance(config, GGMLConfig)
        return GGMLQuantizationType[config.ggml_type.upper()]

    def config_of(self, ggml_type: int) -> QuantConfig | None:
        from gguf import GGMLQuantizationType

        name = GGMLQuantizationType(ggml_type).name.lower()
        return GGMLConfig(ggml_type=name) if name in TYPES else None

    def to_gguf(self, q: QuantizedTensor) -> torch.Tensor:
        return q.buffers["blocks"].cpu().view(q.shape[0], -1)

    def from_gguf(
        self, raw: torch.Tensor, shape: tuple[int, int], config: QuantConfig
    ) -> QuantizedTensor:
        return QuantizedTensor(config, shape, {"blocks": raw.reshape(-1).contiguous()})


CODECS: dict[str, GGUFCodec] = {"fmin": Q41Blocks(), "ggml": GGMLBlocks()}


def _codec(config: QuantConfig) -> GGUFCodec | None:
    return CODECS.get(format_of(config).name)


def gguf_type(config: QuantConfig) -> int | None:
    """The GGUF tensor type whose blocks hold ``config``'s codes as they are, if any."""
    codec = _codec(config)
    return codec.ggml_type(config) if codec is not None else None


def gguf_config(ggml_type: int) -> QuantConfig | None:
    """The lorq config stored as GGUF type ``ggml_type``'s blocks, if any."""
    for codec in CODECS.values():
        config = codec.config_of(ggml_type)
        if config is not None:
            return config
    return None


def to_gguf(q: QuantizedTensor) -> torch.Tensor:
    """``q``'s GGUF blocks, uint8 (out × bytes per row); ValueError without a GGUF type."""
    codec = _codec(q.config)
    if codec is None or codec.ggml_type(q.config) is None:
        raise ValueError(
            f"{q.config.name} has no GGUF type; GGUF holds {', '.join(gguf_presets())}"
        )
    return codec.to_gguf(q)


def from_gguf(raw: torch.Tensor, shape: tuple[int, int], config: QuantConfig) -> QuantizedTensor:
    """The QuantizedTensor (``shape``, out × in) of GGUF blocks ``raw`` (rows × bytes)."""
    codec = _codec(config)
    if codec is None:
        raise ValueError(f"format {format_of(config).name!r} reads no GGUF type")
    return codec.from_gguf(raw, shape, config)


def gguf_presets() -> dict[str, QuantConfig]:
    """The presets whose codes a GGUF tensor type holds as they are (llama.cpp's types)."""
    return {name: c for name, c in presets().items() if gguf_type(c) is not None}


register_grid("gguf", lambda: tuple(gguf_presets().values()))
