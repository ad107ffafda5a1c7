"""The passes over the blocks before the first one is compressed, and the statistics of the
targets outside the blocks.

    fisher_pass   F of every target, block by block (``lorq.calibrate.fisher``), kept in the
                  scratch folder until its block is compressed: SCRATCH/.fisher/block-0000b
    plan_pass     each block's cost rows on the original model (H on the original inputs, the
                  Fisher from the pass above): SCRATCH/.costs/block-0000b.npz, then one ILP:
                  SCRATCH/lorq-plan.json (no timings: a resumed directory is byte-identical)
    top_hessians  H of targets outside the blocks (an LM head) on X_N, through the model's top

A resumed run reuses every file a killed run finished. The Fisher pass runs on the first process
while the others wait; the cost rows of a block are shared out over the processes by target.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorq.budget import BudgetPlan
from lorq.budget.choices import Choices, plan_choices
from lorq.budget.cost import CostTable, cost_table, embedding_row, kl_costs
from lorq.budget.plan import plans_of_table, table_config
from lorq.calibrate.blocks import BlockInputs, forward_kwargs, run_block
from lorq.calibrate.fisher import blocks_bypassed, blockwise_fisher
from lorq.calibrate.hessian import Hessians, block_hessians, collect, input_leaders
from lorq.config import uses_activations, uses_fisher
from lorq.model.packing import input_embedding, table_shape, table_weight
from lorq.model.targets import dense_weight, weight_shape
from lorq.pipeline.run import Run
from lorq.pipeline.sensitivity import carry, finish, probes_for, start_embedding
from lorq.util import dist

FISHER_DIR = ".fisher"
COSTS_DIR = ".costs"
PLAN_FILE = "lorq-plan.json"
OUTSIDE = "outside"


def _stem(index: int | None) -> str:
    return OUTSIDE if index is None else f"block-{index:05d}"


@dataclass(frozen=True)
class FisherStore:
    """The Fisher of each block in ``folder`` (None: the run needs none)."""

    folder: Path | None
    given: dict | None = None

    @classmethod
    def of(cls, run: Run) -> FisherStore:
        if run.given.fisher is not None:
            return cls(None, dict(run.given.fisher))
        return cls(run.sink.scratch / FISHER_DIR if run.fisher_folder else None)

    def file(self, index: int | None) -> Path:
        assert self.folder is not None
        return self.folder / f"{_stem(index)}.safetensors"

    def complete(self, blocks: int) -> bool:
        return all(self.file(b).is_file() for b in [None, *range(blocks)])

    def save(self, index: int | None, fisher: dict[str, torch.Tensor]) -> None:
        self.file(index).parent.mkdir(exist_ok=True)
        tmp = self.file(index).with_suffix(".tmp")
        save_file({name: f.contiguous() for name, f in fisher.items()}, tmp)
        os.replace(tmp, self.file(index))

    def read(self, index: int | None) -> dict[str, torch.Tensor] | None:
        if self.given is not None:
            return self.given
        return load_file(self.file(index)) if self.folder is not None else None


class _Loader:
    """Blocks for the Fisher pass: dense fp32 weights, the targets by name."""

    def __init__(self, run: Run):
        self.run = run

    def load(self, index: int) -> None:
        self.run.source.load(
            self.run.source.block_part(index), torch.float32, self.run.device, True
        )

    def release(self, index: int) -> None:
        self.run.source.release(self.run.source.block_part(index))

    def targets(self, index: int | None) -> dict[str, nn.Module]:
        return self.run.block_targets(index)


def fisher_pass(run: Run) -> None:
    """Every block's F into the scratch folder (first process; the others wait), unless a killed
    run finished the pass or the Fisher was given."""
    store = FisherStore.of(run)
    if store.folder is None or not run.needs_fisher or store.complete(len(run.blocks)):
        return
    if run.world.is_writer:
        parts = run.source.outside_parts()
        run.source.load(parts, torch.float32, run.device, True)
        try:
            inputs = _captured(run)
            model, blocks = run.model, run.blocks.modules
            blockwise_fisher(model, blocks, inputs, run.tokens(), _Loader(run), store.save)
        finally:
            run.source.release(parts)
    dist.barrier(run.world)


def _captured(run: Run) -> BlockInputs:
    """X_0 with the outside parts already resident (in fp32, as the Fisher differentiates)."""
    from lorq.calibrate.blocks import capture_inputs

    first = run.blocks.modules[0]
    return capture_inputs(run.model, first, run.tokens(), run.device, run.offload)


def top_hessians(run: Run, targets: dict[str, nn.Module], inputs: BlockInputs) -> Hessians:
    """H of the targets outside the blocks: the model's top (final norm, head) run on each
    sequence's X_N, the blocks standing aside."""
    extra = forward_kwargs(run.model)
    tokens = run.tokens()

    def forward(rows: range) -> None:
        with blocks_bypassed(run.blocks.modules) as inject:
            for i in rows:
                inject(inputs.hidden[i : i + 1])
                run.model(input_ids=tokens[i : i + 1].to(run.device), **extra)

    leaders = input_leaders(targets, lambda: forward(range(1)))
    packed = collect(targets, leaders, lambda: forward(range(len(inputs))))
    return Hessians(packed, {name: leaders.get(name, name) for name in targets})


