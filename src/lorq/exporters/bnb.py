"""Export target ``bnb``: QLoRA's hand-off, still 4-bit (docs/algorithms.md §8).

    DIR/base/      a pre-quantized bitsandbytes 4-bit checkpoint (``lorq.io.bnb``): every lorq
                   layer's Q as bitsandbytes codes, copied as they are; other tensors dense
    DIR/adapter/   the PEFT LoRA adapter of the factors (as ``format="peft"`` writes it)

so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter)``
computes x Qᵀ + s·(x Aᵀ) Bᵀ on bitsandbytes' 4-bit layers. A merged model (no factors) is written
as the base alone. Every layer's Q must have a bitsandbytes layout (``bnb-nf4``, ``bnb-fp4``,
``nf4-fp32-scales``), all of one quant type and double quantization, since the checkpoint's
``quantization_config`` is one for the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorq.exporters.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.exporters.hf import (
    check_export_dir,
    dense_embeddings,
    export_directory,
    has_adapters,
    meta_skeleton,
    quant_layers,
    torch_dtype,
    write_marker,
)
from lorq.exporters.peft import write_adapter
from lorq.exporters.quantized import drop_aliases, other_tensors, refuse_foreign
from lorq.io.bnb import as_bnb, bnb_tensors, quantization_config
from lorq.io.native import hf_config, model_meta
from lorq.quant import QuantizedTensor
from lorq.quant.bnb import BnbConfig

WEIGHTS = "model.safetensors"


def bnb_layers(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Every lorq layer's Q as bitsandbytes storage; ValueError naming the layers that have
    none, or a model whose layers disagree on the quant type / double quantization."""
    layers, foreign = {}, {}
    for name, layer in quant_layers(model).items():
        try:
            layers[name] = as_bnb(layer.q)
        except ValueError:
            foreign[name] = layer.q.config.name
    hint = (
        "compress with --quant bnb-nf4 (QLoRA's NF4), bnb-fp4 or nf4-fp32-scales, "
        "or export with --format peft"
    )
    refuse_foreign(foreign, "bnb", "bitsandbytes 4-bit codes", hint)
    kinds = {q.config for q in layers.values()}
    if len({(c.quant_type, c.double_quant) for c in kinds}) > 1:  # type: ignore[attr-defined]
        raise ValueError(
            "format='bnb' writes one quantization_config per model; the layers mix "
            f"{sorted(c.name for c in kinds)}: compress every layer with one bnb preset"
        )
    return layers


def _dense_linears(model: nn.Module, layers: dict[str, QuantizedTensor]) -> list[str]:
    """The linear modules transformers must leave dense (every nn.Linear / Conv1D not in
    ``layers``): bitsandbytes' ``llm_int8_skip_modules``."""
    from transformers.pytorch_utils import Conv1D

    skeleton = meta_skeleton(model)
    assert skeleton is not None  # base_checkpoint has checked the config
    kinds = (nn.Linear, Conv1D)
    return sorted(
        n for n, m in skeleton.named_modules() if isinstance(m, kinds) and n not in layers
    )


def base_checkpoint(model: nn.Module, dtype: torch.dtype) -> tuple[dict, dict]:
    """(tensors, config.json) of the bitsandbytes base of ``model``."""
    layers = bnb_layers(model)
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; format='bnb' needs one")
    model = dense_embeddings(model)  # bitsandbytes quantizes linears only
    tensors = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in drop_aliases(other_tensors(model, layers)).items()
    }
    for name, q in layers.items():
        tensors.update(bnb_tensors(name, q, dtype))
    first = next(iter(layers.values())).config
    assert isinstance(first, BnbConfig)
    dense = _dense_linears(model, layers)
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    config["quantization_config"] = quantization_config(first, dtype, dense)
    return tensors, config


def export_bnb(
    model: nn.Module, path: str | Path, tokenizer=None, dtype: str = "fp32", overwrite: bool = False
) -> Path:
    """Write ``path/base`` (bitsandbytes 4-bit) and, for a model with factors, ``path/adapter``."""
    target = torch_dtype(dtype)
    path = Path(path)
    tensors, config = base_checkpoint(model, target)
    adapters = has_adapters(model)
    marker = {"kind": "bnb", "dtype": dtype, "source": model_meta(model).get("source")}
    with export_directory(model, path, overwrite) as tmp:
        (tmp / "base").mkdir()
        save_file(tensors, tmp / "base" / WEIGHTS, metadata={"format": "pt"})
        (tmp / "base" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "base")
        if adapters:
            write_adapter(model, tmp / "adapter", str((path / "base").resolve()), target, tokenizer)
        write_marker(tmp, marker)
    return path


class BitsandbytesBase(ExportTarget):
    name = "bnb"
    description = "a bitsandbytes 4-bit base (base/, codes as they are) and its PEFT adapter"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_export_dir(out, options.overwrite, options.inputs)

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        export_bnb(model, out, options.tokenizer, options.dense_dtype, options.overwrite)
        return Exported(
            out,
            f"bitsandbytes 4-bit base in {out / 'base'}, PEFT adapter in {out / 'adapter'}: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
        )


register_export(BitsandbytesBase())
