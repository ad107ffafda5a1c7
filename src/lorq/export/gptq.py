"""Export target ``gptq``: a merged integer-zero model as a GPTQ checkpoint (transformers,
GPTQModel, vLLM), codes as they are (``lorq.io.gptq`` holds the layout).

v1 (``gptq``, read by every loader) when every zero point is ≥ 1, else ``gptq_v2``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorq.atomic import check_output
from lorq.export.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.export.hf import dense_embeddings
from lorq.export.quantized import merged_layers, other_tensors
from lorq.io.gptq import check_gptq_config, is_gptq_dir, write_gptq_checkpoint
from lorq.io.native import hf_config
from lorq.quant.affine import block_zeros


def export_gptq(
    model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False
) -> tuple[Path, str]:
    """A GPTQ checkpoint of a merged integer-zero QA-LoRA model; returns (path, format)."""
    model = dense_embeddings(model)  # GPTQ checkpoints hold dense embeddings
    layers = merged_layers(model, "gptq")
    for q in layers.values():
        check_gptq_config(q.config)
    dense = other_tensors(model, layers)
    zero_min = min(float(block_zeros(q).min()) for q in layers.values())
    fmt = "gptq" if zero_min >= 1 else "gptq_v2"
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; GPTQ export needs one")
    path = write_gptq_checkpoint(out, layers, dense, config, tokenizer, overwrite, fmt)
    return path, fmt


class GPTQCheckpoint(ExportTarget):
    name = "gptq"
    description = "a merged integer-zero QA-LoRA model as a GPTQ checkpoint, codes as they are"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_output(out, options.overwrite, is_gptq_dir, "GPTQ model", inputs=options.inputs)

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        _, checkpoint_format = export_gptq(model, out, options.tokenizer, options.overwrite)
        return Exported(out, f"GPTQ checkpoint ({checkpoint_format}) written to {out}")


register_export(GPTQCheckpoint())
