"""The GGUF architectures lorq reads packed and writes, and what each stores differently.

    GGUF arch    transformers model_type   in the file (as llama.cpp's converter writes it)
    llama        llama, mistral            attn_q / attn_k rows permuted for RoPE
    qwen2        qwen2                     q/k/v biases
    qwen3        qwen3                     per-head q/k RMS norms; head_dim as key_length
    gemma2       gemma2                    every RMS norm stored as 1 + w; soft-capping
    gemma3       gemma3_text               every RMS norm stored as 1 + w; local RoPE base
    phi3         phi3                      fused qkv and gate|up: one stored matrix each
    starcoder2   starcoder2                LayerNorm (weight and bias), biases everywhere

Tensor names come from the ``gguf`` package's maps (``get_tensor_name_map``) applied to the
transformers model's parameter names, as transformers' GGUF loader does; config fields from
transformers' GGUF mapping when reading. This table holds only what neither knows: which
model types share an architecture, llama.cpp's RoPE row order and norm offset, and the
hyper-parameters the converter writes beyond the common ones (``lorq.io.gguf_meta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """One GGUF architecture: its name in the file and transformers' model types for it."""

    gguf: str  # general.architecture
    model_types: tuple[str, ...]  # the first is what a file of this architecture loads as
    rope_permuted: bool = False  # attn_q / attn_k rows in llama.cpp's RoPE order
    norm_offset: float = 0.0  # stored norm weight = transformers' weight + offset

    @property
    def model_type(self) -> str:
        return self.model_types[0]

    def stored(self, gguf_name: str) -> float:
        """What the file adds to transformers' value of tensor ``gguf_name`` (a norm's offset)."""
        return self.norm_offset if gguf_name.endswith("norm.weight") else 0.0


ARCHITECTURES = (
    Architecture("llama", ("llama", "mistral"), rope_permuted=True),
    Architecture("qwen2", ("qwen2",)),
    Architecture("qwen3", ("qwen3",)),
    Architecture("gemma2", ("gemma2",), norm_offset=1.0),
    Architecture("gemma3", ("gemma3_text",), norm_offset=1.0),
    Architecture("phi3", ("phi3",)),
    Architecture("starcoder2", ("starcoder2",)),
)
NAMES = ", ".join(a.gguf for a in ARCHITECTURES)


def of_gguf(name: Any, where: str = "") -> Architecture:
    """The architecture of a file's ``general.architecture``; ValueError listing those lorq has."""
    for arch in ARCHITECTURES:
        if arch.gguf == name:
            return arch
    raise ValueError(
        f"{where}GGUF architecture {name!r} is not supported yet; lorq reads and writes: {NAMES}"
    )


def of_model_type(model_type: Any) -> Architecture:
    """The GGUF architecture of a transformers ``model_type`` (llama when None)."""
    model_type = model_type or "llama"
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    types = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise ValueError(
        f"GGUF export of model_type={model_type!r} is not supported yet; supported model types: "
        f"{types}; save other models with lorq.save"
    )


def gguf_enum(arch: Architecture) -> Any:
    """The ``gguf`` package's MODEL_ARCH member of ``arch`` (its tensor-name map's key)."""
    from gguf import MODEL_ARCH_NAMES

    return next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch.gguf)
