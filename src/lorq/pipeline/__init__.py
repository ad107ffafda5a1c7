"""One compress pipeline for every model, device and process count (docs/architecture.md).

    source ──▶ driver (one loop over blocks) ──▶ sink
    ResidentSource (a model in memory)              MemorySink (the model, compressed in place)
    CheckpointSource (safetensors, any size)        DirectorySink (sharded, resumable, atomic)
    GGUFSource (a GGUF file, packed)

:func:`run_pipeline` checks the run before any work, opens the sink, runs the driver
(``lorq.pipeline.driver``) and writes the provenance; the jobs (``lorq.jobs``) call it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.budget import BudgetPlan
from lorq.budget.choices import plan_choices
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig
from lorq.io.native import FORMAT_VERSION, set_model_meta
from lorq.model.targets import freeze_all_but_lora, targets_of
from lorq.pipeline.devices import activation_offload, dtype_name, resolve_device, resolve_dtype
from lorq.pipeline.driver import compress_blocks
from lorq.pipeline.passes import cost_rows, fisher_pass, needs_hessians, plans_of_rows
from lorq.pipeline.run import Given, Run
from lorq.pipeline.sensitivity import wants_sensitivities
from lorq.pipeline.sinks import DirectorySink, MemorySink
from lorq.pipeline.sources import CheckpointSource, GGUFSource, ResidentSource, Source
from lorq.pipeline.writer import shard_writer
from lorq.util import dist
from lorq.util.progress import Progress, no_progress

__all__ = [
    "CheckpointSource",
    "GGUFSource",
    "Given",
    "Outcome",
    "ResidentSource",
    "Source",
    "Where",
    "plan_pipeline",
    "run_pipeline",
]


@dataclass(frozen=True)
class Outcome:
    """What a run produced: the model (compressed in place when resident), its plan, every
    target's relative error, the shards it computed or found finished, its provenance."""

    model: nn.Module
    plan: BudgetPlan | None
    errors: dict[str, float]
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Where:
    """Where and how a run computes: ``device`` (auto, cpu, cuda, cuda:N), ``dtype`` of the
    blocks' forwards (fp32 unless given), ``offload`` of the activations to disk (None: when
    they would take more than a quarter of the free memory)."""

    device: str | torch.device = "auto"
    dtype: str | torch.dtype | None = None
    offload: bool | None = None


def run_pipeline(
    source: Source,
    config: CompressConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plan: BudgetPlan | None = None,
    calibration: Calibration | None = None,
    tokenizer: Any = None,
    where: Where = Where(),
    given: Given | None = None,
    progress: Progress = no_progress,
    on_statistics: Any = None,
) -> Outcome:
    """Compress ``source``'s targets by ``config`` into memory (``out`` None) or into the lorq
    directory ``out``; ``calibration`` when the config needs statistics that are not given."""
    run = _run(source, config, plan, (calibration, tokenizer), where, given or Given(), progress)
    run.on_statistics = on_statistics
    with _sink(run, out, resume, overwrite) as sink:
        run.sink = sink
        run.offload = _offload(run, where.offload)
        compress_blocks(run)
        metadata = _finish(run)
    computed = tuple(getattr(run.sink, "computed", ()))
    reused = tuple(getattr(run.sink, "reused", ()))
    return Outcome(run.model, run.plan, dict(run.errors), computed, reused, metadata)


def plan_pipeline(
    source: Source,
    config: CompressConfig,
    *,
    calibration: Calibration | None = None,
    tokenizer: Any = None,
    where: Where = Where(),
    progress: Progress = no_progress,
    budgets: list[float] | None = None,
    given: Given | None = None,
) -> list[BudgetPlan]:
    """The plans of ``source`` at ``budgets`` (default: ``config.budget``) from one cost table:
    the pipeline's Fisher pass and cost rows alone (their scratch files in a temporary folder)."""
    given = given or Given()
    run = _run(source, config, None, (calibration, tokenizer), where, given, progress)
    run.sink = MemorySink()
    try:
        run.offload = _offload(run, where.offload)
        fisher_pass(run)
        tables = cost_rows(run, plan_choices(config))
        return plans_of_rows(run, tables, budgets or [config.budget])
    finally:
        run.sink.close()


