"""GGUF import and export of packed weights, straight from the codes (no dequantize / requantize).

A matrix whose GGML type is the GGUF identity of a lorq format (``lorq.io.gguf_types``: Q4_1 ↔
``q4_1``, Q4_K ↔ ``q4_k``, …) is read and written as that format's codes. A GGUF tensor of ggml
shape ne = (in, out) stores ``out`` rows of blocks along the input dimension, the row-major block
order of a lorq ``QuantizedTensor`` of shape (out, in).

llama.cpp permutes the rows of attn_q / attn_k for its RoPE kernel (h < heads, d < head_dim / 2):

    GGUF row (h, d, j)  =  transformers row (h, j, d)        j ∈ {0, 1}

Groups run along the input dimension, so the permutation moves whole rows of blocks. Tensor names
come from the ``gguf`` package's ``TensorNameMap`` applied to the parameter names of the
transformers model, as transformers' GGUF loader does. Read: the architectures of LLaMA's tensor
layout (``READ_ARCHITECTURES``: llama — Mistral's GGUFs are written as llama — and qwen2, whose
attn_q / attn_k rows llama.cpp does not permute and whose q/k/v have biases). Written: llama
(``lorq.io.gguf_write``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorq.io.gguf_types import from_gguf, gguf_config
from lorq.quant import QuantConfig, QuantizedTensor
from lorq.util.atomic import has_magic

ARCHITECTURE = "llama"  # what lorq writes
READ_ARCHITECTURES = ("llama", "qwen2")  # what lorq reads packed (LLaMA's tensor layout)
ROPE_PERMUTED = ("llama",)  # architectures whose attn_q / attn_k rows llama.cpp permutes
MAGIC = b"GGUF"
DENSE_ROWS = 4096  # rows of a dense tensor dequantized at once
MAX_LISTED = 5  # names quoted in an error message
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
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ValueError(
                f"{path} is truncated: tensor {tensor.name!r} ends past the file's {size} bytes; "
                "copy or download it again"
            )
    architecture = field_value(reader, "general.architecture")
    if architecture not in READ_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported yet; "
            f"supported: {', '.join(READ_ARCHITECTURES)} (LLaMA-family models)"
        )
    return reader


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def int_field(reader, key: str, path: Path, default: int | None = None) -> int:
    value = field_value(reader, key, default)
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


def _architecture(name: str) -> tuple[Any, Any, Any]:
    """(transformers config class, model class, gguf MODEL_ARCH) of a readable architecture."""
    import transformers
    from gguf import MODEL_ARCH

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, MODEL_ARCH.LLAMA),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, MODEL_ARCH.QWEN2),
    }
    if name not in classes:
        raise ValueError(
            f"GGUF architecture {name!r} is not supported yet; supported: "
            f"{', '.join(READ_ARCHITECTURES)} (LLaMA-family models)"
        )
    return classes[name]


def gguf_names(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name and shape of every parameter of the transformers model ``config`` describes
    (its ``model_type``: llama when absent, or qwen2).

    The model is built on the meta device (nothing allocated); tied parameters are listed under
    every name (``lm_head.weight`` too).
    """
    from gguf import get_tensor_name_map

    config_cls, model_cls, arch = _architecture(config.get("model_type") or ARCHITECTURE)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    from lorq.model.skeleton import skeleton

    model = skeleton(config_cls(**fields), model_class=model_cls, real_buffers=False)
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            out[name] = (gguf_name, tuple(param.shape))
    return out


@dataclass(frozen=True)
class LlamaTensor:
    """One tensor of a LLaMA GGUF file and the transformers parameter it holds (None: none).

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
        return self.rows_in_hf_order(out)


def llama_tensors(path: str | Path) -> list[LlamaTensor]:
    """Every tensor of a LLaMA-family GGUF file with its transformers parameter name."""
    path = Path(path)
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    heads = int_field(reader, f"{arch}.attention.head_count", path)
    kv_heads = int_field(reader, f"{arch}.attention.head_count_kv", path, heads)
    layers = int_field(reader, f"{arch}.block_count", path)
    names = gguf_names({"model_type": arch, "num_hidden_layers": layers})
    to_param = {gguf: hf for hf, (gguf, _) in names.items()}
    permuted = arch in ROPE_PERMUTED
    return [
        LlamaTensor(
            param=to_param.get(t.name),
            name=t.name,
            tensor_type=t.tensor_type,
            shape=tuple(int(n) for n in t.shape),
            path=path,
            offset=int(t.data_offset),
            nbytes=int(t.n_bytes),
            rope_heads=rope_heads(t.name, heads, kv_heads) if permuted else None,
        )
        for t in reader.tensors
    ]


def read_gguf_quantized(path: str | Path) -> dict[str, QuantizedTensor]:
    """Every 2-D tensor of a lorq format (Q4_1) in a LLaMA GGUF file as a QuantizedTensor, by HF
    module name.

    Keys are module names of the transformers model (``model.layers.0.self_attn.q_proj``); the
    codes, scales and mins are the file's own, with attn_q / attn_k rows put back in transformers'
    order. Tensors of any other type are skipped (load those densely).
    """
    out: dict[str, QuantizedTensor] = {}
    for t in llama_tensors(path):
        if t.packed_config is None:
            continue
        if t.param is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no transformers LLaMA name")
        out[t.param.removesuffix(".weight")] = t.quantized()
    return out
