"""GGUF import and export of packed weights, straight from the codes (no dequantize / requantize).

A matrix whose GGML type is the GGUF identity of a lorq format (``lorq.io.gguf_types``: Q4_1 ↔
``q4_1``, Q4_K ↔ ``q4_k``, …) is read and written as that format's codes. A GGUF tensor of ggml
shape ne = (in, out) stores ``out`` rows of blocks along the input dimension, the row-major block
order of a lorq ``QuantizedTensor`` of shape (out, in).

llama.cpp permutes the rows of attn_q / attn_k for its RoPE kernel (h < heads, d < head_dim / 2):

    GGUF row (h, d, j)  =  transformers row (h, j, d)        j ∈ {0, 1}

Groups run along the input dimension, so the permutation moves whole rows of blocks. Tensor names
come from the ``gguf`` package's ``TensorNameMap`` applied to the parameter names of the
transformers model, as transformers' GGUF loader does. The architectures read and written, and
what each stores differently (RoPE row order, norm offsets), are ``lorq.io.gguf_arch``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorq.io.gguf_arch import Architecture, gguf_enum, of_gguf, of_model_type
from lorq.io.gguf_types import from_gguf, gguf_config
from lorq.quant import QuantConfig, QuantizedTensor
from lorq.util.atomic import has_magic

MAGIC = b"GGUF"
DENSE_ROWS = 4096  # rows of a dense tensor dequantized at once
MAX_LISTED = 5  # names quoted in an error message
SMALL_ARRAY = 4096  # metadata arrays gguf_header keeps (a vocabulary is longer)
is_gguf_file = has_magic(MAGIC)


def open_gguf(path: Path):
    """A GGUFReader on ``path``; ValueError naming the file when it is not a readable GGUF."""
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    with path.open("rb") as file:
        if file.read(4) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes); pass a .gguf file")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise ValueError(f"{path} is a corrupted or truncated GGUF file ({err})") from None
    if reader.byte_order != "I":
        raise ValueError(
            f"{path} is a big-endian GGUF file; only little-endian files are supported"
        )
    size = path.stat().st_size
    for tensor in reader.tensors:
        check_type(path, tensor.name, tensor.tensor_type)
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ValueError(
                f"{path} is truncated: tensor {tensor.name!r} ends past the file's {size} bytes; "
                "copy or download it again"
            )
    of_gguf(field_value(reader, "general.architecture"), f"{path}: ")
    return reader


@dataclass(frozen=True)
class Header:
    """A GGUF file's metadata (arrays longer than ``SMALL_ARRAY``, the vocabulary, left out)
    and tensor infos: (name, GGML type, ggml shape, data offset, data bytes)."""

    fields: dict[str, Any]
    tensors: tuple[tuple[str, Any, tuple[int, ...], int, int], ...]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def gguf_header(path: str | Path) -> Header:
    """The checked header of a GGUF file (:func:`open_gguf`), parsed once per file version: a
    job reads it for the config and the tensor listing without a second parse."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _header(str(path.resolve()), (stat.st_mtime_ns, stat.st_size) if stat else None)


