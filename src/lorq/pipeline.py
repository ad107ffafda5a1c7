"""The data flow, top to bottom:

    weights ─▶ (Fisher) ─▶ budget plan or uniform config ─▶ decompose each matrix ─▶ replace modules
    qa-lora:   weights ─▶ (Hessians) ─▶ INT base Q (RTN, GPTQ or given) ─▶ QALoraLinear (B = 0)

``compress`` works in place, layer by layer: each dense weight is released as soon as its module is
replaced, so peak memory stays near the model's own size. A source layer held packed (a plain
QuantLinear, e.g. a GGUF's Q4_1 layer loaded by ``lorq.io.gguf_model``) is decoded to its dense W
one at a time, when its turn comes. Everything but the LoRA factors is frozen.
``merge_qa_lora`` folds every QA-LoRA adapter into its Q (in place) and reports the merge errors.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorq.budget import BudgetPlan, plan_budgets
from lorq.config import DEFAULT_QA_LORA_QUANT, CompressConfig, QuantConfig
from lorq.decompose import Decomposition, decompose
from lorq.fisher import estimate_fisher
from lorq.nn import MergeError, QALoraLinear, QuantLoraLinear
from lorq.nn.lora_linear import kaiming_uniform
from lorq.nn.qa_lora_linear import check_qa_base
from lorq.progress import Progress, no_progress
from lorq.quant import QuantizedTensor, quantize
from lorq.runtime import release_free_memory
from lorq.surgery import (
    DEFAULT_EXCLUDE,
    DenseWeights,
    dense_weight,
    device_of,
    find_targets,
    freeze_all_but_lora,
    set_module,
    weight_shape,
)

log = logging.getLogger(__name__)
MAX_LISTED = 5  # names quoted in an error message
RELEASE_EVERY = 16  # layers between returns of freed heap memory to the OS
LOST_ADAPTER_WARNING = 0.5  # merge_qa_lora warns when a merge loses this fraction of ‖Δ‖


@dataclass(frozen=True)
class CompressResult:
    model: nn.Module
    config: CompressConfig
    plan: BudgetPlan | None
    errors: dict[str, float]  # unweighted ‖W − Q − s·B·A‖ / ‖W‖ of every replaced matrix


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖W − approximation‖_F / ‖W‖_F."""
    residual = torch.linalg.vector_norm(weight - approximation)
    return float(residual / torch.linalg.vector_norm(weight).clamp_min(1e-30))


def plain_decomposition(
    weight: torch.Tensor, quant: QuantConfig, config: CompressConfig
) -> Decomposition:
    """Plain quantization with LoRA's own init: B = 0, A ~ Kaiming-uniform (seeded)."""
    dc = config.decompose_config(quant)
    q = quantize(weight, quant)
    lora_A = kaiming_uniform(config.rank, weight.shape[1], config.seed).to(weight.device)
    lora_B = torch.zeros(weight.shape[0], config.rank, device=weight.device)
    error = float(torch.linalg.vector_norm(weight - q.dequantize()))
    return Decomposition(q, lora_B, lora_A, dc.scaling, (error,), 0, dc)


def plan_budgets_for(
    model: nn.Module,
    config: CompressConfig,
    budgets: list[float],
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = no_progress,
) -> list[BudgetPlan]:
    """Plans of ``config``'s method, rank and targets at several budgets from one cost table;
    pass each to :func:`compress` as ``plan=`` with ``config.budget`` set to its budget."""
    targets = _targets(model, config)
    return plan_budgets(
        DenseWeights(targets),
        budgets,
        config.candidates,
        config.plan_method,
        config.rank,
        fisher if config.fisher else None,
        iters=config.plan_iters,
        progress=progress,
    )


