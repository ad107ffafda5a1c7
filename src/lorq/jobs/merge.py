"""One merge for every layer kind (mlx-lm's ``fuse(dequantize=)``): s·B·A goes into the weights.

    QuantLoraLinear  ─▶  nn.Linear / Conv1D with W = Q + s·B·A   (dense: off Q's grid)
    QALoraLinear     ─▶  QuantLinear with Δ = s·(B A)/G in its zeros / mins  (stays quantized)
                         or, with ``dequantize=True``, a dense layer with W = Q + s·B·Ā

``merge`` returns a new model and leaves its input alone; merging a merged model is refused (it
has no adapters left), so merge ∘ merge is never a silent second merge.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorq.exporters.hf import dense_model, is_export_dir, save_hf
from lorq.io.native import is_lorq_dir, model_meta, save, set_model_meta
from lorq.model.targets import set_module, shared_copy
from lorq.nn import AdapterLinear, QALoraLinear, QuantLinear
from lorq.quant.tensor import MergeError
from lorq.util.atomic import check_output

MIN_DTYPES = (None, "fp16", "fp32")
LOST_ADAPTER_WARNING = 0.5  # merge_qa_lora warns when a merge loses this fraction of ‖Δ‖
log = logging.getLogger(__name__)


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


def merge_qa_lora(model: nn.Module, min_dtype: str | None = None) -> dict[str, MergeError]:
    """Replace every QALoraLinear of ``model`` (in place) by its merged QuantLinear.

    Returns the measured error of every merge. Float mins (q4_1) merge exactly up to fp16, or up
    to fp32 with ``min_dtype="fp32"`` (the merged layers then store fp32 scales and mins: 6 bits
    per parameter at G = 32, no longer GGUF's Q4_1). Integer zeros round Δ / scale to whole steps
    and lose the part of the adapter below half a step, which is logged as a warning when it
    exceeds half of ‖Δ‖.
    """
    if min_dtype not in (None, "fp16", "fp32"):
        raise ValueError(f"min_dtype={min_dtype!r} is not supported; allowed: 'fp16', 'fp32'")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QALoraLinear)]
    if not layers:
        raise ValueError("the model has no QALoraLinear layers; compress it with method='qa-lora'")
    errors = {}
    for name, layer in layers:
        merged: QuantLinear = layer.merge(min_dtype)
        errors[name] = layer.merge_error(merged)
        set_module(model, name, merged)
    lossy = [n for n, e in errors.items() if e.delta_relative > LOST_ADAPTER_WARNING]
    if lossy:
        log.warning(
            "merging into integer zero points lost over %d%% of the adapter in %d of %d layers "
            "(e.g. %s); use a float-min preset such as q4_1 for an exact merge",
            round(100 * LOST_ADAPTER_WARNING),
            len(lossy),
            len(errors),
            lossy[0],
        )
    return errors
