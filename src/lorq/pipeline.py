"""The data flow, top to bottom:

    weights ─▶ (Fisher) ─▶ budget plan or uniform config ─▶ decompose each matrix ─▶ replace modules

``compress`` works in place, layer by layer: each dense weight is released as soon as its module is
replaced, so peak memory stays near the model's own size. Everything but the LoRA factors is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorq.budget import BudgetPlan, plan_budget
from lorq.config import CompressConfig, QuantConfig
from lorq.decompose import Decomposition, decompose
from lorq.fisher import estimate_fisher
from lorq.nn import QuantLoraLinear
from lorq.progress import Progress, no_progress
from lorq.quant import quantize
from lorq.surgery import (
    DEFAULT_EXCLUDE,
    dense_weight,
    find_targets,
    freeze_all_but_lora,
    set_module,
)


@dataclass(frozen=True)
class CompressResult:
    model: nn.Module
    config: CompressConfig
    plan: BudgetPlan | None
    errors: dict[str, float]  # unweighted ‖W − Q − s·B·A‖ / ‖W‖ of every replaced matrix


def plain_decomposition(
    weight: torch.Tensor, quant: QuantConfig, config: CompressConfig
) -> Decomposition:
    """Plain quantization with LoRA's own init: B = 0, A ~ Kaiming-uniform (seeded)."""
    dc = config.decompose_config(quant)
    q = quantize(weight, quant)
    generator = torch.Generator().manual_seed(config.seed)
    bound = 1.0 / weight.shape[1] ** 0.5
    lora_A = (torch.rand(config.rank, weight.shape[1], generator=generator) * 2 - 1) * bound
    lora_B = torch.zeros(weight.shape[0], config.rank)
    error = float(torch.linalg.vector_norm(weight - q.dequantize()))
    return Decomposition(q, lora_B, lora_A, dc.scaling, (error,), 0, dc)


def _plan(weights, config: CompressConfig, fisher, progress: Progress) -> BudgetPlan:
    assert config.budget is not None
    method = "none" if config.method == "nf" else config.method
    return plan_budget(
        weights,
        config.budget,
        config.candidates,
        method,
        config.rank,
        fisher,
        iters=config.plan_iters,
        progress=progress,
    )


def compress(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None = None,
    progress: Progress = no_progress,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> CompressResult:
    """Replace the target linear layers of ``model`` (in place) by QuantLoraLinear layers.

    ``config.fisher`` needs either ``calibration`` token blocks (n × seq_len) to estimate the
    Fisher from, or a precomputed ``fisher`` ({module name: F (out × in)}, e.g. from
    :func:`lorq.fisher.estimate_fisher`, to share one estimate between several compressions).
    """
    exclude = DEFAULT_EXCLUDE if config.exclude is None else config.exclude
    targets = find_targets(model, config.include, exclude)
    if not targets:
        raise ValueError(
            f"no linear layers matched the targets (include={config.include}, exclude={exclude}); "
            "check the patterns against the model's module names"
        )
    if not config.fisher:
        fisher = None
    elif fisher is not None:
        fisher = dict(fisher)  # entries are dropped as layers are done; the caller's stays whole
    elif calibration is None:
        raise ValueError("fisher=True needs calibration token blocks (or a precomputed fisher)")
    else:
        fisher = estimate_fisher(model, calibration, targets, progress)
    plan = None
    if config.budget is not None:
        weights = {name: dense_weight(m) for name, m in targets.items()}
        plan = _plan(weights, config, fisher, progress)
    errors = {}
    advance = progress(f"decomposing ({config.method}, r={config.rank})", len(targets))
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
        set_module(model, name, layer.to(module.weight.device))
        residual = torch.linalg.vector_norm(weight - d.reconstruct())
        errors[name] = float(residual / torch.linalg.vector_norm(weight).clamp_min(1e-30))
        del weight, module
        if fisher:
            fisher.pop(name, None)
        advance(1)
    freeze_all_but_lora(model)
    return CompressResult(model, config, plan, errors)
