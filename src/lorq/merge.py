"""One merge for every layer kind (mlx-lm's ``fuse(dequantize=)``): s·B·A goes into the weights.

    QuantLoraLinear  ─▶  nn.Linear / Conv1D with W = Q + s·B·A   (dense: off Q's grid)
    QALoraLinear     ─▶  QuantLinear with Δ = s·(B A)/G in its zeros / mins  (stays quantized)
                         or, with ``dequantize=True``, a dense layer with W = Q + s·B·Ā

``merge`` returns a new model and leaves its input alone; merging a merged model is refused (it
has no adapters left), so merge ∘ merge is never a silent second merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorq.atomic import check_output
from lorq.export.hf import dense_model, is_export_dir, save_hf
from lorq.io.native import is_lorq_dir, model_meta, save, set_model_meta
from lorq.nn import AdapterLinear, QALoraLinear
from lorq.qa_lora import merge_qa_lora
from lorq.quant.tensor import MergeError
from lorq.surgery import shared_copy

MIN_DTYPES = (None, "fp16", "fp32")


@dataclass(frozen=True)
class MergeResult:
    """The merged model; ``quantized``: it still has lorq layers (a QA-LoRA merge), else it is a
    plain transformers model. ``errors``: the measured error of every quantized merge."""

    model: nn.Module
    quantized: bool
    errors: dict[str, MergeError] = field(default_factory=dict)
    tokenizer: Any = None

    def save(self, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
        """A lorq directory (quantized) or a Hugging Face model directory in ``dtype`` (dense)."""
        if self.quantized:
            return save(self, out, overwrite=overwrite)
        return save_hf(self.model, out, self.tokenizer, dtype, overwrite)


def check_merge_out(
    out: str | Path, quantized: bool, overwrite: bool, inputs: Iterable[str | Path] = ()
) -> None:
    """``out`` must be new or what a merge of this kind writes (replaced only with overwrite),
    and none of ``inputs``."""
    if quantized:
        check_output(out, overwrite, is_lorq_dir, "lorq model", inputs=inputs)
    else:
        check_output(out, overwrite, is_export_dir, "lorq export", inputs=inputs)


def merges_quantized(model: nn.Module, dequantize: bool = False) -> bool:
    """Whether :func:`merge` keeps ``model`` quantized; ValueError when it has no adapters."""
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    if not adapters:
        raise ValueError("the model has no adapters to merge (it is already merged)")
    return not dequantize and all(isinstance(m, QALoraLinear) for m in adapters)


def merge(
    model: nn.Module, *, dequantize: bool = False, min_dtype: str | None = None, tokenizer=None
) -> MergeResult:
    """Merge every adapter of ``model`` into its weights; ``model`` itself is not changed.

    A model whose adapters are all QA-LoRA stays quantized (``min_dtype="fp32"`` keeps an exact
    merge into fp32 mins: 6 bits/param, not GGUF); any other model, or ``dequantize=True``, becomes
    dense. The provenance carries over, with the merge recorded.
    """
    if min_dtype not in MIN_DTYPES:
        raise ValueError(f"min_dtype={min_dtype!r} is not supported; allowed: fp16, fp32")
    meta = model_meta(model)
    if merges_quantized(model, dequantize):
        merged = shared_copy(model)
        errors = merge_qa_lora(merged, min_dtype)
        meta["merge"] = {"kind": "quantized", "errors": {n: vars(e) for n, e in errors.items()}}
        set_model_meta(merged, meta)
        return MergeResult(merged, True, errors, tokenizer)
    dense = dense_model(model, with_delta=True)
    meta["merge"] = {"kind": "dense"}
    set_model_meta(dense, meta)
    return MergeResult(dense, False, {}, tokenizer)
