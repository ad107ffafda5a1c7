"""Export target ``gguf``: a quantized LLaMA model for llama.cpp (and transformers' GGUF loader).

    merged model (no factors)   NAME.gguf        every layer's Q in its GGUF type
    model with LoRA factors     NAME.gguf        the base: every layer's Q in its GGUF type
                                NAME.lora.gguf   the factors as a llama.cpp LoRA adapter
                                                 (``llama-cli -m NAME.gguf --lora NAME.lora.gguf``)

Every quantized layer (and a packed embedding table) is written in its format's GGUF type
(``QuantFormat.gguf_type``: q4_0, q4_1, q5_0, q5_1, q8_0), codes copied as they are; metadata and
tokenizer come from the source GGUF when the model still knows it (its provenance), else from the
Hugging Face config and tokenizer. The adapter is written before the base, each atomically: a
base file present means both are finished.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorq.atomic import check_output
from lorq.export.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.export.hf import has_adapters, quant_layers, torch_dtype
from lorq.export.peft import adapter_layers, lora_A_of
from lorq.export.quantized import merged_layers, other_tensors, packed_embeddings, source_gguf
from lorq.io.gguf import is_gguf_file
from lorq.io.gguf_lora import Factors, write_gguf_lora
from lorq.io.gguf_write import gguf_contents, write_contents
from lorq.io.native import hf_config


def adapter_path(out: str | Path) -> Path:
    """NAME.lora.gguf beside NAME.gguf."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.gguf')}.lora.gguf")


def gguf_factors(model: nn.Module) -> Factors:
    """(A, B, s) of every layer with factors (QA-LoRA's pooled A as its expansion)."""
    return {
        name: (lora_A_of(layer), layer.lora_B.detach(), float(layer.scaling))
        for name, layer in adapter_layers(model).items()
    }


def export_gguf(
    model: nn.Module,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    dtype: str = "fp32",
) -> Path:
    """NAME.gguf (and NAME.lora.gguf for a model with factors, its tensors in ``dtype``: fp32,
    or fp16 for half the size); returns the base's path."""
    adapter_dtype = torch_dtype(dtype)
    adapters = has_adapters(model)
    if adapters:
        layers = {name: layer.q for name, layer in quant_layers(model).items()}
    else:
        layers = merged_layers(model, "gguf")
    layers = {**layers, **packed_embeddings(model)}
    dense = other_tensors(model, layers)
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; GGUF export needs one")
    check_output(Path(out), overwrite, is_gguf_file, "GGUF", directory=False)
    contents = gguf_contents(layers, dense, config, source_gguf(model), tokenizer)
    if adapters:  # the adapter first: a base file present means both are finished
        factors = gguf_factors(model)
        write_gguf_lora(adapter_path(out), factors, config, overwrite, adapter_dtype)
    return write_contents(out, contents, overwrite)


class GGUFFile(ExportTarget):
    name = "gguf"
    description = "a GGUF base (codes as they are) and, with factors, a llama.cpp LoRA adapter"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_output(
            out, options.overwrite, is_gguf_file, "GGUF", inputs=options.inputs, directory=False
        )

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        export_gguf(model, out, options.tokenizer, options.overwrite, options.dtype)
        adapter = adapter_path(out)
        if adapter.exists() and has_adapters(model):
            return Exported(
                out,
                f"GGUF base {out} and LoRA adapter {adapter} (llama.cpp: -m {out.name} --lora "
                f"{adapter.name})",
            )
        return Exported(
            out, f"GGUF written to {out} (transformers: from_pretrained(dir, gguf_file=name))"
        )


register_export(GGUFFile())
