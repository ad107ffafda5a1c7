"""The bit-budget plan of a streamed model: its cost table built one block at a time
(ALGORITHMS.md §3, §6).

    for each block b:  load b ─▶ H of its targets on the original X_b (when the costs need it)
                       ─▶ its targets' cost rows (OUT/.costs/block-0000b.npz) ─▶ X_{b+1}
    all rows ─▶ ILP ─▶ OUT/lorq-plan.json

A resumed run reuses the finished rows and, once solved, the plan; the ILP sees the same table
as the in-memory ``lorq plan`` (the same rows in the same order), so it chooses the same plan.
The plan carries no timings: a resumed directory is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorq.budget.cost import CostTable, cost_table
from lorq.budget.plan import BudgetPlan, plans_of_table, table_config
from lorq.calibrate.blocks import BlockInputs, block_hessians
from lorq.config import CompressConfig, uses_activations
from lorq.surgery import dense_weight

COSTS_DIR = ".costs"
PLAN_FILE = "lorq-plan.json"


def costs_file(out: Path, block: int) -> Path:
    return out / COSTS_DIR / f"block-{block:05d}.npz"


def save_costs(table: CostTable, file: Path) -> None:
    """One block's rows, replaced atomically."""
    file.parent.mkdir(exist_ok=True)
    tmp = file.parent / f".{file.stem}.tmp.npz"
    arrays = {"names": np.array(table.names), "numels": table.numels, "bits": table.bits}
    np.savez(tmp, **arrays, cost=table.cost, norms=table.norms)
    os.replace(tmp, file)


def load_costs(file: Path, candidates) -> CostTable:
    with np.load(file) as data:
        names = tuple(str(n) for n in data["names"])
        return CostTable(
            names, data["numels"], tuple(candidates), data["bits"], data["cost"], data["norms"]
        )


def join_tables(tables: list[CostTable]) -> CostTable:
    """The rows of every table, in order (one table of the whole model)."""
    return CostTable(
        names=tuple(n for t in tables for n in t.names),
        numels=np.concatenate([t.numels for t in tables]),
        candidates=tables[0].candidates,
        bits=np.concatenate([t.bits for t in tables]),
        cost=np.concatenate([t.cost for t in tables]),
        norms=np.concatenate([t.norms for t in tables]),
    )


def needs_hessians(config: CompressConfig) -> bool:
    """Whether the plan's costs need the layers' input statistics."""
    return uses_activations(config.cost_weighting) or config.cost_rounding != "nearest"


def block_costs(
    block: nn.Module,
    targets: dict[str, nn.Module],
    config: CompressConfig,
    grid,
    statistics: tuple[dict | None, BlockInputs | None],
) -> tuple[CostTable | None, torch.Tensor | None]:
    """(cost rows of ``targets`` — None when there are none —, the original block's output
    X_{b+1} when inputs are given)."""
    fisher, inputs = statistics
    hessians, output = (None, None)
    if inputs is not None:
        hessians, output = block_hessians(block, targets, inputs, keep_output=True)
    if not targets:
        return None, output
    weights = {name: dense_weight(m).float() for name, m in targets.items()}
    method, weighting, rounding = config.method, config.cost_weighting, config.cost_rounding
    decomposition = table_config(method, config.rank, config.plan_iters, weighting, rounding)
    table = cost_table(weights, grid, method, decomposition, fisher, hessians=hessians)
    return table, output


def plan_of_rows(
    tables: list[CostTable], shapes: dict[str, tuple[int, int]], config: CompressConfig
) -> BudgetPlan:
    """The ILP's plan of ``config.budget`` over every block's rows (no timings kept)."""
    job = (config.method, config.rank, (config.cost_weighting, config.cost_rounding))
    (plan,) = plans_of_table(join_tables(tables), shapes, [config.budget], job, 0.0)
    return replace(plan, table_seconds=0.0, solve_seconds=0.0)


def plan_blocks(
    count: int,
    step: Callable[[int, BlockInputs | None, bool], tuple[CostTable | None, BlockInputs | None]],
    inputs: BlockInputs | None,
    out: Path,
    candidates,
    save: bool = True,
) -> list[CostTable]:
    """Every block's rows: ``step(b, X_b, rows wanted)`` → (rows, X_{b+1}); rows a killed run
    finished are read back (the block still runs when a later block needs its output), new ones
    saved (``save``: by the process that writes)."""
    tables = []
    for b in range(count):
        file = costs_file(out, b)
        cached = load_costs(file, candidates) if file.is_file() else None
        if cached is None or inputs is not None:
            table, inputs = step(b, inputs, cached is None)
        if cached is None and save:
            save_costs(table, file)
        tables.append(cached if cached is not None else table)
    return tables


def in_order(tables: list[CostTable | None], names: list[str]) -> CostTable:
    """One table of the rows of ``tables`` (each process's share of a block), in ``names``'
    order."""
    joined = join_tables([t for t in tables if t is not None])
    rows = [joined.names.index(name) for name in names]
    return CostTable(
        tuple(names), joined.numels[rows], joined.candidates, joined.bits[rows],
        joined.cost[rows], joined.norms[rows],
    )  # fmt: skip
