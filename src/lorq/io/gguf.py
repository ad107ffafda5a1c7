"""GGUF import and export of packed weights, straight from the codes (no dequantize / requantize).

A matrix whose GGML type is the GGUF identity of a lorq format (``QuantFormat.gguf_type``; today
Q4_1 ↔ preset ``q4_1``, docs/algorithms.md §1.4) is read and written as that format's codes:
``QuantFormat.from_gguf`` / ``to_gguf`` convert its blocks. A GGUF tensor of ggml shape
ne = (in, out) stores ``out`` rows of blocks along the input dimension, the row-major block order
of a lorq ``QuantizedTensor`` of shape (out, in).

llama.cpp permutes the rows of attn_q / attn_k for its RoPE kernel (h < heads, d < head_dim / 2):

    GGUF row (h, d, j)  =  transformers row (h, j, d)        j ∈ {0, 1}

Groups run along the input dimension, so the permutation moves whole rows of blocks. Tensor names
come from the ``gguf`` package's ``TensorNameMap`` applied to the parameter names of the
transformers model, as transformers' GGUF loader does. Only the LLaMA architecture is supported.
Export writes dense tensors as F32 (1-D: norms, biases) and F16 (2-D: embeddings, a dense LM head
or any linear left unquantized); metadata and tokenizer come from a source GGUF when given.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorq.atomic import atomic_file, check_output
from lorq.quant import QuantFormat, QuantizedTensor, format_of, gguf_format

ARCHITECTURE = "llama"
MAGIC = b"GGUF"
DENSE_ROWS = 4096  # rows of a dense tensor dequantized at once
MAX_LISTED = 5  # names quoted in an error message
# KV pairs that describe the source file itself, never copied to an exported one
OWN_KEYS = (
    "GGUF.",
    "split.",
    "general.architecture",
    "general.alignment",
    "general.file_type",
    "general.quantization_version",
)
KV = dict[str, tuple[Any, Any, Any]]  # key -> (value, GGUFValueType, array element type or None)


def _open(path: Path):
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
    architecture = _field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported yet; "
            f"supported: {ARCHITECTURE!r} (LLaMA-family models)"
        )
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _int_field(reader, key: str, path: Path, default: int | None = None) -> int:
    value = _field(reader, key, default)
    if not isinstance(value, int):
        raise ValueError(f"{path}: metadata {key!r} is {value!r}, not an integer; incomplete GGUF")
    return value


def _rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Index ``perm`` with ``gguf_rows = hf_rows[perm]`` for a q/k weight of ``heads`` heads."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _rope_heads(gguf_name: str, heads: int, kv_heads: int) -> int | None:
    """Heads of a tensor llama.cpp permutes for RoPE (attn_q / attn_k), else None."""
    if ".attn_q." in gguf_name:
        return heads
    return kv_heads if ".attn_k." in gguf_name else None


def _gguf_names(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name and shape of every parameter of the transformers model ``config`` describes.

    The model is built on the meta device (nothing allocated); tied parameters are listed under
    every name (``lm_head.weight`` too).
    """
    import transformers
    from gguf import MODEL_ARCH, get_tensor_name_map

    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
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
    def packed_format(self) -> QuantFormat | None:
        """The lorq format that holds this matrix's codes as they are (None: decode densely)."""
        return gguf_format(self.tensor_type) if len(self.shape) == 2 else None

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
        return rows[torch.argsort(_rope_rows(rows.shape[0], self.rope_heads))]

    def quantized(self) -> QuantizedTensor:
        """A matrix of a lorq format (e.g. Q4_1 → q4_1) as a QuantizedTensor (out × in): the
        file's own codes, rows in transformers' order."""
        fmt = self.packed_format
        if fmt is None:
            raise ValueError(f"{self.name} ({self.tensor_type!r}) has no lorq format; decode it")
        raw = torch.from_numpy(self.read_rows())
        return fmt.from_gguf(self.rows_in_hf_order(raw), (self.rows, self.shape[0]))

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
    """Every tensor of a LLaMA GGUF file with its transformers parameter name."""
    path = Path(path)
    reader = _open(path)
    heads = _int_field(reader, "llama.attention.head_count", path)
    kv_heads = _int_field(reader, "llama.attention.head_count_kv", path, heads)
    names = _gguf_names({"num_hidden_layers": _int_field(reader, "llama.block_count", path)})
    to_param = {gguf: hf for hf, (gguf, _) in names.items()}
    return [
        LlamaTensor(
            param=to_param.get(t.name),
            name=t.name,
            tensor_type=t.tensor_type,
            shape=tuple(int(n) for n in t.shape),
            path=path,
            offset=int(t.data_offset),
            nbytes=int(t.n_bytes),
            rope_heads=_rope_heads(t.name, heads, kv_heads),
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
        if t.packed_format is None:
            continue
        if t.param is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no transformers LLaMA name")
        out[t.param.removesuffix(".weight")] = t.quantized()
    return out


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """F32 for 1-D tensors (norms, biases), F16 for 2-D ones (embeddings, dense linears)."""
    dtype = torch.float32 if tensor.dim() == 1 else torch.float16
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"GGUF export of rope_type={kind!r} is not supported yet; supported: plain RoPE "
            "(rope_type 'default'); save with lorq.save instead"
        )
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _check_config(config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type != ARCHITECTURE:
        raise ValueError(
            f"GGUF export of model_type={model_type!r} is not supported yet; supported: "
            f"{ARCHITECTURE!r} (LLaMA); save other models with lorq.save"
        )


def _llama_kv(config: dict[str, Any]) -> KV:
    """llama.* metadata of a transformers LlamaConfig dict (what transformers reads back)."""
    from gguf import GGUFValueType, Keys

    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    values = {
        Keys.LLM.CONTEXT_LENGTH: (config["max_position_embeddings"], u32),
        Keys.LLM.EMBEDDING_LENGTH: (config["hidden_size"], u32),
        Keys.LLM.BLOCK_COUNT: (config["num_hidden_layers"], u32),
        Keys.LLM.FEED_FORWARD_LENGTH: (config["intermediate_size"], u32),
        Keys.LLM.VOCAB_SIZE: (config["vocab_size"], u32),
        Keys.Attention.HEAD_COUNT: (heads, u32),
        Keys.Attention.HEAD_COUNT_KV: (config.get("num_key_value_heads") or heads, u32),
        Keys.Attention.LAYERNORM_RMS_EPS: (float(config["rms_norm_eps"]), f32),
        Keys.Rope.DIMENSION_COUNT: (head_dim, u32),
        Keys.Rope.FREQ_BASE: (_rope_theta(config), f32),
    }
    if head_dim * heads != config["hidden_size"]:
        values[Keys.Attention.KEY_LENGTH] = (head_dim, u32)
        values[Keys.Attention.VALUE_LENGTH] = (head_dim, u32)
    return {k.format(arch=ARCHITECTURE): (v, t, None) for k, (v, t) in values.items()}


def _byte_level_merges(tokenizer: Any) -> list[str]:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError(
            f"GGUF export without a source GGUF is not supported yet for a {model.get('type')!r} "
            "tokenizer; supported: byte-level BPE fast tokenizers, or pass source_gguf"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _tokenizer_kv(tokenizer: Any, vocab_size: int) -> KV:
    """tokenizer.ggml.* metadata ("gpt2" byte-level BPE) of a transformers fast tokenizer.

    Ids the tokenizer lacks up to ``vocab_size`` become ``[PAD<i>]`` tokens of type UNUSED;
    ``tokenizer.ggml.pre`` is "default" (llama.cpp's GPT-2 split; a source GGUF keeps its own).
    """
    from gguf import GGUFValueType, Keys, TokenType

    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("GGUF export needs a fast (tokenizers-backed) tokenizer or source_gguf")
    merges = _byte_level_merges(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids reach {max(vocab.values())} ≥ vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    kinds = [int(TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        tokens[index], kinds[index] = token, int(TokenType.NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        kinds[index] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    s, arr, tk = GGUFValueType.STRING, GGUFValueType.ARRAY, Keys.Tokenizer
    kv: KV = {tk.MODEL: ("gpt2", s, None), tk.PRE: ("default", s, None)}
    kv[tk.LIST] = (tokens, arr, s)
    kv[tk.TOKEN_TYPE] = (kinds, arr, GGUFValueType.INT32)
    if merges:
        kv[tk.MERGES] = (merges, arr, s)
    ids = {tk.BOS_ID: "bos", tk.EOS_ID: "eos", tk.UNK_ID: "unk", tk.PAD_ID: "pad"}
    for key, name in ids.items():
        if getattr(tokenizer, f"{name}_token", None) is not None:
            kv[key] = (int(getattr(tokenizer, f"{name}_token_id")), GGUFValueType.UINT32, None)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        kv[tk.CHAT_TEMPLATE] = (tokenizer.chat_template, s, None)
    return kv


def _source_kv(source: Path, expected: KV) -> KV:
    """Every KV pair of ``source`` except those describing the file itself; checks the shapes."""
    from gguf import GGUFValueType

    reader = _open(source)
    kv: KV = {}
    for key, field in reader.fields.items():
        if key.startswith(OWN_KEYS) or not field.types:
            continue
        value, kind = field.contents(), field.types[0]
        if kind == GGUFValueType.ARRAY and len(field.types) != 2:
            raise ValueError(f"{source}: metadata {key!r} is a nested array; not supported yet")
        if kind == GGUFValueType.ARRAY and not value:
            continue  # GGUF cannot store an empty array
        kv[key] = (value, kind, field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for key, (value, kind, _) in expected.items():
        if kind == GGUFValueType.UINT32 and key in kv and kv[key][0] != value:
            raise ValueError(
                f"{source} has {key}={kv[key][0]} but the model has {value}; pass the GGUF the "
                "model was loaded from, or no source_gguf"
            )
    return kv


def _tensors(
    layers: dict[str, QuantizedTensor], dense: dict[str, torch.Tensor], config: dict[str, Any]
) -> list[tuple[str, torch.Tensor, bool]]:
    """(GGUF name, data, GGML type or None for dense) of every tensor to write, in the model's
    parameter order."""
    names = _gguf_names(config)
    given = {f"{name}.weight": q for name, q in layers.items()}
    tied = bool(config.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in given:
        raise ValueError("a quantized lm_head needs tie_word_embeddings=False; untie it first")
    both = sorted(set(given) & set(dense))
    unknown = sorted(set(given).union(dense) - set(names))
    wanted = [n for n in names if not (tied and n == "lm_head.weight")]
    missing = [n for n in wanted if n not in given and n not in dense]
    for problem, bad in (("both quantized and dense", both), ("not LLaMA parameters", unknown)):
        if bad:
            raise ValueError(f"GGUF export: {bad[:MAX_LISTED]} are {problem}; pass each once")
    if missing:
        raise ValueError(f"GGUF export: missing tensors {missing[:MAX_LISTED]}; pass them in dense")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    out = []
    for name in wanted:
        gguf_name, shape = names[name]
        item = given.get(name, dense.get(name))
        if tuple(item.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(item.shape)}, the config says {shape}")
        ggml_type = None
        if isinstance(item, QuantizedTensor):
            fmt = format_of(item.config)
            ggml_type = fmt.gguf_type(item.config)
            if ggml_type is None:
                raise ValueError(
                    f"GGUF export of {name} quantized as {item.config.name!r} is not supported "
                    "yet; supported: the 'q4_1' preset (INT4, group 32, fp16 scale and min)"
                )
            data = fmt.to_gguf(item)
        else:
            data = _dense(item)
        rope = _rope_heads(gguf_name, heads, kv_heads)
        data = data if rope is None else data[_rope_rows(data.shape[0], rope)]
        out.append((gguf_name, data, ggml_type))
    return out


def _file_type(tensors: list[tuple[str, torch.Tensor, int | None]]) -> int:
    """general.file_type: the most common quantized type's ``MOSTLY_*``, else F16."""
    from gguf import GGMLQuantizationType
    from gguf import LlamaFileType as FileType

    counts = Counter(t for _, _, t in tensors if t is not None)
    if not counts:
        return int(FileType.MOSTLY_F16)
    name = GGMLQuantizationType(counts.most_common(1)[0][0]).name
    return int(getattr(FileType, f"MOSTLY_{name}", FileType.GUESSED))


def _write(path: Path, kv: KV, tensors: list[tuple[str, torch.Tensor, int | None]]) -> None:
    from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, Keys

    writer = GGUFWriter(path, ARCHITECTURE)
    file_type = _file_type(tensors)
    kv = {**kv, Keys.General.FILE_TYPE: (int(file_type), GGUFValueType.UINT32, None)}
    kv[Keys.General.QUANTIZATION_VERSION] = (GGML_QUANT_VERSION, GGUFValueType.UINT32, None)
    for key, (value, kind, sub_kind) in kv.items():
        writer.add_key_value(key, value, kind, sub_kind)
    for name, data, ggml_type in tensors:
        writer.add_tensor(name, data.numpy(), raw_dtype=ggml_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_gguf(
    out_file: str | Path,
    layers: dict[str, QuantizedTensor],
    dense: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    source_gguf: str | Path | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a LLaMA model as a GGUF file: q4_1 ``layers`` as Q4_1 blocks, the rest from ``dense``.

    ``layers``: module name → QuantizedTensor (q4_1 preset), written bit-exactly. ``dense``: every
    other parameter by name (``model.norm.weight``, ``model.embed_tokens.weight``, …), 1-D as F32,
    2-D as F16; a tied ``lm_head.weight`` is dropped. ``hf_config``: ``model.config.to_dict()``.
    Metadata and tokenizer are copied from ``source_gguf`` when given (``tokenizer`` is then
    unused); otherwise built from ``hf_config`` and, if given, a byte-level BPE fast tokenizer.
    The file appears atomically; an existing one is replaced only with ``overwrite``.
    """
    path = Path(out_file)
    check_output(path, overwrite)
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    _check_config(config)
    kv = _llama_kv(config)
    if source_gguf is not None:
        kv = _source_kv(Path(source_gguf), kv)
    elif tokenizer is not None:
        kv.update(_tokenizer_kv(tokenizer, config["vocab_size"]))
    tensors = _tensors(layers, dense, config)
    with atomic_file(path, overwrite) as tmp:
        _write(tmp, kv, tensors)
    return path
