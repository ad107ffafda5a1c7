"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers ``quant_method: "gptq"``).

For one linear layer with W (out × in), k ∈ {2, 3, 4, 8} bits and G = group_size:

    qweight  int32 (in·k/32, out)     codes packed along the input dimension, 32 codes in k words
    qzeros   int32 (in/G, out·k/32)   integer zero points packed along the output dimension
    scales   fp16  (in/G, out)
    g_idx    int32 (in,)              group of each input feature, i // G (act-order off)

    Ŵ[o, i] = scales[g, o] · (code[i, o] − zero[g, o]),   g = g_idx[i]

Packing: each run of 32 consecutive values along the packed dimension is one little-endian bit
string of 32·k bits split into k int32 words, value j at bits [k·j, k·j + k), low word first. For
k = 2, 4, 8 this is "value j of a word at shift k·j"; for k = 3 the values 10 and 21 straddle two
words (AutoGPTQ's 3-bit layout).

Zero points: ``checkpoint_format="gptq"`` (v1, what AutoGPTQ wrote and every loader reads) stores
zero − 1, so the zeros it can hold are 1 … 2^k; a group whose zero is 0 cannot be written in v1
(loaders would read 2^k, or corrupt the neighbouring zero). ``"gptq_v2"`` (GPTQModel) stores the
zero itself, 0 … 2^k − 1, exactly lorq's range.

Only integer-zero INT-k configs with fp16 scales map onto this layout (``int4-g32`` …); float-min
configs (``q4_1``) do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorq._version import __version__
from lorq.quant import IntConfig, QuantConfig, QuantizedTensor, format_of
from lorq.quant.affine import block_scales, block_zeros, unpacked_codes
from lorq.quant.packing import pack
from lorq.util.atomic import atomic_directory

PACK_VALUES = 32  # values per k int32 words
GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # the offset stored zeros carry: zero − offset
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _check_format(checkpoint_format: str) -> int:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported; allowed: "
            f"{', '.join(map(repr, CHECKPOINT_FORMATS))}"
        )
    return CHECKPOINT_FORMATS[checkpoint_format]


