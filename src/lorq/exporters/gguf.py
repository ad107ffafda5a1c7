"""Export target ``gguf``: a quantized model for llama.cpp (and transformers' GGUF loader), of any
architecture ``lorq.io.gguf_arch`` lists.

    merged model (no factors)   NAME.gguf        every layer's Q in its GGUF type
    model with LoRA factors     NAME.gguf        the base: every layer's Q in its GGUF type
                                NAME.lora.gguf   the factors as a llama.cpp LoRA adapter
                                                 (``llama-cli -m NAME.gguf --lora NAME.lora.gguf``)

Every quantized layer (and a packed embedding table) is written in its format's GGUF type
(``QuantFormat.gguf_type``: q4_0 … q8_0, iq4_nl, q2_k … q6_k), codes copied as they are;
metadata and tokenizer come from the source GGUF when the model still knows it (its
provenance), else from the Hugging Face config and tokenizer. The adapter is written before the
base, each atomically: a base file present means both are finished.

A size budget for these files (``gguf_budget``, ``lorq compress --budget-mb``): with M MiB for both
files, the targets' codes may take

    bits/param = 8 · (M · 2²⁰ − base bytes without the targets' data − adapter bytes − 31 · n) / P

(P the targets' parameters, n their number: room for aligning each one's data), every byte but the
codes' measured from the files' own metadata, tensor infos and other tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.exporters.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.exporters.hf import has_adapters, quant_layers, torch_dtype
from lorq.exporters.peft import adapter_layers, lora_A_of
from lorq.exporters.quantized import merged_layers, other_tensors, packed_embeddings, source_gguf
from lorq.io.gguf import gguf_names, is_gguf_file
from lorq.io.gguf_lora import Factors, adapter_contents, write_gguf_lora
from lorq.io.gguf_write import file_size, gguf_contents, write_contents
from lorq.io.native import hf_config
from lorq.nn.quant_embedding import packed_linears
from lorq.quant import QuantConfig, format_of
from lorq.util.atomic import check_output

ADAPTER_DTYPE = "fp16"  # the adapter's default dtype, as convert_lora_to_gguf.py writes it
MIB = 1 << 20


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
    dtype: str | None = None,
) -> Path:
    """NAME.gguf (and NAME.lora.gguf for a model with factors, its tensors in ``dtype``: fp16 by
    default, as llama.cpp's ``convert_lora_to_gguf.py`` writes, or fp32); returns the base's
    path."""
    adapter_dtype = torch_dtype(dtype or ADAPTER_DTYPE)
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


@dataclass(frozen=True)
class GGUFBudget:
    """The bytes ``lorq export --format gguf`` writes around the targets' codes, and the bits per
    parameter left to the codes so that both files fit ``megabytes`` MiB (2²⁰ bytes)."""

    megabytes: float
    base_bytes: int  # the base file without the targets' data: metadata, infos, other tensors
    adapter_bytes: int  # the adapter file
    padding_bytes: int  # room for aligning every target's data
    target_params: int
    adapter_dtype: str

    @property
    def fixed_bytes(self) -> int:
        """Every byte of the two files but the targets' codes (padding room included)."""
        return self.base_bytes + self.adapter_bytes + self.padding_bytes

    @property
    def code_bytes(self) -> float:
        return self.megabytes * MIB - self.fixed_bytes

    @property
    def bits(self) -> float:
        return 8 * self.code_bytes / self.target_params

    def megabytes_for(self, bits: float) -> float:
        """The MiB at which the codes get ``bits`` bits/param."""
        return (self.fixed_bytes + bits * self.target_params / 8) / MIB

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits": self.bits}


def _other_sizes(model: nn.Module, config, names, embeddings, tokenizer, source) -> tuple:
    """(metadata, [(GGUF name, shape, bytes)]) of the base file as the model would be exported
    now, the token embeddings (and an untied output layer) counted in ``embeddings`` if given;
    ``names``: :func:`gguf_names` of the model's ``config``."""
    layers = {name: layer.q for name, layer in packed_linears(model).items()}
    layers = {**layers, **packed_embeddings(model)}
    kv, tensors = gguf_contents(layers, other_tensors(model, layers), config, source, tokenizer)
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    packed = {
        names[f"{n}.weight"][0]: format_of(embeddings).nbytes(embeddings, names[f"{n}.weight"][1])
        for n, m in model.named_modules()
        if embeddings is not None and m in tables and f"{n}.weight" in names
    }
    return kv, [(name, tuple(d.shape), packed.get(name, d.nbytes)) for name, d, _ in tensors]


def gguf_budget(
    model: nn.Module,
    targets: dict[str, tuple[int, int]],
    megabytes: float,
    rank: int | None,
    *,
    embeddings: QuantConfig | None = None,
    tokenizer: Any = None,
    source: Path | None = None,
    adapter_dtype: str = ADAPTER_DTYPE,
    tables: dict[str, tuple[int, int]] | None = None,
) -> GGUFBudget:
    """The bits/param the ``targets`` ({module name: (out, in)}) of ``model`` (before compression)
    may take so that its GGUF base and rank-``rank`` adapter in ``adapter_dtype`` fit ``megabytes``
    MiB; ValueError when the other bytes alone exceed it. ``rank`` None: a plan chooses the
    ranks and counts the factors' data with the codes; the adapter's metadata and tensor infos
    (and room to align each tensor) count here. ``tables``: more rows whose data the plan counts
    with the codes, without an adapter (the token embedding, plan_embeddings)."""
    config = hf_config(model)
    if config is None:
        raise ValueError("the model has no Hugging Face config; GGUF export needs one")
    names = gguf_names(config)
    source = source or source_gguf(model)
    kv, tensors = _other_sizes(model, config, names, embeddings, tokenizer, source)
    rows = {**targets, **(tables or {})}
    own = {names[f"{t}.weight"][0] for t in rows}
    base = file_size(kv, [(n, shape, 0 if n in own else size) for n, shape, size in tensors])
    r = 1 if rank is None else rank
    factors = {t: (torch.zeros(r, i), torch.zeros(o, r), 1.0) for t, (o, i) in targets.items()}
    kv, tensors = adapter_contents(factors, config, torch_dtype(adapter_dtype))
    data = rank is not None
    adapter = file_size(kv, [(n, tuple(d.shape), d.nbytes * data) for n, d, _ in tensors])
    params = sum(o * i for o, i in rows.values())
    padding = 31 * (len(targets) * (1 if data else 3) + len(rows) - len(targets))  # planned: A, B
    budget = GGUFBudget(megabytes, base, adapter, padding, params, adapter_dtype)
    if budget.code_bytes <= 0:
        raise ValueError(
            f"budget_mb={megabytes:g} leaves nothing for the quantized layers: the base file's "
            f"metadata and other tensors take {base / MIB:.2f} MiB and the "
            f"{'planned' if rank is None else f'rank-{rank}'} adapter "
            f"({adapter_dtype}) {adapter / MIB:.2f} MiB; give more than "
            f"{(base + adapter) / MIB:.2f} MiB"
        )
    return budget


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