def _run(source, config, plan, text, where: Where, given: Given, progress) -> Run:
    """The run's state, its device and dtype resolved, its targets listed."""
    calibration, tokenizer = text
    world = dist.world()
    device = resolve_device(where.device, world)
    run = Run(
        source, None, config, list(targets_of(source.model, config)), plan, None, tokenizer,
        device, resolve_dtype(where.dtype, device), world, progress, given=given,
    )  # fmt: skip
    run.fisher_folder = run.needs_fisher
    run.calibration = _needed(run, calibration)
    return run


def _needed(run: Run, calibration) -> Calibration | None:
    """The calibration a run uses: none when it collects no statistics."""
    planning = run.config.budgeted and run.plan is None
    statistics = needs_hessians(run) and run.given.hessians is None
    probes = wants_sensitivities(run)  # the KL of the model runs on the text
    collects = run.needs_fisher or run.needs_inputs or (planning and statistics) or probes
    if not collects:
        return None
    if calibration is None:
        config = run.config
        raise ValueError(
            f"weighting={config.weighting!r}, rounding={config.rounding!r} needs calibration "
            "tokens (calibration=) for the layers' statistics"
        )
    return calibration


@contextlib.contextmanager
def _sink(run: Run, out, resume: bool, overwrite: bool) -> Iterator[Any]:
    if out is None:
        if resume:
            raise ValueError(
                "resume=True (--resume) continues a run written to a directory: give out="
            )
        sink = MemorySink()
        try:
            yield sink
        finally:
            sink.close()
        return
    settings = settings_of(run)
    inputs = run.source.inputs
    with shard_writer(out, settings, resume, overwrite, inputs, run.world) as writer:
        yield DirectorySink(writer, len(run.blocks), run.source.resident)


def _offload(run: Run, offload: bool | None) -> Path | None:
    """The folder for X's disk files, or None (``lorq.pipeline.devices.activation_offload``)."""
    count = len(run.blocks) + 2 if run.needs_fisher else 2
    width = count * run.model.config.hidden_size if hasattr(run.model, "config") else 0
    return activation_offload(offload, run.sink.scratch, run.calibration, width)


def settings_of(run: Run) -> dict[str, Any]:
    """What a resumed run must share with the partial one (not the world size: it does not
    change a byte)."""
    settings = {
        "format_version": FORMAT_VERSION,
        "source": run.source.fingerprint(),
        "config": run.config.to_dict(),
        "plan": run.plan.to_dict() if run.plan else None,
        "calibration": run.calibration.record() if run.calibration else None,
        "device": run.device.type,
        "dtype": dtype_name(run.dtype),
    }
    return json.loads(json.dumps(settings, default=str))  # as the manifest holds them


def provenance(run: Run) -> dict[str, Any]:
    """What every artifact of the run records beside its layers (lorq.json)."""
    return {
        "source": run.source.record(),
        "compress": run.config.to_dict(),
        "plan": run.plan.to_dict() if run.plan else None,
        "calibration": run.calibration.record() if run.calibration else None,
        "evaluation": None,
        "pipeline": {"sequential": run.sequential, "dtype": dtype_name(run.dtype)},
        "recovery": {str(i): r for i, r in sorted(run.recovered.items())} or None,
    }


def _finish(run: Run) -> dict[str, Any]:
    """The provenance on the model (memory) or the directory's last files (rank 0 writes)."""
    meta = provenance(run)
    if isinstance(run.sink, MemorySink):
        freeze_all_but_lora(run.model)
        set_model_meta(run.model, meta)
        return meta
    tokenizer = run.tokenizer if run.world.is_writer else None
    meta = run.sink.finish(run.model, meta, tokenizer)
    dist.barrier(run.world)
    return meta