# ── the plan ──────────────────────────────────────────────────────────────────────────────────


def needs_hessians(run: Run) -> bool:
    """Whether the plan's costs need the layers' input statistics."""
    config = run.config
    return uses_activations(config.cost_weighting) or config.cost_rounding != "nearest"


def plan_pass(run: Run) -> None:
    """The budget's plan (module docstring), made unless given or left by a killed run; every
    process gets it from the first."""
    if not run.config.budgeted or run.plan is not None:
        return
    file = run.sink.scratch / PLAN_FILE
    if not dist.broadcast(file.is_file(), 0, run.world):
        grid = plan_choices(run.config)
        tables = cost_rows(run, grid)
        if run.world.is_writer:
            (plan,) = plans_of_rows(run, tables, [run.config.budget])
            plan.save(file)
    plan = BudgetPlan.load(file) if run.world.is_writer else None
    run.plan = dist.broadcast(plan, 0, run.world)


def cost_rows(run: Run, grid) -> list[CostTable]:
    """Every block's rows and the outside targets', in model order (cached per block); for a KL
    plan, the targets' α into ``run.sensitivities`` on the way (``lorq.pipeline.sensitivity``)."""
    given = run.given.hessians is not None
    probes = probes_for(run)
    wanted = (needs_hessians(run) and not given) or probes is not None
    inputs = run.capture() if wanted else None
    if probes is not None:
        start_embedding(run, probes)
    rows = len(run.targets) + (run.planned_embedding is not None)
    advance = run.progress("cost table", rows)
    tables = []
    for index in [*range(len(run.blocks)), None]:
        file = run.sink.scratch / COSTS_DIR / f"{_stem(index)}.npz"
        cached = load_costs(file, grid) if file.is_file() else None
        walk = inputs is not None and (index is not None or probes is not None)
        if cached is None or walk:
            table, inputs = _block_rows(run, index, grid, inputs, cached is None, probes)
            if cached is None and run.world.is_writer and table is not None:
                save_costs(table, file)
        table = cached if cached is not None else table
        if table is not None:
            tables.append(table)
            advance(len(table.names))
    return tables


def _block_rows(run: Run, index: int | None, grid, inputs: BlockInputs | None, want: bool, probes):
    """(the cost rows of block ``index``'s targets — each process computes its share, gathered
    in order; None when not ``want``ed or without targets —, the original block's output);
    ``probes`` (or None) carried through the block, or finished at the top."""
    parts = run.source.block_part(index) if index is not None else run.source.outside_parts()
    run.load(parts, forward=inputs is not None)
    targets = run.block_targets(index)
    hessians, output = _original_statistics(run, index, targets, inputs)
    owners = run.world.deal([a * b for a, b in map(weight_shape, targets.values())])
    share = {n: m for (n, m), o in zip(targets.items(), owners, strict=True) if o == run.world.rank}
    mine = share if want else {}
    table = _costs_of(run, mine, grid, hessians, index) if mine else None
    names = list(targets)
    if index is None and run.planned_embedding is not None:  # the table's row (§10)
        names.append(run.planned_embedding)
        table = _with_embedding(run, table, grid) if want and run.world.is_writer else table
    if probes is not None and index is not None:
        carry(run, probes, index, share, hessians, inputs)
    elif probes is not None:
        finish(run, probes, share, hessians, inputs)
    run.source.release(parts)
    if want and names:
        table = in_order(dist.gather_objects(table, run.world), names)
    hidden = replace(inputs, hidden=output) if inputs is not None and output is not None else None
    return (table if want and names else None), hidden


