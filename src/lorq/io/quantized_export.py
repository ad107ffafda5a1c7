"""A merged QA-LoRA model handed on in its quantized form: GGUF (Q4_1) or a GPTQ checkpoint.

    merged QA-LoRA model ─▶ {module: Q} + every other tensor ─▶ write_gguf (Q4_1)
                                                            └▶ write_gptq_checkpoint (INT-k)

Only a merged model qualifies: every quantized layer a plain QuantLinear (no adapter left), since
both formats hold Q alone. The codes are written as they are; nothing is requantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.io.gguf import write_gguf
from lorq.io.gptq import write_gptq_checkpoint
from lorq.nn import QuantLinear
from lorq.quant.tensor import QuantizedTensor


def merged_layers(model: nn.Module, fmt: str) -> dict[str, QuantizedTensor]:
    """Q of every quantized layer; ValueError when a layer still carries an adapter."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    adapters = sorted(n for n, m in layers.items() if m.has_lora)
    if not layers or adapters:
        where = f" ({adapters[0]} has lora_A / lora_B)" if adapters else ""
        raise ValueError(
            f"--format {fmt} needs a merged QA-LoRA model{where}; run lorq merge on a model made "
            "with --method qa-lora first"
        )
    return {name: layer.q for name, layer in layers.items()}


def other_tensors(model: nn.Module, layers: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor except the quantized layers' packed buffers (biases stay)."""
    prefixes = tuple(f"{name}.q_" for name in layers)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def source_gguf(meta: dict[str, Any]) -> Path | None:
    """The GGUF file the model was compressed from, when it still exists."""
    source = meta.get("source") or {}
    if not source.get("gguf_file") or not source.get("path"):
        return None
    path = Path(source["path"]) / source["gguf_file"]
    return path if path.is_file() else None


def export_gguf(
    model: nn.Module, meta: dict[str, Any], out: str | Path, tokenizer: Any, overwrite: bool
) -> Path:
    """A GGUF file of a merged q4_1 QA-LoRA model (metadata from the source GGUF when known)."""
    layers = merged_layers(model, "gguf")
    dense = other_tensors(model, layers)
    return write_gguf(
        out, layers, dense, meta["hf_config"], source_gguf(meta), tokenizer, overwrite
    )


def export_gptq(
    model: nn.Module, meta: dict[str, Any], out: str | Path, tokenizer: Any, overwrite: bool
) -> tuple[Path, str]:
    """A GPTQ checkpoint of a merged integer-zero QA-LoRA model; returns (path, format).

    v1 (``gptq``, read by every loader) when every zero point is ≥ 1, else ``gptq_v2``.
    """
    layers = merged_layers(model, "gptq")
    dense = other_tensors(model, layers)
    zeros = [q.block_zeros() for q in layers.values()]
    zero_min = min(float(z.min()) for z in zeros if z is not None)
    fmt = "gptq" if zero_min >= 1 else "gptq_v2"
    path = write_gptq_checkpoint(out, layers, dense, meta["hf_config"], tokenizer, overwrite, fmt)
    return path, fmt
