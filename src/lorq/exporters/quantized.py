"""What the quantized exports share: a merged model's Q per layer and its other tensors.

    merged QA-LoRA model ─▶ {module: Q} + every other tensor ─▶ GGUF (export.gguf)
                                                            └▶ GPTQ (export.gptq)

Only a merged model qualifies: every quantized layer a plain QuantLinear (no adapter left), since
both formats hold Q alone. The codes are written as they are; nothing is requantized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorq.io.native import model_meta
from lorq.nn import QuantEmbedding, packed_linears, tied_packed_head
from lorq.quant.tensor import QuantizedTensor


def merged_layers(model: nn.Module, fmt: str) -> dict[str, QuantizedTensor]:
    """Q of every quantized linear layer (not a tied, packed output layer: that is its
    embedding's table); ValueError when a layer still carries an adapter."""
    layers = packed_linears(model)
    adapters = sorted(n for n, m in layers.items() if m.has_lora)
    if not layers or adapters:
        where = f" ({adapters[0]} has lora_A / lora_B)" if adapters else ""
        raise ValueError(
            f"format={fmt!r} needs a merged QA-LoRA model{where}; merge a model made with "
            "method='qa-lora' first (lorq merge)"
        )
    return {name: layer.q for name, layer in layers.items()}


def drop_aliases(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the later names of a shared tensor (a tied output layer after its
    embedding): written once, as transformers does, which ties them again on loading."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in tensors.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    return unique


def refuse_foreign(foreign: dict[str, str], fmt: str, needs: str, hint: str) -> None:
    """ValueError naming the layers (module → quant preset) whose codes ``fmt`` cannot hold."""
    if not foreign:
        return
    shown = ", ".join(f"{name} ({quant})" for name, quant in list(foreign.items())[:3])
    more = " …" if len(foreign) > 3 else ""
    raise ValueError(
        f"format={fmt!r} needs {needs}; {len(foreign)} layer(s) have other codes: {shown}{more}; "
        f"{hint}"
    )


def packed_embeddings(model: nn.Module) -> dict[str, QuantizedTensor]:
    """The table of every packed embedding, by module name."""
    return {n: m.q for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}


def other_tensors(model: nn.Module, layers: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor except the packed buffers and LoRA factors of ``layers`` and of a
    tied, packed output layer (biases stay)."""
    head = tied_packed_head(model)
    names = [*layers, *(n for n, m in model.named_modules() if head is not None and m is head)]
    prefixes = tuple(f"{name}.{kind}_" for name in names for kind in ("q", "lora"))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file the model was compressed from, when it still exists."""
    source = model_meta(model).get("source") or {}
    if not source.get("gguf_file") or not source.get("path"):
        return None
    path = Path(source["path"]) / source["gguf_file"]
    return path if path.is_file() else None
