"""Writing a model as a GGUF file, packed layers as their codes (``lorq.io.gguf`` reads).

Every QuantizedTensor whose format has a GGUF identity (``lorq.io.gguf_types``: q4_1 → Q4_1,
q8_0 → Q8_0) is written as its blocks, bit for bit; dense tensors as F32 (1-D: norms, biases) and
F16 (2-D: embeddings, a dense LM head or any linear left unquantized), each as its architecture
stores it (``lorq.io.gguf_arch``: llama's attn_q / attn_k rows permuted for RoPE, Gemma's norms
as 1 + w). Metadata and tokenizer come from a source GGUF when given, else from the Hugging Face
config (``lorq.io.gguf_meta``) and a byte-level BPE tokenizer. The file appears atomically.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lorq.io.gguf import MAX_LISTED, gguf_names, in_file_order, is_gguf_file, open_gguf
from lorq.io.gguf_arch import of_model_type
from lorq.io.gguf_meta import ROPE_FREQS, llama3_factors, model_kv
from lorq.io.gguf_types import gguf_presets, gguf_type, to_gguf
from lorq.quant import QuantizedTensor
from lorq.util.atomic import atomic_file, check_output

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


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """F32 for 1-D tensors (norms, biases), F16 for 2-D ones (embeddings, dense linears)."""
    dtype = torch.float32 if tensor.dim() == 1 else torch.float16
    if tensor.is_meta:  # sizes only (a budget measured on a model read part by part)
        return torch.empty(tensor.shape, dtype=dtype, device="meta")
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _byte_level_merges(tokenizer: Any) -> list[str]:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError(
            f"GGUF export without a source GGUF is not supported yet for a {model.get('type')!r} "
            "tokenizer; supported: byte-level BPE fast tokenizers, or pass source_gguf"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's split: "gpt-2" for GPT-2's own byte-level regex."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return "gpt-2" if state.get("type") == "ByteLevel" and state.get("use_regex") else "default"


def _tokenizer_kv(tokenizer: Any, vocab_size: int) -> KV:
    """tokenizer.ggml.* metadata ("gpt2" byte-level BPE) of a transformers fast tokenizer.

    Ids the tokenizer lacks up to ``vocab_size`` become ``[PAD<i>]`` tokens of type UNUSED;
    ``tokenizer.ggml.pre`` is "gpt-2" for a plain byte-level pre-tokenizer (GPT-2's split),
    else "default" (a source GGUF keeps its own); ``add_bos_token`` / ``add_eos_token`` say what
    the tokenizer itself adds to a text.
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
    kv: KV = {tk.MODEL: ("gpt2", s, None), tk.PRE: (_pre_tokenizer(tokenizer), s, None)}
    kv[tk.LIST] = (tokens, arr, s)
    kv[tk.TOKEN_TYPE] = (kinds, arr, GGUFValueType.INT32)
    if merges:
        kv[tk.MERGES] = (merges, arr, s)
    ids = {tk.BOS_ID: "bos", tk.EOS_ID: "eos", tk.UNK_ID: "unk", tk.PAD_ID: "pad"}
    for key, name in ids.items():
        if getattr(tokenizer, f"{name}_token", None) is not None:
            kv[key] = (int(getattr(tokenizer, f"{name}_token_id")), GGUFValueType.UINT32, None)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    kv[tk.ADD_BOS] = (len(marked) > len(plain) and marked[0] != plain[0], GGUFValueType.BOOL, None)
    kv[tk.ADD_EOS] = (
        len(marked) > len(plain) and marked[-1] != plain[-1],
        GGUFValueType.BOOL,
        None,
    )
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        kv[tk.CHAT_TEMPLATE] = (tokenizer.chat_template, s, None)
    return kv


def _source_kv(source: Path, expected: KV) -> KV:
    """Every KV pair of ``source`` except those describing the file itself; checks the shapes."""
    from gguf import GGUFValueType

    reader = open_gguf(source)
    arch = expected["general.architecture"]
    if reader.fields["general.architecture"].contents() != arch[0]:
        raise ValueError(
            f"{source} is a {reader.fields['general.architecture'].contents()!r} GGUF but the "
            f"model is {arch[0]!r}; pass the GGUF the model was loaded from, or no source_gguf"
        )
    kv: KV = {"general.architecture": arch}
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
    names = gguf_names(config)
    given = {f"{name}.weight": q for name, q in layers.items()}
    tied = bool(config.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in given:
        raise ValueError("a quantized lm_head needs tie_word_embeddings=False; untie it first")
    if tied:  # the embedding's own tensor (some architectures' name maps have no output)
        dense = {k: v for k, v in dense.items() if k != "lm_head.weight"}
    both = sorted(set(given) & set(dense))
    unknown = sorted(set(given).union(dense) - set(names))
    wanted = [n for n in names if not (tied and n == "lm_head.weight")]
    missing = [n for n in wanted if n not in given and n not in dense]
    for problem, bad in (
        ("both quantized and dense", both),
        ("not the model's parameters", unknown),
    ):
        if bad:
            raise ValueError(f"GGUF export: {bad[:MAX_LISTED]} are {problem}; pass each once")
    if missing:
        raise ValueError(f"GGUF export: missing tensors {missing[:MAX_LISTED]}; pass them in dense")
    arch = of_model_type(config.get("model_type"))
    out = []
    for name in wanted:
        gguf_name, shape = names[name]
        item = given.get(name, dense.get(name))
        if tuple(item.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(item.shape)}, the config says {shape}")
        ggml_type = None
        if isinstance(item, QuantizedTensor):
            ggml_type = gguf_type(item.config)
            if ggml_type is None:
                raise ValueError(
                    f"GGUF export of {name} quantized as {item.config.name!r} is not supported: "
                    f"GGUF holds the presets {', '.join(gguf_presets())}; compress with one"
                )
            data = to_gguf(item)
        else:
            data = _dense(item)
            offset = arch.stored(gguf_name)
            data = data + offset if offset and not data.is_meta else data
        out.append((gguf_name, in_file_order(arch, gguf_name, data, config), ggml_type))
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


def _writer(path: Path, kv: KV, file_type: int) -> Any:
    """A GGUFWriter of ``path`` holding ``kv`` (its ``general.architecture`` too) and the keys
    every file gets."""
    from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, Keys

    kv = dict(kv)
    writer = GGUFWriter(path, kv.pop(Keys.General.ARCHITECTURE)[0])
    kv = {**kv, Keys.General.FILE_TYPE: (int(file_type), GGUFValueType.UINT32, None)}
    kv[Keys.General.QUANTIZATION_VERSION] = (GGML_QUANT_VERSION, GGUFValueType.UINT32, None)
    for key, (value, kind, sub_kind) in kv.items():
        writer.add_key_value(key, value, kind, sub_kind)
    return writer


def write_file(path: Path, kv: KV, tensors: list[tuple[str, torch.Tensor, int | None]]) -> None:
    writer = _writer(path, kv, _file_type(tensors))
    for name, data, ggml_type in tensors:
        writer.add_tensor(name, data.numpy(), raw_dtype=ggml_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def file_size(kv: KV, tensors: list[tuple[str, tuple[int, ...], int]]) -> int:
    """Bytes :func:`write_file` writes for ``kv`` and tensors of these (name, shape, data bytes):
    the header, metadata and tensor infos (measured by writing them), then every tensor's data
    padded to the file's alignment. Writes no tensor data."""
    import tempfile

    import numpy as np
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        writer = _writer(path, kv, 0)
        for name, shape, nbytes in tensors:
            writer.add_tensor_info(name, shape, np.dtype(np.float16), nbytes)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        header = path.stat().st_size
    align = writer.data_alignment
    return GGUFWriter.ggml_pad(header, align) + sum(
        GGUFWriter.ggml_pad(n, align) for _, _, n in tensors
    )


def gguf_contents(
    layers: dict[str, QuantizedTensor],
    dense: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    source_gguf: str | Path | None = None,
    tokenizer: Any = None,
) -> tuple[KV, list[tuple[str, torch.Tensor, int | None]]]:
    """(metadata, tensors) of the GGUF file :func:`write_gguf` writes, every input checked."""
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    kv = model_kv(config)
    factors = llama3_factors(config)  # llama.cpp's converter writes them first
    extra = [] if factors is None else [(ROPE_FREQS, factors, None)]
    if source_gguf is not None:
        kv = _source_kv(Path(source_gguf), kv)
    elif tokenizer is not None:
        kv.update(_tokenizer_kv(tokenizer, config["vocab_size"]))
    return kv, extra + _tensors(layers, dense, config)


def write_gguf(
    out_file: str | Path,
    layers: dict[str, QuantizedTensor],
    dense: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    source_gguf: str | Path | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a LLaMA model as a GGUF file: ``layers`` as their GGUF blocks, the rest from ``dense``.

    ``layers``: module name → QuantizedTensor of a preset with a GGUF type (q4_0, q4_1, q5_0,
    q5_1, q8_0), written bit-exactly. ``dense``: every other parameter by name
    (``model.norm.weight``, ``model.embed_tokens.weight``, …), 1-D as F32, 2-D as F16; a tied
    ``lm_head.weight`` is dropped. ``hf_config``: ``model.config.to_dict()``. Metadata and
    tokenizer are copied from ``source_gguf`` when given (``tokenizer`` is then unused);
    otherwise built from ``hf_config`` and, if given, a byte-level BPE fast tokenizer. The file
    appears atomically; an existing one is replaced only with ``overwrite``.
    """
    check_output(Path(out_file), overwrite, is_gguf_file, "GGUF", directory=False)
    contents = gguf_contents(layers, dense, hf_config, source_gguf, tokenizer)
    return write_contents(out_file, contents, overwrite)


def write_contents(out_file: str | Path, contents: tuple[KV, list], overwrite: bool) -> Path:
    """Write :func:`gguf_contents` atomically to ``out_file``."""
    path = Path(out_file)
    with atomic_file(path, overwrite, is_gguf_file, "GGUF") as tmp:
        write_file(tmp, *contents)
    return path
