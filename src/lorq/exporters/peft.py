"""Export to PEFT: a LoRA adapter plus the base model it belongs on.

    DIR/base/      a standard Hugging Face model whose target weights are the dequantized Q
    DIR/adapter/   adapter_config.json + adapter_model.safetensors (PEFT's LoRA format):
                   base_model.model.<module>.lora_A.weight   (r × in)
                   base_model.model.<module>.lora_B.weight   (out × r)
                   lora_alpha / r = lorq's scaling s (per module through alpha_pattern /
                   rank_pattern when layers differ)

so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter)``
computes x Qᵀ + s·(x Aᵀ) Bᵀ: lorq's own forward. A QA-LoRA adapter is exported as the equivalent
plain LoRA: its pooled A (r × in/G) expanded to Ā (r × in), Ā[:, i] = A[:, i // G] / G.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorq.exporters.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.exporters.hf import (
    check_export_dir,
    conv1d_names,
    dense_model,
    export_directory,
    quant_layers,
    torch_dtype,
    write_hf_model,
    write_marker,
)
from lorq.io.native import model_meta
from lorq.nn import AdapterLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (``q_proj``…) when they pick out exactly ``names``; else the full names."""
    leaves = sorted({name.rpartition(".")[2] for name in names})
    matched = {
        name
        for name, module in model.named_modules()
        if name and name.rpartition(".")[2] in leaves and not list(module.children())
    }
    return leaves if matched == set(names) else sorted(names)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """The layers with LoRA factors; ValueError for a merged (adapter-free) model."""
    layers = {n: m for n, m in quant_layers(model).items() if m.has_lora}
    if not layers:
        raise ValueError(
            "the model has no LoRA factors (a merged model); export the model from before merging"
        )
    return layers  # type: ignore[return-value]


def lora_A_of(layer: AdapterLinear) -> torch.Tensor:
    """PEFT's lora_A (r × in): QA-LoRA's pooled A as its expansion Ā (each column A[:, g] / G)."""
    if layer.kind == "qa-lora":
        return layer.expanded_lora_A()  # type: ignore[attr-defined]
    return layer.lora_A.detach()


def _scalings(layers: dict[str, AdapterLinear]) -> tuple[int, float, dict, dict]:
    """r and lora_alpha for most layers, and per-module patterns for the others."""
    rank, alpha = Counter((m.rank, m.rank * m.scaling) for m in layers.values()).most_common(1)[0][
        0
    ]
    rank_pattern = {n: m.rank for n, m in layers.items() if m.rank != rank}
    alpha_pattern = {
        n: m.rank * m.scaling for n, m in layers.items() if m.rank * m.scaling != alpha
    }
    return rank, alpha, rank_pattern, alpha_pattern


def adapter_config(model: nn.Module, base_path: str, conv1d: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json for the lorq layers of ``model``."""
    layers = adapter_layers(model)
    rank, alpha, rank_pattern, alpha_pattern = _scalings(layers)
    causal = hasattr(model, "generate")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_path,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": _target_modules(model, list(layers)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def adapter_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``base_model.model.<module>.lora_{A,B}.weight`` for every lorq layer, in ``dtype``."""
    tensors = {}
    for name, layer in adapter_layers(model).items():
        key = f"{PEFT_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = lora_A_of(layer).to(dtype).contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().to(dtype).contiguous().cpu()
    return tensors


def export_peft(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write ``path/base`` and ``path/adapter`` (see the module docstring) atomically."""
    target = torch_dtype(dtype)
    path = Path(path)
    base = dense_model(model, with_delta=False)
    marker = {"kind": "peft", "dtype": dtype, "source": model_meta(model).get("source")}
    with export_directory(model, path, overwrite) as tmp:
        write_hf_model(base, tmp / "base", target, tokenizer)
        write_adapter(model, tmp / "adapter", str((path / "base").resolve()), target, tokenizer)
        write_marker(tmp, marker)
    return path


def write_adapter(
    model: nn.Module, folder: Path, base_path: str, dtype: torch.dtype, tokenizer: Any = None
) -> None:
    """PEFT's adapter folder (config, factors in ``dtype``, tokenizer) of ``model``'s layers,
    for the base model at ``base_path``."""
    config = adapter_config(
        model, base_path, bool(conv1d_names(model, list(adapter_layers(model))))
    )
    folder.mkdir()
    save_file(adapter_tensors(model, dtype), folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


class PeftAdapter(ExportTarget):
    name = "peft"
    description = "a PEFT LoRA adapter (adapter/) and its dequantized base model (base/)"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_export_dir(out, options.overwrite, options.inputs)

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        export_peft(model, out, options.tokenizer, options.dense_dtype, options.overwrite)
        return Exported(
            out,
            f"PEFT adapter in {out / 'adapter'}, its base model in {out / 'base'}: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
        )


register_export(PeftAdapter())