def _with_embedding(run: Run, table: CostTable | None, grid) -> CostTable:
    """``table`` (this process's outside rows, or None) with the token embedding's row."""
    name, module = input_embedding(run.model)
    row = embedding_row(name, table_weight(module), grid)
    return row if table is None else join_tables([table, row])


def _original_statistics(run: Run, index, targets, inputs: BlockInputs | None):
    if run.given.hessians is not None:  # the stream flows on only for the probes
        flows = inputs is not None and index is not None
        return run.given.hessians, run_block(run.blocks.modules[index], inputs) if flows else None
    if inputs is None:
        return None, None
    if index is None:
        return (top_hessians(run, targets, inputs) if targets else None), None
    return block_hessians(run.blocks.modules[index], targets, inputs, True, run.world)


def _costs_of(run: Run, targets, grid, hessians, index) -> CostTable:
    config = run.config
    fisher = FisherStore.of(run).read(index) if uses_fisher(config.cost_weighting) else None
    weights = {name: dense_weight(m).float() for name, m in targets.items()}
    method, weighting, rounding = config.method, config.cost_weighting, config.cost_rounding
    decomposition = table_config(method, config.rank, config.plan_iters, weighting, rounding)
    return cost_table(weights, grid, method, decomposition, fisher, hessians=hessians)


def plans_of_rows(run: Run, tables: list[CostTable], budgets: list[float]) -> list[BudgetPlan]:
    """The ILP's plan at each budget over every row (no timings kept: the same bytes each run)."""
    config = run.config
    shapes = {name: weight_shape(run.model.get_submodule(name)) for name in run.targets}
    embedding = run.planned_embedding
    if embedding is not None:
        shapes[embedding] = table_shape(run.model.get_submodule(embedding))
    job = (config.method, config.rank, (config.cost_weighting, config.cost_rounding))
    table = join_tables(tables)
    if run.sensitivities is not None:
        table = kl_costs(table, run.sensitivities)
    plans = plans_of_table(table, shapes, budgets, job, 0.0)
    timings = {"table_seconds": 0.0, "solve_seconds": 0.0}
    return [replace(plan, **timings, embedding=embedding) for plan in plans]


def save_costs(table: CostTable, file: Path) -> None:
    """One block's rows, replaced atomically."""
    file.parent.mkdir(exist_ok=True)
    tmp = file.parent / f".{file.stem}.tmp.npz"
    arrays = {"names": np.array(table.names), "numels": table.numels, "bits": table.bits}
    np.savez(tmp, **arrays, cost=table.cost, norms=table.norms)
    os.replace(tmp, file)


def load_costs(file: Path, choices: Choices) -> CostTable:
    with np.load(file) as data:
        names = tuple(str(n) for n in data["names"])
        columns = tuple(q for q, _, _ in choices.columns)
        planned = choices if choices.planned else None
        arrays = data["numels"], columns, data["bits"], data["cost"], data["norms"]
        return CostTable(names, *arrays, planned)


def join_tables(tables: list[CostTable]) -> CostTable:
    """The rows of every table, in order (one table of the whole model)."""
    return CostTable(
        names=tuple(n for t in tables for n in t.names),
        numels=np.concatenate([t.numels for t in tables]),
        candidates=tables[0].candidates,
        bits=np.concatenate([t.bits for t in tables]),
        cost=np.concatenate([t.cost for t in tables]),
        norms=np.concatenate([t.norms for t in tables]),
        choices=tables[0].choices,
    )


def in_order(tables: list[CostTable | None], names: list[str]) -> CostTable:
    """One table of the rows of ``tables`` (each process's share), in ``names``' order."""
    joined = join_tables([t for t in tables if t is not None])
    rows = [joined.names.index(name) for name in names]
    return CostTable(
        tuple(names), joined.numels[rows], joined.candidates, joined.bits[rows],
        joined.cost[rows], joined.norms[rows], joined.choices,
    )  # fmt: skip


_ = functools
