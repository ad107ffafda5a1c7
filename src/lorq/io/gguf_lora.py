"""A llama.cpp LoRA adapter as GGUF: lorq's factors, applied by llama.cpp at run time on the base
GGUF (``--lora NAME.lora.gguf``; docs/algorithms.md §7), as ``convert_lora_to_gguf.py`` writes it.

    general.architecture   the base's     general.type "adapter"   adapter.type "lora"
    adapter.lora.alpha α (float32)
    <base tensor>.lora_a   F32 or F16, A (r × in)    ggml ne = [in, r]
    <base tensor>.lora_b   F32 or F16, B (out × r)   ggml ne = [r, out]; rows in the base
                                                     tensor's order (llama: attn_q / attn_k
                                                     permuted for RoPE)

llama.cpp adds (α / r)·B·A·x to a layer's output (α = 0: 1·B·A·x), one α for the whole file. When
every layer has the same rank r and scaling s, α = s·r and the factors are written as they are;
otherwise α = 0 and each B is written as s·B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorq.io.gguf import gguf_names, in_file_order, is_gguf_file
from lorq.io.gguf_arch import of_model_type
from lorq.io.gguf_write import write_file
from lorq.util.atomic import atomic_file

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module → (A, B, s)


def adapter_alpha(factors: Factors) -> float:
    """α of the file: s·r when every layer shares it (and r), else 0 (s folded into B)."""
    kinds = {(a.shape[0], s) for a, _, s in factors.values()}
    if len(kinds) == 1:
        rank, scaling = kinds.pop()
        return float(scaling * rank)
    return 0.0


ADAPTER_DTYPES = {torch.float32: "F32", torch.float16: "F16"}


def _tensors(factors: Factors, config: dict[str, Any], alpha: float, dtype: torch.dtype) -> list:
    """(GGUF name, data, None) of every factor, in the base model's parameter order."""
    names = gguf_names(config)
    arch = of_model_type(config.get("model_type"))
    out = []
    for module, (a, b, scaling) in factors.items():
        key = f"{module}.weight"
        if key not in names:
            raise ValueError(f"{module} is not a linear layer of the {arch.gguf} architecture")
        gguf_name, shape = names[key]
        if (b.shape[0], a.shape[1]) != shape or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(
                f"{module}: factors B {tuple(b.shape)} · A {tuple(a.shape)} do not fit the "
                f"weight {shape}"
            )
        b = in_file_order(arch, gguf_name, b.detach().float() * (1.0 if alpha else scaling), config)
        out.append((f"{gguf_name}.lora_a", a.detach().to("cpu", dtype).contiguous(), None))
        out.append((f"{gguf_name}.lora_b", b.to("cpu", dtype).contiguous(), None))
    return out


def adapter_contents(factors: Factors, hf_config: dict[str, Any], dtype: torch.dtype) -> tuple:
    """(metadata, tensors) of the adapter file :func:`write_gguf_lora` writes, inputs checked."""
    from gguf import GGUFValueType, Keys

    if dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"a GGUF LoRA adapter is written as fp32 or fp16 (--dtype fp32 | fp16), not {dtype}"
        )
    if not factors:
        raise ValueError("the model has no LoRA factors; a merged model has no adapter to write")
    config = dict(hf_config)
    alpha = adapter_alpha(factors)
    string = GGUFValueType.STRING
    kv = {
        Keys.General.ARCHITECTURE: (of_model_type(config.get("model_type")).gguf, string, None),
        Keys.General.TYPE: ("adapter", string, None),
        Keys.Adapter.TYPE: ("lora", string, None),
        Keys.Adapter.LORA_ALPHA: (alpha, GGUFValueType.FLOAT32, None),
    }
    return kv, _tensors(factors, config, alpha, dtype)


def write_gguf_lora(
    out_file: str | Path,
    factors: Factors,
    hf_config: dict[str, Any],
    overwrite: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``factors`` ({module name: (A, B, s)}) of a model as a llama.cpp LoRA adapter
    GGUF, atomically, its tensors in ``dtype`` (F16 as ``convert_lora_to_gguf.py`` writes by
    default, or F32); returns its path."""
    kv, tensors = adapter_contents(factors, hf_config, dtype)
    path = Path(out_file)
    with atomic_file(path, overwrite, is_gguf_file, "GGUF") as tmp:
        write_file(tmp, kv, tensors)
    return path
