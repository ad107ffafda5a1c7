"""Checks before work: what a job can learn from a model's config alone, before loading it.

    config.json / GGUF metadata ─▶ the architecture on the meta device (no weight is read)
        ─▶ target matrices and their shapes ─▶ rank, formats, budget feasibility, plan

A job that fails here has spent a second, not the minutes of loading, calibrating and
evaluating a model. A hub id that is not in the local cache is checked after loading instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from lorq.budget import BudgetPlan
from lorq.budget.cost import shape_bits
from lorq.budget.grid import candidate_grid
from lorq.budget.ilp import check_budget
from lorq.config import CompressConfig
from lorq.layers import targets_of
from lorq.models import (
    ModelSource,
    check_no_pickle,
    is_causal,
    resolve,
    source_config,
    unusable_as_value_error,
)
from lorq.pack import check_embeddings
from lorq.quant import QuantConfig, format_of
from lorq.surgery import weight_shape

Shapes = dict[str, tuple[int, int]]
MAX_LISTED = 5  # names quoted in an error message


def skeleton(source: ModelSource) -> nn.Module | None:
    """``source``'s architecture on the meta device; None when its config is not on this machine."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        with unusable_as_value_error(source.name):
            config = source_config(source)
    except OSError:
        return None
    auto = AutoModelForCausalLM if source.gguf_file or is_causal(config) else AutoModel
    with torch.device("meta"):
        return auto.from_config(config)


def _bits(quant: QuantConfig, shape: tuple[int, int]) -> float:
    fmt = format_of(quant)
    fmt.check_shape(quant, shape)
    return 8.0 * fmt.nbytes(quant, shape)


def check_shapes(config: CompressConfig, shapes: Shapes) -> None:
    """Rank below every matrix's sides; the uniform format fits every matrix, or the budget lies
    in the range the candidates can reach."""
    smallest = min(shapes.items(), key=lambda item: min(item[1]))
    if config.method in ("lq", "loftq") and config.rank >= min(smallest[1]):
        raise ValueError(
            f"rank={config.rank} must be smaller than min(out, in) = {min(smallest[1])} of "
            f"{smallest[0]} {smallest[1]}; choose a smaller rank"
        )
    if not config.budgeted:
        quant = config.quant_config
        for name, shape in shapes.items():
            try:
                _bits(quant, shape)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        _check_rounding(config, [quant])
        return
    grid = candidate_grid(config.candidates)
    _check_rounding(config, grid)
    bits = np.array([shape_bits(name, shape, grid) for name, shape in shapes.items()])
    numels = np.array([out * inp for out, inp in shapes.values()], dtype=np.int64)
    if config.budget is not None:  # a budget in MiB is checked once the model is loaded
        check_budget(bits, numels, config.budget)


def _check_rounding(config: CompressConfig, quants) -> None:
    """GPTQ rounding needs a GPTQ grid in every format it may round to, importance-weighted
    rounding an importance-weighted search."""
    roundings = {config.rounding, config.cost_rounding if config.budgeted else "nearest"}
    for quant in quants:
        if "gptq" in roundings:
            format_of(quant).check_gptq(quant)
        if "weighted" in roundings:
            format_of(quant).check_weighted(quant)


def check_plan(
    plan: BudgetPlan, config: CompressConfig, shapes: Mapping[str, tuple] | None = None
) -> None:
    """A given plan must be for this budget, method, rank and (when given, {name: (out, in)})
    these target matrices."""
    if config.budget != plan.budget or config.method != plan.method:
        raise ValueError(
            f"the plan is for method {plan.method!r} at {plan.budget} bits/param, not "
            f"{config.method!r} at {config.budget}; make a plan with these settings (lorq plan)"
        )
    if config.method != "plain" and plan.rank != config.rank:
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


def check_compress(
    model: str, config: CompressConfig, plan: BudgetPlan | None = None, allow_pickle: bool = False
) -> None:
    """Everything about compressing ``model`` (a name, folder, .gguf file or hub id) with
    ``config`` (and ``plan``) that its config alone decides; ValueError naming the problem."""
    source = resolve(model)
    check_no_pickle(source, allow_pickle)
    architecture = skeleton(source)
    if architecture is None:
        return
    targets = targets_of(architecture, config)
    shapes = {name: weight_shape(module) for name, module in targets.items()}
    check_embeddings(architecture, config)
    if plan is not None:
        check_plan(plan, config, shapes)
        _check_rounding(config, [entry.config for entry in plan.entries])
    else:
        check_shapes(config, shapes)