def check_gptq_config(config: QuantConfig) -> None:
    """ValueError unless ``config`` maps onto the GPTQ layout (INT-k, integer zeros, fp16)."""
    if format_of(config).name != "int":
        raise ValueError(
            f"GPTQ stores affine INT-k codes with integer zeros; {config.name} cannot be "
            "written as GPTQ: use an int preset such as int4-g32"
        )
    if config.scale_dtype != "fp16":
        raise ValueError(
            f"GPTQ stores fp16 scales; {config.name} has scale_dtype={config.scale_dtype!r}: "
            "quantize with scale_dtype='fp16' (the default of the int presets)"
        )
    if config.bits not in GPTQ_BITS:
        raise ValueError(f"bits={config.bits!r} is not supported by GPTQ; allowed: 2, 3, 4, 8")


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (n, C) integers < 2^bits along dim 0 into int32 words (n·bits/32, C); n % 32 == 0."""
    n, cols = values.shape
    v = values.to(torch.int64).reshape(n // PACK_VALUES, PACK_VALUES, cols)
    words = torch.zeros(n // PACK_VALUES, bits, cols, dtype=torch.int64, device=values.device)
    for j in range(PACK_VALUES):
        word, shift = divmod(bits * j, 32)
        words[:, word] |= v[:, j] << shift
        if shift + bits > 32:
            words[:, word + 1] |= v[:, j] >> (32 - shift)
    words &= 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(n // PACK_VALUES * bits, cols).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: (n·bits/32, C) int32 words → (n, C) int64 values."""
    rows, cols = words.shape
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, cols)
    mask = (1 << bits) - 1
    out = torch.empty(rows // bits, PACK_VALUES, cols, dtype=torch.int64, device=words.device)
    for j in range(PACK_VALUES):
        word, shift = divmod(bits * j, 32)
        value = w[:, word] >> shift
        if shift + bits > 32:
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, j] = value & mask
    return out.reshape(rows // bits * PACK_VALUES, cols)


def _check_shape(shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    if in_features % PACK_VALUES or out_features % PACK_VALUES:
        raise ValueError(
            f"GPTQ packs 32 values per k int32 words along in_features and out_features; the "
            f"layer of shape {shape} (out × in) has a dimension that is not a multiple of 32: "
            "keep this layer dense"
        )


def to_gptq(q: QuantizedTensor, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of a layer (see the module docstring)."""
    offset = _check_format(checkpoint_format)
    check_gptq_config(q.config)
    _check_shape(q.shape)
    (out_features, in_features), bits = q.shape, q.config.bits
    groups = in_features // q.config.block_size
    zeros = block_zeros(q).to(torch.int64).reshape(out_features, groups)
    if offset and bool((zeros < offset).any()):
        raise ValueError(
            f"{int((zeros < offset).sum())} group(s) have zero point 0, which the v1 GPTQ layout "
            "(it stores zero − 1) cannot hold; write checkpoint_format='gptq_v2' instead"
        )
    return {
        "qweight": pack_int32(unpacked_codes(q).T, bits),
        "qzeros": pack_int32(zeros - offset, bits).T.contiguous(),
        "scales": block_scales(q).reshape(out_features, groups).T.contiguous().half(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // q.config.block_size,
    }


def _layer_shape(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> tuple[int, int]:
    missing = [k for k in LAYER_TENSORS if k not in tensors]
    if missing:
        raise ValueError(f"GPTQ layer tensors {missing} are missing; need {list(LAYER_TENSORS)}")
    rows, out_features = tensors["qweight"].shape
    in_features = rows * PACK_VALUES // bits
    expected = {
        "qweight": ((in_features * bits // PACK_VALUES, out_features), torch.int32),
        "qzeros": ((in_features // group_size, out_features * bits // PACK_VALUES), torch.int32),
        "scales": ((in_features // group_size, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }
    for name, (shape, dtype) in expected.items():
        got = tensors[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise ValueError(
                f"GPTQ {name} has shape {tuple(got.shape)} and dtype {got.dtype}; expected "
                f"{shape} {dtype} for bits={bits}, group_size={group_size}, in={in_features}, "
                f"out={out_features}"
            )
    return out_features, in_features


def from_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq"
) -> QuantizedTensor:
    """Inverse of :func:`to_gptq` (bit-exact); act-order (a permuted ``g_idx``) is refused."""
    offset = _check_format(checkpoint_format)
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits={bits!r} is not supported by GPTQ; allowed: 2, 3, 4, 8")
    config = IntConfig(bits=bits, block_size=group_size, scale_dtype="fp16")
    out_features, in_features = _layer_shape(tensors, bits, group_size)
    _check_shape((out_features, in_features))
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    if not torch.equal(tensors["g_idx"].cpu(), g_idx):
        raise ValueError(
            "g_idx is not i // group_size: an act-order (desc_act) checkpoint or another group "
            "size; lorq reads only contiguous groups"
        )
    codes = unpack_int32(tensors["qweight"], bits).T
    zeros = unpack_int32(tensors["qzeros"].T.contiguous(), bits) + offset
    if bool((zeros > 2**bits - 1).any()):
        raise ValueError(
            f"the checkpoint has zero point {2**bits} (stored {2**bits - 1} in v1), which a "
            f"{bits}-bit lorq zero cannot hold"
        )
    buffers = {
        "codes": pack(codes.reshape(-1).to(torch.uint8), bits),
        "scales": tensors["scales"].T.contiguous().reshape(-1),
        "zeros": pack(zeros.reshape(-1).to(torch.uint8), bits),
    }
    return QuantizedTensor(config, (out_features, in_features), buffers)


def gptq_quantization_config(config: QuantConfig, checkpoint_format: str = "gptq") -> dict:
    """The ``quantization_config`` entry of config.json for layers quantized with ``config``."""
    _check_format(checkpoint_format)
    check_gptq_config(config)
    return {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.block_size,
        "desc_act": False,
        "sym": False,
        "static_groups": False,
        "true_sequential": False,
        "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": [f"lorq:{__version__}"]},
    }


def is_gptq_dir(path: Path) -> bool:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        return config["quantization_config"]["quant_method"] == "gptq"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _common_config(layers: dict[str, QuantizedTensor]) -> QuantConfig:
    if not layers:
        raise ValueError("no quantized layers given; a GPTQ checkpoint needs at least one")
    configs = {name: q.config for name, q in layers.items()}
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        if config != first:
            raise ValueError(
                f"GPTQ checkpoints hold one quantization config; layer {name!r} is "
                f"{config.name} but {first_name!r} is {first.name}: quantize them alike"
            )
    return first


def _checkpoint_tensors(
    layers: dict[str, QuantizedTensor], dense: dict[str, torch.Tensor], checkpoint_format: str
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, q in layers.items():
        if f"{name}.weight" in dense:
            raise ValueError(f"dense tensor {name}.weight clashes with quantized layer {name!r}")
        tensors.update({f"{name}.{k}": v for k, v in to_gptq(q, checkpoint_format).items()})
    clash = sorted(set(dense) & set(tensors))
    if clash:
        raise ValueError(f"dense tensors {clash} clash with the quantized layers' tensors")
    for name, tensor in dense.items():
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


def write_gptq_checkpoint(
    out_dir: str | Path,
    layers: dict[str, QuantizedTensor],
    dense: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    tokenizer: Any = None,
    overwrite: bool = False,
    checkpoint_format: str = "gptq",
) -> Path:
    """Write a Hugging Face GPTQ model directory atomically (:func:`write_gptq_files`)."""
    with atomic_directory(out_dir, overwrite, is_gptq_dir, "GPTQ model") as tmp:
        write_gptq_files(tmp, layers, dense, hf_config, tokenizer, checkpoint_format)
    return Path(out_dir)


def write_gptq_files(
    folder: Path,
    layers: dict[str, QuantizedTensor],
    dense: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    tokenizer: Any = None,
    checkpoint_format: str = "gptq",
) -> None:
    """The files of a Hugging Face GPTQ model directory, written into the existing ``folder``.

    ``layers``: {module name: QuantizedTensor} (one common INT-k config), stored as
    ``<name>.qweight / .qzeros / .scales / .g_idx``; ``dense``: every other tensor of the model by
    its state-dict name (embeddings, norms, the head, ``<name>.bias`` of quantized layers);
    ``hf_config``: the model's config dict, written with the GPTQ ``quantization_config``.
    """
    quantization = gptq_quantization_config(_common_config(layers), checkpoint_format)
    tensors = _checkpoint_tensors(layers, dense, checkpoint_format)
    config = {**hf_config, "quantization_config": quantization}
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
