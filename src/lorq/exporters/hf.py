"""A lorq model as a standard Hugging Face model directory (dense weights).

    merged:  W = Q + s·B·A     (``lorq merge``: plain transformers reproduces lorq's logits;
                               QA-LoRA's pooled A counts as its expansion Ā over each group)
    base:    W = Q             (the base a PEFT adapter belongs on, as LoftQ's released checkpoints)

Each quantized layer becomes the module kind the architecture has at that place: ``nn.Linear``
(weight out × in) or GPT-2's ``Conv1D`` (weight in × out). The lorq model itself is never changed:
the dense modules go into a structural copy whose other tensors are shared, and the dtype cast
happens on the state dict that is written. ``lorq_export.json`` beside the files marks a directory
lorq wrote, so that only such a directory is ever replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq._version import __version__
from lorq.exporters.base import Exported, ExportOptions, ExportTarget, register_export
from lorq.io.native import input_paths, model_meta
from lorq.model.skeleton import skeleton
from lorq.model.targets import set_module, shared_copy
from lorq.nn import QuantEmbedding, QuantLinear, packed_linears, tied_packed_head
from lorq.nn.quant_linear import PackedBuffers
from lorq.util.atomic import atomic_directory, check_output

EXPORT_FILE = "lorq_export.json"
EXPORT_FORMAT = "lorq-export"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_export_dir(path: Path) -> bool:
    try:
        return json.loads((path / EXPORT_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The packed linear layers (a tied, packed output layer counts as its embedding's table)."""
    layers = packed_linears(model)
    if not layers:
        raise ValueError("the model has no lorq layers; pass a model written by lorq compress")
    return layers


def has_adapters(model: nn.Module) -> bool:
    """Whether any lorq layer of ``model`` still carries LoRA factors (not a merged model)."""
    return any(m.has_lora for m in quant_layers(model).values())


def dense_nbytes(model: nn.Module, dtype: str = "fp32") -> int:
    """About the bytes of ``model`` written densely in ``dtype`` (an output's room to check)."""
    item = torch_dtype(dtype).itemsize
    packed = {id(t) for m in model.modules() if isinstance(m, PackedBuffers) for t in m.buffers()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    shapes = [m.shape for m in model.modules() if isinstance(m, PackedBuffers)]
    return item * (dense + sum(out * inp for out, inp in shapes))


def dense_embeddings(model: nn.Module) -> nn.Module:
    """``model`` itself, or a structural copy whose packed embedding tables are dense
    ``nn.Embedding`` weights (a tied packed output layer then shares that weight again)."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    if not packed:
        return model
    tied = tied_packed_head(model) is not None
    copy = shared_copy(model)
    for name, layer in packed.items():
        weight = nn.Parameter(layer.q.dequantize(), requires_grad=False)
        embedding = nn.Embedding(*layer.shape, _weight=weight, device=weight.device)
        set_module(copy, name, embedding)
    if tied:
        embedding = copy.get_input_embeddings()
        head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        head.weight = embedding.weight
        copy.set_output_embeddings(head)
    return copy


def meta_skeleton(model: nn.Module) -> nn.Module | None:
    """The model's own architecture (no lorq layers) on the meta device; None without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return skeleton(config, model_class=type(model), real_buffers=False)


def conv1d_names(model: nn.Module, names: list[str]) -> set[str]:
    """Which of ``names`` are GPT-2 Conv1D modules in the model's own architecture."""
    from transformers.pytorch_utils import Conv1D

    skeleton = meta_skeleton(model)
    if skeleton is None:
        return set()
    return {name for name in names if isinstance(skeleton.get_submodule(name), Conv1D)}


def dense_layer(layer: QuantLinear, conv1d: bool, with_delta: bool) -> nn.Module:
    """A float32 nn.Linear / Conv1D with weight Q + s·B·A (``with_delta``) or Q."""
    from transformers.pytorch_utils import Conv1D

    weight = layer.merged_weight() if with_delta and layer.has_lora else layer.q.dequantize()
    module: nn.Module
    if conv1d:
        module = Conv1D(layer.out_features, layer.in_features)
        module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
    else:
        module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        module.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
    return module.to(layer.q.device)


def dense_model(model: nn.Module, with_delta: bool = True) -> nn.Module:
    """A copy of ``model`` with every lorq layer dense (see the module docstring)."""
    layers = quant_layers(model)
    conv1d = conv1d_names(model, list(layers))
    copy = shared_copy(dense_embeddings(model))
    for name, layer in layers.items():
        set_module(copy, name, dense_layer(layer, name in conv1d, with_delta))
    return copy


def write_hf_model(
    model: nn.Module,
    path: Path,
    dtype: torch.dtype,
    tokenizer: Any = None,
    marker: dict[str, Any] | None = None,
) -> None:
    """``save_pretrained`` of a dense ``model`` into ``path``, every float tensor in ``dtype``."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state)
    config = json.loads((path / "config.json").read_text())  # the dtype of what was written,
    config["dtype"] = str(dtype).removeprefix("torch.")  # not of the model in memory
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if marker is not None:
        write_marker(path, marker)


def write_marker(path: Path, marker: dict[str, Any]) -> None:
    """``lorq_export.json``: what lorq exported into ``path`` (and that lorq may replace it)."""
    info = {"format": EXPORT_FORMAT, "lorq_version": __version__, **marker}
    (path / EXPORT_FILE).write_text(json.dumps(info, indent=1))


def save_merged(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write W = Q + s·B·A as a standard Hugging Face model directory, atomically."""
    torch_dtype(dtype)
    merged = dense_model(model, with_delta=True)
    return save_hf(merged, path, tokenizer, dtype, overwrite)


def save_hf(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write a dense ``model`` as a standard Hugging Face model directory, atomically."""
    target = torch_dtype(dtype)
    kind = {"kind": "merged", "dtype": dtype, "source": model_meta(model).get("source")}
    with export_directory(model, path, overwrite) as tmp:
        write_hf_model(model, tmp, target, tokenizer, kind)
    return Path(path)


def export_directory(model: nn.Module, path: str | Path, overwrite: bool):
    """The atomic temporary folder an export of ``model`` into ``path`` is written in: replaces
    only a lorq export, never the folder ``model`` was loaded from."""
    inputs = input_paths(model)
    return atomic_directory(path, overwrite, is_export_dir, "lorq export", inputs)


def check_export_dir(out: Path, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """``out`` must be new, or a directory lorq exported (replaced only with ``overwrite``), and
    none of ``inputs``."""
    check_output(out, overwrite, is_export_dir, "lorq export", inputs=inputs)


class MergedHF(ExportTarget):
    name = "hf"
    description = "a standard Hugging Face model with W = Q + s·B·A (dense)"

    def check(self, out: Path, options: ExportOptions) -> None:
        check_export_dir(out, options.overwrite, options.inputs)

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        save_merged(model, out, options.tokenizer, options.dense_dtype, options.overwrite)
        return Exported(out, f"merged model in {out} (transformers' from_pretrained loads it)")


register_export(MergedHF())
