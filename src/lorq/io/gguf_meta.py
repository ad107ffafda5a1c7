"""The hyper-parameters of a GGUF file, both ways, as llama.cpp's converter and loader use them.

    write   model_kv(config)        {arch}.* keys of a transformers config: the converter's keys
                                    for that architecture (``convert_hf_to_gguf.py``)
    read    read_config(path)       transformers' config of the file, with the fields its GGUF
                                    mapping leaves at their defaults set from the file as
                                    llama.cpp reads them (head_dim, soft-capping, local RoPE
                                    base, sliding-window layers, partial RoPE, …)

A model whose hyper-parameters llama.cpp cannot represent (a RoPE scaling other than linear, an
attention scale llama.cpp does not compute, Qwen2's sliding window) is refused on export with
the field named, so no file is written that llama.cpp would run differently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorq.io.gguf_arch import Architecture, of_model_type

KV = dict[str, tuple[Any, Any, Any]]  # key -> (value, GGUFValueType, array element type or None)
SWA, FULL = "sliding_attention", "full_attention"
GEMMA_PATTERN = 6  # llama.cpp's gemma3 default: every 6th layer attends globally
BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # 27B: llama.cpp scales q by hidden/heads
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE frequency divisors, one per rotated pair
LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_factors(config: dict[str, Any]) -> torch.Tensor | None:
    """The divisors of RoPE's frequencies llama.cpp reads as ``rope_freqs`` for a model of
    rope_type "llama3" (None otherwise), as its converter computes them: 1 for short wavelengths,
    ``factor`` for long ones, a smooth step between."""
    rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, old = rope.get("factor", 8.0), rope.get("original_max_position_embeddings", 8192)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(out), out)
    return torch.where(wavelen > old / low, torch.full_like(out, factor), out).float()


def _llama3_fields(header, path: Path, config) -> dict[str, Any]:
    """Llama 3's RoPE parameters from the file's rope_freqs: the one family of every Llama 3.x
    (low 1, high 4, 8192 original positions; factor the largest divisor), checked to give the
    file's divisors; ValueError for divisors of any other shape."""
    name, kind, _, offset, nbytes = next(t for t in header.tensors if t[0] == ROPE_FREQS)
    if int(kind) != 0:  # GGML F32, as the converter writes it
        raise ValueError(
            f"{path}: {name} is not F32; the file was not written by llama.cpp's tools"
        )
    stored = torch.from_numpy(np.fromfile(path, np.float32, nbytes // 4, offset=offset).copy())
    theta = header.get("llama.rope.freq_base", 10000.0)
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": float(stored.max()), **LLAMA3}
    fields = {"rope_parameters": rope}
    expected = llama3_factors({**config.to_dict(), **fields})
    if expected is None or expected.shape != stored.shape or not torch.allclose(expected, stored):
        raise ValueError(
            f"{path}: {name} holds RoPE frequency divisors that are not Llama 3's (low 1, high 4, "
            "8192 positions); lorq cannot compute them as llama.cpp does, so it does not load "
            "the file"
        )
    return fields


def _rope(config: dict[str, Any], kind: str = FULL) -> dict[str, Any]:
    """The RoPE parameters of attention ``kind`` (Gemma 3 keeps one set per kind)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = rope.get(kind, rope) if isinstance(rope.get(kind), dict) else rope
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return {**rope, "rope_theta": float(theta)}


def _scaling(rope: dict[str, Any], llama3: bool = False) -> dict[str, tuple[Any, str]]:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rope.scaling.type": ("linear", "s"), "rope.scaling.factor": (rope["factor"], "f")}
    if kind == "llama3" and llama3:  # no key: llama.cpp reads the factors as rope_freqs
        return {}
    raise ValueError(
        f"GGUF export of rope_type={kind!r} is not supported yet; supported: plain RoPE "
        "(rope_type 'default') and 'linear'; save with lorq.save instead"
    )


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _common(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """What every architecture's converter writes (TextModel.set_gguf_parameters)."""
    heads = config["num_attention_heads"]
    rope = _rope(config)
    keys = {
        "block_count": (config["num_hidden_layers"], "u"),
        "context_length": (config["max_position_embeddings"], "u"),
        "embedding_length": (config["hidden_size"], "u"),
        "feed_forward_length": (config["intermediate_size"], "u"),
        "attention.head_count": (heads, "u"),
        "attention.head_count_kv": (config.get("num_key_value_heads") or heads, "u"),
        "rope.freq_base": (rope["rope_theta"], "f"),
        **_scaling(rope, llama3=of_model_type(config.get("model_type")).gguf == "llama"),
    }
    if config.get("rms_norm_eps") is not None:
        keys["attention.layer_norm_rms_epsilon"] = (config["rms_norm_eps"], "f")
    eps = config.get("norm_epsilon", config.get("layer_norm_eps"))
    if eps is not None:
        keys["attention.layer_norm_epsilon"] = (eps, "f")
    if config.get("head_dim"):
        keys["attention.key_length"] = (config["head_dim"], "u")
        keys["attention.value_length"] = (config["head_dim"], "u")
    return keys


def _llama(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    return {
        "vocab_size": (config["vocab_size"], "u"),
        "rope.dimension_count": (_head_dim(config), "u"),
    }


def _qwen2(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    if config.get("use_sliding_window"):
        raise ValueError(
            "GGUF export of a Qwen2 model with use_sliding_window=True is not supported: "
            "llama.cpp's qwen2 attends to the whole context; save with lorq.save instead"
        )
    return {}


def _attention_scale(config: dict[str, Any], arch: str) -> None:
    """Refuse a Gemma whose query scale llama.cpp would compute differently."""
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    expected = (
        config["hidden_size"] // heads if layers == BIG_GEMMA_LAYERS[arch] else _head_dim(config)
    )
    if config.get("query_pre_attn_scalar", expected) != expected:
        raise ValueError(
            f"GGUF export of a {arch} model with query_pre_attn_scalar="
            f"{config['query_pre_attn_scalar']} is not supported: llama.cpp scales queries by "
            f"1/sqrt({expected}) for {layers} layers; save with lorq.save instead"
        )


def _gemma2(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    _attention_scale(config, "gemma2")
    if not config.get("tie_word_embeddings", True):
        raise ValueError(
            "GGUF export of a gemma2 model with an untied lm_head is not supported: llama.cpp's "
            "gemma2 computes the output from token_embd; save with lorq.save instead"
        )
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not config.get(cap):
            raise ValueError(
                f"GGUF export of a gemma2 model with {cap}={config.get(cap)} is not supported: "
                "llama.cpp's gemma2 always caps; save with lorq.save instead"
            )
    return {
        "attn_logit_softcapping": (config["attn_logit_softcapping"], "f"),
        "final_logit_softcapping": (config["final_logit_softcapping"], "f"),
        "attention.sliding_window": (config["sliding_window"], "u"),
        "attention.key_length": (_head_dim(config), "u"),
        "attention.value_length": (_head_dim(config), "u"),
    }


def _gemma3(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    _attention_scale(config, "gemma3")
    if config.get("attn_logit_softcapping"):
        raise ValueError(
            f"GGUF export of a gemma3 model with attn_logit_softcapping="
            f"{config['attn_logit_softcapping']} is not supported: llama.cpp's gemma3 does not "
            "cap attention logits; save with lorq.save instead"
        )
    swa = [kind == SWA for kind in config["layer_types"]]
    keys = {
        "rope.freq_base_swa": (_rope(config, SWA)["rope_theta"], "f"),
        "attention.sliding_window": (config["sliding_window"] if any(swa) else 0, "u"),
        "attention.sliding_window_pattern": (swa, "b"),
        **_scaling(_rope(config)),
    }
    if config.get("final_logit_softcapping"):
        keys["final_logit_softcapping"] = (config["final_logit_softcapping"], "f")
    return keys


def _phi3(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    rope = _rope(config)
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
    context = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
    return {
        "rope.scaling.original_context_length": (context, "u"),
        "rope.dimension_count": (
            int(factor * config["hidden_size"]) // config["num_attention_heads"],
            "u",
        ),
        "attention.sliding_window": (config.get("sliding_window") or 0, "u"),
    }


def _starcoder2(config: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    if not config.get("use_bias", True):
        raise ValueError("llama.cpp's starcoder2 needs the layers' biases (use_bias=True)")
    return {}


EXTRA = {"llama": _llama, "qwen2": _qwen2, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3}
EXTRA["starcoder2"] = _starcoder2


def model_kv(config: dict[str, Any]) -> KV:
    """``general.architecture`` and the ``{arch}.*`` keys of a transformers config's dict;
    ValueError for an architecture or hyper-parameter llama.cpp does not run."""
    from gguf import GGUFValueType

    arch = of_model_type(config.get("model_type"))
    keys = {**_common(config), **EXTRA.get(arch.gguf, lambda c: {})(config)}
    kinds = {
        "u": GGUFValueType.UINT32,
        "f": GGUFValueType.FLOAT32,
        "s": GGUFValueType.STRING,
        "b": GGUFValueType.BOOL,
    }
    kv: KV = {"general.architecture": (arch.gguf, GGUFValueType.STRING, None)}
    kv["general.type"] = ("model", GGUFValueType.STRING, None)
    cast = {"u": int, "f": float, "s": str}
    for key, (value, kind) in keys.items():
        value = [bool(v) for v in value] if kind == "b" else cast[kind](value)
        value_type = GGUFValueType.ARRAY if kind == "b" else kinds[kind]
        kv[f"{arch.gguf}.{key}"] = (value, value_type, kinds[kind] if kind == "b" else None)
    return kv


def _gemma_fields(get, arch: Architecture, config) -> dict[str, Any]:
    a, layers = arch.gguf, config.num_hidden_layers
    head_dim = get(f"{a}.attention.key_length") or config.hidden_size // config.num_attention_heads
    big = layers == BIG_GEMMA_LAYERS[a]
    fields = {
        "query_pre_attn_scalar": config.hidden_size // config.num_attention_heads
        if big
        else head_dim
    }
    if a == "gemma2":
        fields["attn_logit_softcapping"] = get(f"{a}.attn_logit_softcapping", 50.0)
        fields["final_logit_softcapping"] = get(f"{a}.final_logit_softcapping", 30.0)
        return fields
    pattern = get(f"{a}.attention.sliding_window_pattern", GEMMA_PATTERN)
    swa = (
        pattern if isinstance(pattern, list) else [i % pattern < pattern - 1 for i in range(layers)]
    )
    swa = [bool(s) and bool(get(f"{a}.attention.sliding_window", 0)) for s in swa]
    full = {"rope_type": "default", "rope_theta": get(f"{a}.rope.freq_base", 1e6)}
    if get(f"{a}.rope.scaling.type") == "linear":
        full = {**full, "rope_type": "linear", "factor": get(f"{a}.rope.scaling.factor")}
    local = {"rope_type": "default", "rope_theta": get(f"{a}.rope.freq_base_swa", 10000.0)}
    return {
        **fields,
        "final_logit_softcapping": get(f"{a}.final_logit_softcapping") or None,
        "attn_logit_softcapping": None,
        "layer_types": [SWA if s else FULL for s in swa],
        "rope_parameters": {FULL: full, SWA: local},
    }


def _file_fields(get, arch: Architecture, config) -> dict[str, Any]:
    """Config fields that transformers' GGUF mapping leaves at the config class's defaults, as
    llama.cpp reads them from the file (``get(key, default)``: the file's value)."""
    a = arch.gguf
    fields: dict[str, Any] = {}
    if get(f"{a}.attention.key_length"):
        fields["head_dim"] = get(f"{a}.attention.key_length")
    rope = {"rope_type": "default", "rope_theta": get(f"{a}.rope.freq_base", 10000.0)}
    if a in BIG_GEMMA_LAYERS:
        fields.update(_gemma_fields(get, arch, config))
    elif a == "phi3":  # llama.cpp's phi3 has no sliding window and may rotate part of a head
        dims = get(f"{a}.rope.dimension_count") or config.hidden_size // config.num_attention_heads
        factor = dims * config.num_attention_heads / config.hidden_size
        fields["rope_parameters"] = {**rope, "partial_rotary_factor": factor}
        fields["sliding_window"] = None
        context = get(f"{a}.rope.scaling.original_context_length")
        fields["original_max_position_embeddings"] = context or config.max_position_embeddings
    elif a == "starcoder2":
        fields["rope_parameters"] = rope
        fields["use_bias"] = True
    return fields


def read_config(path: str | Path):
    """transformers' config of a GGUF file, the fields its mapping misses set from the file."""
    from transformers import AutoConfig

    from lorq.io.gguf import gguf_header
    from lorq.io.gguf_arch import of_gguf

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    header = gguf_header(path)
    arch = of_gguf(header.get("general.architecture"))
    fields = _file_fields(header.get, arch, config)
    if any(t[0] == ROPE_FREQS for t in header.tensors):
        fields.update(_llama3_fields(header, path, config))
    longrope = [t[0] for t in header.tensors if t[0].startswith("rope_factors_")]
    if longrope:
        raise ValueError(
            f"{path}: {longrope[0]} holds Phi-3's long-context RoPE factors ('longrope'), which "
            "lorq does not apply yet; it does not load the file rather than compute other logits "
            "than llama.cpp"
        )
    embedding = next((t for t in header.tensors if t[0] == "token_embd.weight"), None)
    if embedding is not None:  # the file's own rows, whatever its metadata says or omits
        fields["vocab_size"] = embedding[2][-1]
        if (config.pad_token_id or 0) >= fields["vocab_size"]:  # a class default, not the file's
            fields["pad_token_id"] = None
    for name, value in fields.items():
        setattr(config, name, value)
    return config
