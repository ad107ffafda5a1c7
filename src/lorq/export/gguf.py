"""Export target ``gguf``: a merged quantized model as one GGUF file (llama.cpp, transformers).

Every quantized layer (and a packed embedding table) is written in its format's GGUF type
(``QuantFormat.gguf_type``; today q4_1 → Q4_1, q8_0 → Q8_0), codes copied as they are; metadata
and tokenizer come from the source GGUF when the model still knows it (its provenance), else from
the Hugging Face config and tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorq.atomic import check_output
from lorq.export.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.export.quantized import merged_layers, other_tensors, packed_embeddings, source_gguf
from lorq.io.gguf import is_gguf_file
from lorq.io.gguf_write import write_gguf
from lorq.io.native import hf_config


def export_gguf(model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """A GGUF file of a merged q4_1 QA-LoRA model (metadata from the source GGUF when known)."""
    layers = {**merged_layers(model, "gguf"), **packed_embeddings(model)}
    dense = other_tensors(model, layers)
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; GGUF export needs one")
    return write_gguf(out, layers, dense, config, source_gguf(model), tokenizer, overwrite)


class GGUFFile(ExportTarget):
    name = "gguf"
    description = "a merged QA-LoRA model (q4_1) as one GGUF file, codes as they are"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_output(
            out, options.overwrite, is_gguf_file, "GGUF", inputs=options.inputs, directory=False
        )

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        export_gguf(model, out, options.tokenizer, options.overwrite)
        return Exported(
            out, f"GGUF written to {out} (transformers: from_pretrained(dir, gguf_file=name))"
        )


register_export(GGUFFile())
