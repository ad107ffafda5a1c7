"""The passes over the blocks before the first one is compressed — the Fisher
(``lorq.stream.fisher``), the budget's plan (``lorq.stream.planning``) — and shard 1 with the
calibration inputs X_0."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch

from lorq.budget import BudgetPlan
from lorq.budget.grid import candidate_grid
from lorq.calibrate.blocks import BlockInputs, capture_inputs
from lorq.compress_stream.state import Run, tokens_of
from lorq.config import uses_fisher
from lorq.stream import dist
from lorq.stream.fisher import fisher_done, read_fisher, stream_fisher
from lorq.stream.planning import (
    PLAN_FILE,
    block_costs,
    in_order,
    needs_hessians,
    plan_blocks,
    plan_of_rows,
)
from lorq.stream.shards import shard_payload
from lorq.stream.skeleton import (
    materialize,
    outside_blocks,
    release,
    release_parts,
)
from lorq.stream.writer import ShardWriter
from lorq.surgery import weight_shape


def fisher_pass(run: Run, out: Path, calibration, offload: Path | None) -> None:
    """The Fisher pass (rank 0, before any block is compressed), unless a killed run finished it
    (``lorq.stream.fisher``)."""
    if not run.config.fisher:
        return
    if run.world.is_writer and not fisher_done(out, len(run.blocks)):
        tokens = tokens_of(calibration, run.source.folder)
        stream_fisher(
            run.model, run.blocks, run.source.checkpoint, run.targets, tokens, run.device, out,
            offload,
        )  # fmt: skip
    dist.barrier(run.world)


def outside_shard(
    run: Run, writer: ShardWriter, shard: str, calibration, offload
) -> BlockInputs | None:
    """Shard 1 (the tensors outside the blocks, as stored) and the calibration inputs of block
    1; the embeddings are released again before the first block loads."""
    parts = outside_blocks(run.model, run.blocks)
    if shard not in writer.finished:
        materialize(run.model, parts, run.source.checkpoint, None, torch.device("cpu"))
        writer.write(shard, *shard_payload(run.model, parts))
        run.computed.append(shard)
        release_parts(parts)
    return capture(run, calibration, offload) if calibration is not None else None


def capture(run: Run, calibration, offload) -> BlockInputs:
    """X_0 of the calibration tokens (the embeddings resident meanwhile)."""
    parts = outside_blocks(run.model, run.blocks)
    materialize(run.model, parts, run.source.checkpoint, run.dtype, run.device)
    try:
        tokens = tokens_of(calibration, run.source.folder)
        return capture_inputs(run.model, run.blocks.modules[0], tokens, run.device, offload)
    finally:
        release_parts(parts)


def plan_pass(run: Run, out: Path, calibration, offload) -> None:
    """The budget's plan, made block by block (``lorq.stream.planning``) by rank 0 unless a
    killed run left it; then every rank gets it from rank 0."""
    config = run.config
    if not config.budgeted or run.plan is not None:
        return
    file = out / PLAN_FILE
    if not dist.broadcast(file.is_file(), 0, run.world):
        grid = candidate_grid(config.candidates)
        inputs = capture(run, calibration, offload) if needs_hessians(config) else None
        step = functools.partial(_plan_step, run, out, grid)
        tables = plan_blocks(len(run.blocks), step, inputs, out, grid, run.world.is_writer)
        shapes = {name: weight_shape(m) for name, m in run.targets.items()}
        if run.world.is_writer:
            plan_of_rows(tables, shapes, config).save(file)
    plan = BudgetPlan.load(file) if run.world.is_writer else None
    run.plan = dist.broadcast(plan, 0, run.world)


def _plan_step(run: Run, out: Path, grid, index: int, inputs: BlockInputs | None, rows: bool):
    """Block ``index``'s cost rows (each process those of its share of the targets, gathered in
    order; none when ``rows`` is False) and, when statistics flow, its original output."""
    block = run.blocks.modules[index]
    part = [(run.blocks.name(index), block, True)]
    materialize(run.model, part, run.source.checkpoint, run.dtype, run.device)
    targets = {n: m for n, m in run.targets.items() if run.blocks.index_of(n) == index}
    mine = {n: m for i, (n, m) in enumerate(targets.items()) if rows and run.world.owns(i)}
    fisher = read_fisher(out, index) if rows and uses_fisher(run.config.cost_weighting) else None
    table, output = block_costs(block, mine, run.config, grid, (fisher, inputs))
    release(block)
    if rows:
        table = in_order(dist.gather_objects(table, run.world), list(targets))
    return table, (replace(inputs, hidden=output) if inputs is not None else None)