def compress(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None = None,
    progress: Progress = no_progress,
    fisher: Mapping[str, torch.Tensor] | None = None,
    base: Mapping[str, QuantizedTensor] | None = None,
    plan: BudgetPlan | None = None,
) -> CompressResult:
    """Replace the target linear layers of ``model`` (in place) by QuantLoraLinear layers, or by
    QALoraLinear layers for ``method="qa-lora"``.

    ``config.fisher`` needs either ``calibration`` token blocks (n × seq_len) to estimate the
    Fisher from, or a precomputed ``fisher`` ({module name: F (out × in)}, e.g. from
    :func:`lorq.fisher.estimate_fisher`, to share one estimate between several compressions).
    ``config.gptq`` (qa-lora) needs ``calibration`` for the Hessians. ``base`` (qa-lora only):
    {module name: a precomputed INT QuantizedTensor (out × in)}, e.g. Q4_1 codes read from a GGUF
    file, used as Q as they are (with their own QuantConfig) instead of quantizing W.
    ``plan``: a precomputed budget plan (from :func:`lorq.budget.plan_budgets`, or ``lorq plan``)
    for ``config.budget``, instead of building its cost table again.
    """
    targets = _targets(model, config)
    if config.method == "qa-lora":
        if plan is not None:
            raise ValueError("method='qa-lora' uses one uniform base config; it takes no plan")
        return _compress_qa_lora(model, config, targets, calibration, progress, base)
    if base is not None:
        raise ValueError(
            f"base= (a precomputed Q) is only used by method='qa-lora', not {config.method!r}"
        )
    fisher = _fisher(model, config, targets, calibration, progress, fisher)
    if plan is not None:
        check_plan(plan, config, {name: weight_shape(m) for name, m in targets.items()})
    elif config.budget is not None:
        (plan,) = plan_budgets_for(model, config, [config.budget], fisher, progress)
    errors = {}
    advance = _per_layer(progress, f"decomposing ({config.method}, r={config.rank})", len(targets))
    for name, module in targets.items():
        quant = plan.config_of(name) if plan else QuantConfig.preset(config.quant or "nf4")
        weight = dense_weight(module).float()
        if config.method == "nf":
            d = plain_decomposition(weight, quant, config)
        else:
            d = decompose(
                weight, config.decompose_config(quant), fisher.get(name) if fisher else None
            )
        layer = QuantLoraLinear.from_decomposition(d, getattr(module, "bias", None))
        set_module(model, name, layer.to(device_of(module)))
        errors[name] = relative_error(weight, d.reconstruct())
        del weight, module
        if fisher:
            fisher.pop(name, None)
        advance()
    freeze_all_but_lora(model)
    return CompressResult(model, config, plan, errors)


def check_plan(
    plan: BudgetPlan, config: CompressConfig, shapes: Mapping[str, tuple] | None = None
) -> None:
    """A given plan must be for this budget, method, rank and (when given, {name: (out, in)})
    these target matrices."""
    method = config.plan_method
    if config.budget != plan.budget or method != plan.method:
        raise ValueError(
            f"the plan is for method {plan.method!r} at {plan.budget} bits/param, not "
            f"{method!r} at {config.budget}; make a plan with these settings (lorq plan)"
        )
    if method != "none" and plan.rank != config.rank:
        raise ValueError(f"the plan was made for rank {plan.rank}, not {config.rank}")
    if shapes is None:
        return
    planned = {e.name: e.shape for e in plan.entries}
    if planned != {name: tuple(shape) for name, shape in shapes.items()}:
        missing = sorted(set(shapes) ^ set(planned))[:MAX_LISTED]
        raise ValueError(
            "the plan's matrices are not this model's targets "
            f"(e.g. {missing or 'a shape differs'}); make the plan for this model and targets"
        )


def _per_layer(progress: Progress, label: str, total: int) -> Callable[[], None]:
    """A per-layer step: advances ``progress`` and, every RELEASE_EVERY layers, hands the heap
    memory the finished layers freed back to the OS (their temporaries fragment the heap)."""
    advance = progress(label, total)
    done = itertools.count(1)

    def step() -> None:
        advance(1)
        if next(done) % RELEASE_EVERY == 0:
            release_free_memory()

    return step


