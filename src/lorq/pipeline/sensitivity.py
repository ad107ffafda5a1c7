"""The KL sensitivities α of a run's targets (``lorq.calibrate.sensitivity``), measured during the
cost rows' pass over the blocks: the probes ride along the clean stream, each process carries the
probes of its share of the targets, and the top turns them into α at the end.

    SCRATCH/lorq-sensitivity.json     {target: α}, written once by the first process; a resumed
                                      run reads it and runs no probe
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, capture_inputs, forward_kwargs
from lorq.calibrate.fisher import blocks_bypassed
from lorq.calibrate.sensitivity import (
    SENSITIVITY_SEQUENCES,
    Probes,
    looked_up,
    probe_seed,
    table_perturbation,
)
from lorq.model.packing import input_embedding, table_weight, tied_head
from lorq.nn.dense import dense_weight
from lorq.nn.quant_embedding import embedding_scale
from lorq.pipeline.run import Run
from lorq.util import dist
from lorq.util.atomic import atomic_file

SENSITIVITY_FILE = "lorq-sensitivity.json"


def wants_sensitivities(run: Run) -> bool:
    """Whether the run makes a plan whose costs are the KL's."""
    return run.config.budgeted and run.plan is None and run.config.cost_weighting == "kl"


def probes_for(run: Run) -> Probes | None:
    """The probes to carry (None: the plan needs no α, or a killed run left them measured, then
    read into ``run.sensitivities``)."""
    if not wants_sensitivities(run):
        return None
    file = run.sink.scratch / SENSITIVITY_FILE
    if dist.broadcast(file.is_file(), 0, run.world):
        run.sensitivities = json.loads(file.read_text())
        return None
    rows = len(run.tokens())
    if rows < SENSITIVITY_SEQUENCES:
        raise ValueError(
            f"the KL plan measures its sensitivities on {SENSITIVITY_SEQUENCES} calibration "
            f"sequences and the calibration text gives {rows}; give a longer text, shorter "
            "sequences (--seq-len) or use --plan-weighting fisher"
        )
    return Probes(seed=run.config.seed)


def carry(run: Run, probes: Probes, index: int, mine: dict[str, nn.Module], hessians, inputs):
    """Block ``index`` (loaded) for the probes: the older ones through it, then those of the
    targets ``mine`` (this process's share of its targets) started on its clean ``inputs``."""
    block = run.blocks.modules[index]
    probes.block(block, mine, lambda name: dense_weight(mine[name]).float(), hessians, inputs)


def start_embedding(run: Run, probes: Probes) -> None:
    """The token embedding's probe (plan_embeddings; the first process): X_0 of the first S
    calibration sequences looked up in E + Δ_E, the outside parts resident meanwhile."""
    if run.planned_embedding is None or not run.world.is_writer:
        return
    parts = run.source.outside_parts()
    run.source.load(parts, run.dtype, run.device)
    try:
        name, table = input_embedding(run.model)
        delta = _table_delta(probes, name, table)
        tokens = run.tokens()[: probes.rows]
        with looked_up(table, delta, embedding_scale(table)):
            first = run.blocks.modules[0]
            probes.states[name] = capture_inputs(run.model, first, tokens, run.device).hidden
    finally:
        run.source.release(parts)


def _table_delta(probes: Probes, name: str, table: nn.Module):
    return table_perturbation(table_weight(table), probes.t, probe_seed(name, probes.seed))


def finish(run: Run, probes: Probes, mine: dict[str, nn.Module], hessians, top: BlockInputs):
    """α of every target from the probes at the top (the outside parts loaded; ``mine``: this
    process's share of the targets outside the blocks, ``top``: the clean X_N) into
    ``run.sensitivities`` and the scratch file."""
    outside = {
        name: (module, probes.delta(name, dense_weight(module).float(), hessians[name]))
        for name, module in mine.items()
    }
    tied = {}
    if run.planned_embedding in probes.states and (head := tied_head(run.model)) is not None:
        name, table = input_embedding(run.model)
        tied[name] = (head, _table_delta(probes, name, table))
    alphas = probes.finish(top_output(run), top.hidden, outside, tied)
    merged: dict[str, float] = {}
    for part in dist.gather_objects(alphas, run.world):
        merged.update(part)
    names = [*run.targets, *([run.planned_embedding] if run.planned_embedding else [])]
    run.sensitivities = {name: merged[name] for name in names}
    if run.world.is_writer:
        with atomic_file(run.sink.scratch / SENSITIVITY_FILE) as tmp:
            tmp.write_text(json.dumps(run.sensitivities, indent=1))


def top_output(run: Run) -> Callable[[torch.Tensor], torch.Tensor]:
    """X_N (S × L × d) of the first S calibration sequences → the model's output through its own
    top, the blocks standing aside: a causal LM's logits (S × L × V), an encoder's mean-pooled
    last hidden states (S × d)."""
    extra = forward_kwargs(run.model)
    tokens = run.tokens()

    def output(hidden: torch.Tensor) -> torch.Tensor:
        rows = []
        with torch.no_grad(), blocks_bypassed(run.blocks.modules) as inject:
            for i in range(hidden.shape[0]):
                inject(hidden[i : i + 1])
                out = run.model(input_ids=tokens[i : i + 1].to(run.device), **extra)
                logits = getattr(out, "logits", None)
                rows.append(out.last_hidden_state.mean(1) if logits is None else logits)
        return torch.cat(rows).float()

    return output