@functools.lru_cache(maxsize=4)
def _header(path: str, stamp: tuple[int, int] | None) -> Header:
    reader = open_gguf(Path(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if len(f.data) <= SMALL_ARRAY}
    tensors = tuple(
        (t.name, t.tensor_type, tuple(int(n) for n in t.shape), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors
    )
    return Header(fields, tensors)


def check_type(path: Path, name: str, tensor_type: Any) -> None:
    """ValueError naming a tensor whose GGML type neither lorq nor ``gguf`` can decode."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)][1]
    try:
        dequantize(np.zeros((1, block_bytes), np.uint8), tensor_type)
    except NotImplementedError:
        from lorq.io.gguf_types import gguf_presets

        raise ValueError(
            f"{path}: tensor {name!r} is of GGML type {GGMLQuantizationType(tensor_type).name}, "
            "which lorq cannot decode; lorq reads F32, F16, BF16 and llama.cpp's quantized types "
            f"(packed as they are: {', '.join(gguf_presets())}); re-quantize the file with "
            "llama-quantize to one of those"
        ) from None


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def int_field(header: Header, key: str, path: Path, default: int | None = None) -> int:
    value = header.get(key, default)
    if not isinstance(value, int):
        raise ValueError(f"{path}: metadata {key!r} is {value!r}, not an integer; incomplete GGUF")
    return value


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Index ``perm`` with ``gguf_rows = hf_rows[perm]`` for a q/k weight of ``heads`` heads."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def rope_heads(gguf_name: str, heads: int, kv_heads: int) -> int | None:
    """Heads of a tensor llama.cpp permutes for RoPE (attn_q / attn_k), else None."""
    if ".attn_q." in gguf_name:
        return heads
    return kv_heads if ".attn_k." in gguf_name else None


def in_file_order(arch: Architecture, gguf_name: str, data, config: dict[str, Any]):
    """``data`` (rows in transformers' order) with its rows as ``arch`` stores tensor
    ``gguf_name``: llama.cpp's RoPE order for a permuted architecture's attn_q / attn_k."""
    if not arch.rope_permuted:
        return data
    heads = config["num_attention_heads"]
    rope = rope_heads(gguf_name, heads, config.get("num_key_value_heads") or heads)
    return data if rope is None else data[rope_rows(data.shape[0], rope)]


def gguf_names(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name and shape of every parameter of the transformers model ``config`` describes
    (its ``model_type``: llama when absent; ``lorq.io.gguf_arch``).

    The model is built on the meta device (nothing allocated); tied parameters are listed under
    every name (``lm_head.weight`` too).
    """
    from gguf import get_tensor_name_map
    from transformers import AutoConfig

    from lorq.model.skeleton import skeleton

    arch = of_model_type(config.get("model_type"))
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config.get("model_type") or arch.model_type, **fields)
    model = skeleton(hf_config, causal=True, real_buffers=False)
    name_map = get_tensor_name_map(gguf_enum(arch), model.config.num_hidden_layers)
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            out[name] = (gguf_name, tuple(param.shape))
    return out


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file and the transformers parameter it holds (None: none).

    It keeps where the bytes are, not the file's reader: the reader's parsed metadata (the
    vocabulary as Python objects) and its memory map are released once the listing is made, and
    each tensor's bytes are read when asked for.
    """

    param: str | None  # e.g. ``model.layers.0.self_attn.q_proj.weight``
    name: str  # the GGUF tensor name, e.g. ``blk.0.attn_q.weight``
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: ne0 (the input / row length) first
    path: Path
    offset: int  # of the first byte in the file
    nbytes: int
    rope_heads: int | None  # heads of an attn_q / attn_k tensor llama.cpp permuted, else None
    shift: float = 0.0  # the file holds transformers' value + shift (Gemma's norms)

    @property
    def packed_config(self) -> QuantConfig | None:
        """The lorq config whose codes are this matrix's as they are (None: decode densely)."""
        return gguf_config(self.tensor_type) if len(self.shape) == 2 else None

    @property
    def rows(self) -> int:
        """Rows in transformers' order of dimensions (the outermost ggml dimension)."""
        return self.shape[-1]

    def read_rows(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """The file's bytes of rows ``start … start + count``, shape (count, bytes per row)."""
        row_bytes = self.nbytes // self.rows
        count = self.rows - start if count is None else min(count, self.rows - start)
        size = count * row_bytes
        data = np.fromfile(self.path, np.uint8, size, offset=self.offset + start * row_bytes)
        if data.size != size:
            raise ValueError(f"{self.path} is truncated: tensor {self.name!r} ends past the file")
        return data.reshape(count, row_bytes)

    def rows_in_hf_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's RoPE row permutation (a no-op for the other tensors)."""
        if self.rope_heads is None:
            return rows
        return rows[torch.argsort(rope_rows(rows.shape[0], self.rope_heads))]

    def quantized(self) -> QuantizedTensor:
        """A matrix of a lorq format (e.g. Q4_1 → q4_1) as a QuantizedTensor (out × in): the
        file's own codes, rows in transformers' order."""
        config = self.packed_config
        if config is None:
            raise ValueError(f"{self.name} ({self.tensor_type!r}) has no lorq format; decode it")
        raw = torch.from_numpy(self.read_rows())
        shape = (self.rows, self.shape[0])
        return from_gguf(self.rows_in_hf_order(raw), shape, config)

    def dense(self) -> torch.Tensor:
        """The tensor dequantized to float32 in transformers' shape and row order (decoded
        ``DENSE_ROWS`` rows at a time: gguf's dequantize holds a few copies of its input)."""
        from gguf.quants import dequantize

        out = torch.empty(tuple(reversed(self.shape)), dtype=torch.float32)
        for start in range(0, self.rows, DENSE_ROWS):
            chunk = out[start : start + DENSE_ROWS]
            values = dequantize(self.read_rows(start, DENSE_ROWS), self.tensor_type)
            chunk.copy_(torch.from_numpy(values.astype(np.float32).reshape(chunk.shape)))
        out = out - self.shift if self.shift else out
        return self.rows_in_hf_order(out)


def gguf_tensors(path: str | Path) -> list[GGUFTensor]:
    """Every tensor of a GGUF file of a readable architecture with its transformers name."""
    path = Path(path)
    header = gguf_header(path)
    arch: Architecture = of_gguf(header.get("general.architecture"))
    heads = int_field(header, f"{arch.gguf}.attention.head_count", path)
    kv_heads = int_field(header, f"{arch.gguf}.attention.head_count_kv", path, heads)
    layers = int_field(header, f"{arch.gguf}.block_count", path)
    names = gguf_names({"model_type": arch.model_type, "num_hidden_layers": layers})
    to_param = {gguf: hf for hf, (gguf, _) in names.items()}
    return [
        GGUFTensor(
            param=to_param.get(name),
            name=name,
            tensor_type=tensor_type,
            shape=shape,
            path=path,
            offset=offset,
            nbytes=nbytes,
            rope_heads=rope_heads(name, heads, kv_heads) if arch.rope_permuted else None,
            shift=arch.stored(name),
        )
        for name, tensor_type, shape, offset, nbytes in header.tensors
    ]


def read_gguf_quantized(path: str | Path) -> dict[str, QuantizedTensor]:
    """Every 2-D tensor of a lorq format (Q4_1, Q4_K, …) in a GGUF file as a QuantizedTensor, by
    HF module name.

    Keys are module names of the transformers model (``model.layers.0.self_attn.q_proj``); the
    codes, scales and mins are the file's own, with attn_q / attn_k rows put back in transformers'
    order. Tensors of any other type are skipped (load those densely).
    """
    out: dict[str, QuantizedTensor] = {}
    for t in gguf_tensors(path):
        if t.packed_config is None:
            continue
        if t.param is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no transformers name")
        out[t.param.removesuffix(".weight")] = t.quantized()
    return out