def _targets(model: nn.Module, config: CompressConfig) -> dict[str, nn.Module]:
    exclude = DEFAULT_EXCLUDE if config.exclude is None else config.exclude
    targets = find_targets(model, config.include, exclude)
    if not targets:
        raise ValueError(
            f"no linear layers matched the targets (include={config.include}, exclude={exclude}); "
            "check the patterns against the model's module names"
        )
    return targets


def _fisher(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor | None,
    progress: Progress,
    fisher: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    if not config.fisher:
        return None
    if fisher is not None:
        return dict(fisher)  # entries are dropped as layers are done; the caller's stays whole
    if calibration is None:
        raise ValueError("fisher=True needs calibration token blocks (or a precomputed fisher)")
    return estimate_fisher(model, calibration, targets, progress)


def _check_base(base: Mapping[str, QuantizedTensor], targets: dict[str, nn.Module]) -> None:
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


def _hessians(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor | None,
    progress: Progress,
) -> dict[str, torch.Tensor]:
    """H (in × in) of every target that GPTQ rounds; {} without gptq."""
    if not config.gptq or not targets:
        return {}
    if calibration is None:
        raise ValueError("gptq=True needs calibration token blocks to estimate the Hessians from")
    from lorq.hessian import estimate_hessians

    return estimate_hessians(model, calibration, targets, progress)


def _qa_base(
    weight: torch.Tensor, quant: QuantConfig, hessian: torch.Tensor | None
) -> QuantizedTensor:
    """Q of one matrix: GPTQ with its Hessian, else round to nearest."""
    if hessian is None:
        return quantize(weight, quant)
    from lorq.quant.gptq import gptq_quantize

    return gptq_quantize(weight, hessian.float().to(weight.device), quant)


def _compress_qa_lora(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor | None,
    progress: Progress,
    base: Mapping[str, QuantizedTensor] | None,
) -> CompressResult:
    """Every target → QALoraLinear (B = 0); errors are ‖W − Q‖ / ‖W‖."""
    base = dict(base or {})
    _check_base(base, targets)
    quant = QuantConfig.preset(config.quant or DEFAULT_QA_LORA_QUANT)
    rest = {name: m for name, m in targets.items() if name not in base}
    for module in rest.values():
        out_features, in_features = weight_shape(module)
        check_qa_base(quant, (out_features, in_features))
    hessians = _hessians(model, config, rest, calibration, progress)
    errors = {}
    advance = _per_layer(progress, f"QA-LoRA ({quant.name}, r={config.rank})", len(targets))
    for name, module in targets.items():
        weight = dense_weight(module).float()
        given = base.pop(name, None)
        q = given if given is not None else _qa_base(weight, quant, hessians.pop(name, None))
        layer = QALoraLinear.from_linear(
            module, q.config, config.rank, config.lora_alpha, config.seed, q
        )
        set_module(model, name, layer)
        errors[name] = relative_error(weight, q.dequantize().to(weight.device))
        del weight, module
        advance()
    freeze_all_but_lora(model)
    return CompressResult(model, config, None, errors)


def merge_qa_lora(model: nn.Module, min_dtype: str | None = None) -> dict[str, MergeError]:
    """Replace every QALoraLinear of ``model`` (in place) by its merged QuantLinear.

    Returns the measured error of every merge. Float mins (q4_1) merge exactly up to fp16, or up
    to fp32 with ``min_dtype="fp32"`` (the merged layers then store fp32 scales and mins: 6 bits
    per parameter at G = 32, no longer GGUF's Q4_1). Integer zeros round Δ / scale to whole steps
    and lose the part of the adapter below half a step (ALGORITHMS.md §2.4), which is logged as a
    warning when it exceeds half of ‖Δ‖.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QALoraLinear)]
    if not layers:
        raise ValueError("the model has no QALoraLinear layers; compress it with method='qa-lora'")
    errors = {}
    for name, layer in layers:
        merged = layer.merge(min_dtype)
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
