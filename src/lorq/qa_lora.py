"""QA-LoRA on a model: an INT-k base plus a group-pooled adapter, and its merge into the base
(QA-LoRA arXiv 2309.14717; docs/algorithms.md §2.5).

    compress:  W ─▶ Q (RTN, GPTQ on the layer's Hessian, or given codes) ─▶ QALoraLinear
               (B = 0; with activation weighting the best rank-r pooled adapter for W − Q in the
               H-norm, ``lorq.decompose.pooled``)
    merge:     QALoraLinear ─▶ QuantLinear with Δ = s·(B A)/G folded into the zeros / mins

Both work in place on the model's modules; the merge reports the measured error of every layer
(integer zeros lose the part of Δ below half a step, which is logged, never hidden).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorq.config import CompressConfig, uses_activations
from lorq.decompose.pooled import pooled_low_rank
from lorq.layers import LayerStep, relative_error
from lorq.nn import QALoraLinear, QuantLinear
from lorq.nn.qa_lora_linear import check_qa_base
from lorq.progress import Progress
from lorq.quant import QuantConfig, QuantizedTensor, as_config, format_of, quantize
from lorq.quant.gptq import damped_cholesky, gptq_quantize
from lorq.quant.tensor import MergeError
from lorq.surgery import dense_weight, set_module, weight_shape

log = logging.getLogger(__name__)
LOST_ADAPTER_WARNING = 0.5  # merge_qa_lora warns when a merge loses this fraction of ‖Δ‖


def check_base(base: Mapping[str, QuantizedTensor], targets: Mapping[str, nn.Module]) -> None:
    """``base`` must hold, per target name, a Q of the module's shape that can carry QA-LoRA."""
    unknown = sorted(set(base) - set(targets))
    if unknown:
        raise ValueError(
            f"base has entries for {unknown}, which are not targets of this compression; "
            "give one entry per target module name (see include / exclude)"
        )
    for name, q in base.items():
        shape = weight_shape(targets[name])
        if q.shape != shape:
            raise ValueError(
                f"base[{name!r}] has shape {q.shape} but the module's weight is {shape} "
                "(out × in); give a Q of the module's own shape"
            )
        check_qa_base(q.config, q.shape)


def gguf_base(
    targets: Mapping[str, nn.Module], quant: QuantConfig, gguf_path: Path | None
) -> dict[str, QuantizedTensor] | None:
    """The source GGUF's own codes as the base, for targets already in ``quant``: the packed
    layers of a model loaded from the file, else the file's tensors read again."""
    from lorq.io.gguf import read_gguf_quantized

    packed = {n: m.q for n, m in targets.items() if getattr(m, "quant_config", None) == quant}
    if not packed and gguf_path is not None:
        codes = read_gguf_quantized(gguf_path)
        packed = {n: q for n, q in codes.items() if q.config == quant}
    return {name: q for name, q in packed.items() if name in targets} or None


def _base_of(weight: torch.Tensor, config: CompressConfig, quant: QuantConfig, hessian):
    """Q of one matrix: GPTQ with its Hessian, round to nearest under its diagonal ("weighted"),
    else round to nearest."""
    if config.rounding == "weighted":
        return format_of(quant).quantize_weighted(weight, quant, hessian.diagonal().float())
    if not config.gptq:
        return quantize(weight, quant)
    return gptq_quantize(weight, hessian.float().to(weight.device), quant, config.damp)


def _init_adapter(layer: QALoraLinear, weight: torch.Tensor, hessian, config: CompressConfig):
    """The first k ≤ min(r, out, in/G) components of B, A: the closed-form pooled fit of W − Q
    (the rest keep LoRA's init, B = 0 and a random A, so that every component trains)."""
    residual = weight - layer.q.dequantize().to(weight.device)
    chol = damped_cholesky(hessian.float().to(weight.device), config.damp)
    generator = torch.Generator().manual_seed(config.seed)
    lora_B, lora_A = pooled_low_rank(
        residual, chol, layer.block_size, config.rank, layer.scaling, "randomized", generator
    )
    k = lora_B.shape[1]
    with torch.no_grad():
        layer.lora_B[:, :k] = lora_B.to(layer.lora_B.device)
        layer.lora_A[:k] = lora_A.to(layer.lora_A.device)


def compress_qa_lora(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    hessians: dict[str, torch.Tensor],
    progress: Progress,
    base: Mapping[str, QuantizedTensor] | None,
) -> dict[str, float]:
    """Every target → QALoraLinear, in place; returns ‖W − Q − s·B·Ā‖ / ‖W‖ per target.

    ``hessians``: H of every target, when ``config`` rounds by GPTQ or weights by activations.
    """
    base = dict(base or {})
    check_base(base, targets)
    quant = as_config(config.quant or "q4_1")
    for name, module in targets.items():
        if name not in base:
            check_qa_base(quant, weight_shape(module))
    errors = {}
    step = LayerStep(progress, f"QA-LoRA ({quant.name}, r={config.rank})", len(targets))
    for name, module in targets.items():
        weight = dense_weight(module).float()
        hessian = hessians.pop(name, None)
        given = base.pop(name, None)
        q = given if given is not None else _base_of(weight, config, quant, hessian)
        layer = QALoraLinear.from_linear(
            module, q.config, config.rank, config.lora_alpha, config.seed, q
        )
        if uses_activations(config.weighting):
            _init_adapter(layer, weight, hessian, config)
        set_module(model, name, layer)
        approx = q.dequantize().to(weight.device) + layer.delta_weight().to(weight.device)
        errors[name] = relative_error(weight, approx)
        del weight, module
        step()
    return errors


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
