"""Export target ``gptq``: integer-zero INT-k codes as a GPTQ checkpoint (transformers,
GPTQModel, vLLM), codes as they are (``lorq.io.gptq`` holds the layout).

    merged model (no factors)   OUT/            the GPTQ checkpoint of Q
    model with LoRA factors     OUT/base/       the GPTQ checkpoint of Q
                                OUT/adapter/    the PEFT LoRA adapter of s·B·A (vLLM serves LoRA
                                                adapters on GPTQ bases; PEFT loads it on GPTQModel)

v1 (``gptq``, read by every loader) when every zero point is ≥ 1, else ``gptq_v2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorq.exporters.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.exporters.hf import (
    dense_embeddings,
    export_directory,
    has_adapters,
    is_export_dir,
    quant_layers,
    torch_dtype,
    write_marker,
)
from lorq.exporters.peft import write_adapter
from lorq.exporters.quantized import drop_aliases, merged_layers, other_tensors, refuse_foreign
from lorq.io.gptq import check_gptq_config, is_gptq_dir, write_gptq_checkpoint, write_gptq_files
from lorq.io.native import hf_config, model_meta
from lorq.quant.affine import block_zeros
from lorq.util.atomic import check_output


def _base(model: nn.Module, adapters: bool) -> tuple[dict, dict, dict[str, Any], str]:
    """(layers' Q, other tensors, HF config, checkpoint format) of the GPTQ base of ``model``."""
    model = dense_embeddings(model)  # GPTQ checkpoints hold dense embeddings
    if adapters:
        layers = {name: layer.q for name, layer in quant_layers(model).items()}
    else:
        layers = merged_layers(model, "gptq")
    foreign = {}
    for name, q in layers.items():
        try:
            check_gptq_config(q.config)
        except ValueError:
            foreign[name] = q.config.name
    hint = (
        "compress with an integer-zero preset (--quant int4-g128, int4-g32, …) "
        "or export with --format peft"
    )
    refuse_foreign(foreign, "gptq", "INT-k codes with integer zeros (GPTQ's layout)", hint)
    dense = drop_aliases(other_tensors(model, layers))
    zero_min = min(float(block_zeros(q).min()) for q in layers.values())
    fmt = "gptq" if zero_min >= 1 else "gptq_v2"
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; GPTQ export needs one")
    return layers, dense, config, fmt


def export_gptq(
    model: nn.Module,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    dtype: str = "fp32",
) -> tuple[Path, str]:
    """A GPTQ checkpoint of ``model``'s Q (and the PEFT adapter of its factors, when it has
    them); returns (path of the GPTQ checkpoint, format)."""
    adapters = has_adapters(model)
    layers, dense, config, fmt = _base(model, adapters)
    if not adapters:
        return write_gptq_checkpoint(out, layers, dense, config, tokenizer, overwrite, fmt), fmt
    out = Path(out)
    marker = {"kind": "gptq", "dtype": dtype, "source": model_meta(model).get("source")}
    with export_directory(model, out, overwrite) as tmp:
        (tmp / "base").mkdir()
        write_gptq_files(tmp / "base", layers, dense, config, tokenizer, fmt)
        base = str((out / "base").resolve())
        write_adapter(model, tmp / "adapter", base, torch_dtype(dtype), tokenizer)
        write_marker(tmp, marker)
    return out / "base", fmt


def _replaceable(path: Path) -> bool:
    return is_gptq_dir(path) or is_export_dir(path)


class GPTQCheckpoint(ExportTarget):
    name = "gptq"
    description = (
        "INT-k integer-zero codes as a GPTQ checkpoint, as they are (base/ + a PEFT adapter/ "
        "when the model has factors)"
    )

    def check(self, out: Path, options: ExportOptions) -> None:
        check_output(out, options.overwrite, _replaceable, "GPTQ model", inputs=options.inputs)

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        path, fmt = export_gptq(
            model, out, options.tokenizer, options.overwrite, options.dense_dtype
        )
        if path == out:
            return Exported(out, f"GPTQ checkpoint ({fmt}) written to {out}")
        return Exported(
            out,
            f"GPTQ base ({fmt}) in {path}, PEFT adapter in {out / 'adapter'}: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
        )


register_export(GPTQCheckpoint())
