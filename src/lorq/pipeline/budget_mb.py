"""A budget in MiB of the GGUF files (``budget_mb``) as the ILP's bits/param, measured on the
source before any work:

    bits/param = 8 · (M · 2²⁰ − every other byte of the base and adapter files) / P

(``lorq.exporters.gguf.gguf_budget``: metadata, tokenizer, embeddings, norms, the rank-r adapter —
its metadata alone when the plan chooses the ranks and counts their factors; P the targets'
parameters), capped at what the largest candidates take.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lorq.budget.choices import plan_choices
from lorq.budget.cost import feasible_range, rows_bits
from lorq.config import CompressConfig
from lorq.exporters.gguf import MIB, GGUFBudget, gguf_budget
from lorq.model.targets import targets_of, weight_shape
from lorq.pipeline.guards import planned_table
from lorq.pipeline.sources import Source
from lorq.quant import as_config


def megabyte_budget(
    source: Source, config: CompressConfig, tokenizer: Any
) -> tuple[CompressConfig, GGUFBudget | None]:
    """(``config`` with ``budget_mb`` turned into bits/param, its GGUFBudget); (config, None)
    without a budget in MiB. The tensors outside the blocks are read meanwhile (their bytes
    count), the blocks' are not."""
    if config.budget_mb is None:
        return config, None
    shapes = {n: weight_shape(m) for n, m in targets_of(source.model, config).items()}
    tables = planned_table(source.model, config)
    origin = source.origin
    gguf = Path(origin.path) / origin.gguf_file if origin.gguf_file else None
    embeddings = as_config(config.embeddings) if config.embeddings is not None else None
    parts = source.outside_parts()
    source.load(parts, None, torch.device("cpu"))
    try:
        budget = gguf_budget(
            source.model, shapes, config.budget_mb, _rank(config), embeddings=embeddings,
            tokenizer=tokenizer, source=gguf, tables=tables,
        )  # fmt: skip
    finally:
        source.release(parts)
    bits = _feasible_bits(budget, config, shapes, tables)
    return replace(config, budget=bits, budget_mb=None), budget


def _rank(config: CompressConfig) -> int | None:
    """The adapter's one rank, or None when the plan chooses the ranks (its factors are costed
    as the codes are)."""
    return None if config.plans_adapters else config.rank


def _feasible_bits(budget: GGUFBudget, config: CompressConfig, shapes, tables) -> float:
    """The budget's bits/param, at most what the largest candidates take; ValueError in MiB when
    even the smallest do not fit (``tables``: the planned token embedding, counted too)."""
    low, high = feasible_range(*rows_bits(shapes, tables, plan_choices(config)))
    if budget.bits < low:
        other = (budget.base_bytes + budget.adapter_bytes) / MIB
        raise ValueError(
            f"budget_mb={budget.megabytes:g} leaves {budget.bits:.3f} bits/param for the "
            f"quantized layers after {other:.1f} MiB of other bytes (metadata, embeddings, norms, "
            f"the adapter); the candidates need at least {low:.3f}: give at "
            f"least {budget.megabytes_for(low):.1f} MiB, or pack the embeddings (embeddings=)"
        )
    return min(budget.bits, high)
