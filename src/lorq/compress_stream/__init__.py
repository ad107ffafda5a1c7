"""The compress job for models larger than memory: one transformer block at a time
(ALGORITHMS.md §6).

    checkpoint (safetensors shards) ─▶ meta skeleton ─▶ shard 1: embeddings, norm, head as they are
    X_0 = embed(calibration tokens)                                 (when the config needs H)
    for each block b:  load b ─▶ H of its targets on X_{b−1} ─▶ decompose its targets
                       ─▶ X_b = block_b^compressed(X_{b−1}) ─▶ shard b + 1 ─▶ release b
    index, config.json, tokenizer ─▶ lorq.json (last)

Only one block's weights, the activations X (n × L × d) and one matrix's decomposition are
resident. The directory is what ``lorq.save`` writes for the same model and settings (the same
bytes for every tensor when no statistics are used, or with ``sequential=False``), sharded, with
a manifest that makes the run resumable (``lorq.stream.writer``). Launched by ``torchrun``, the
targets of each block are shared out over the processes (``lorq.stream.dist``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorq.budget import BudgetPlan
from lorq.compress import Calibration
from lorq.compress_stream.blocks import block_step
from lorq.compress_stream.passes import fisher_pass, outside_shard, plan_pass
from lorq.compress_stream.state import (
    Run,
    TokenBlocks,
    calibration_record,
    prepare,
    settings_of,
    tokenizer_of,
)
from lorq.config import JOB_STATISTICS, CompressConfig
from lorq.io.native import LORQ_FILE, write_config
from lorq.models import source_record
from lorq.progress import Progress, no_progress
from lorq.stream import dist
from lorq.stream.checkpoint import INDEX_FILE
from lorq.stream.devices import activation_offload
from lorq.stream.finish import directory_meta, shard_index
from lorq.stream.fisher import FISHER_DIR
from lorq.stream.planning import COSTS_DIR
from lorq.stream.writer import ShardWriter, shard_names, shard_writer, write_json

__all__ = [
    "StreamResult",
    "TokenBlocks",
    "compress_streaming",
    "plan_streaming",
    "stream_reason",
]


@dataclass(frozen=True)
class StreamResult:
    """What :func:`compress_streaming` wrote: ``path``, the config, each target's relative error
    (those computed by this run), and which shards this run computed or found finished."""

    path: Path
    config: CompressConfig
    errors: dict[str, float] = field(default_factory=dict)
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


def compress_streaming(
    model: str,
    out: str | Path,
    config: CompressConfig | None = None,
    *,
    calibration: Calibration | str | torch.Tensor = "builtin",
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    resume: bool = False,
    overwrite: bool = False,
    offload_activations: bool | None = None,
    plan: BudgetPlan | None = None,
    sequential: bool = True,
    progress: Progress = no_progress,
    on_statistics: Any = None,
) -> StreamResult:
    """Compress the safetensors checkpoint ``model`` (a folder or hub id) into the lorq directory
    ``out``, one block at a time; see the module docstring.

    ``device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``: where each
    block runs and each matrix is decomposed (in fp32). ``dtype``: of the loaded original
    (default bf16 on a GPU, fp32 on a CPU). ``resume``: finish a partial run of the same model
    and settings in ``out`` (finished shards that verify are kept, nothing else). ``sequential``:
    each block's statistics come from the compressed earlier blocks (§6; False: from the
    original ones, as :func:`lorq.compress_model` estimates them). ``offload_activations``: keep
    X in a file on disk (None: when it would take more than a quarter of the free memory).
    ``on_statistics(block, hessians)``: called with each block's H before it is compressed.
    """
    config = config or CompressConfig(**JOB_STATISTICS)
    where = (device, dtype, sequential, progress)
    run, used = prepare(model, config, calibration, plan, where)
    run.statistics = on_statistics
    settings = settings_of(run, used)
    source, world, blocks = run.source, run.world, run.blocks
    with shard_writer(out, settings, resume, overwrite, source.inputs, world) as writer:
        names = shard_names(len(blocks) + 1)
        reused = tuple(n for n in names if n in writer.finished)
        offload = activation_offload(offload_activations, writer.out, used, _buffers(run))
        fisher_pass(run, writer.out, used, offload)
        plan_pass(run, writer.out, used, offload)
        run.advance = progress("decomposing", -(-len(run.targets) // world.size))
        inputs = outside_shard(run, writer, names[0], used if config.activations else None, offload)
        for index in range(len(blocks)):
            inputs = block_step(run, writer, index, names[index + 1], inputs)
        metadata = _finish(run, writer, names, used)
    return StreamResult(Path(out), config, run.errors, tuple(run.computed), reused, metadata)


def plan_streaming(
    model: str,
    config: CompressConfig,
    *,
    calibration: Calibration | str | torch.Tensor = "builtin",
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    offload_activations: bool | None = None,
    progress: Progress = no_progress,
) -> BudgetPlan:
    """The ``lorq plan --stream`` job: ``config.budget``'s plan of the checkpoint ``model``, its
    cost table built one block at a time (the same plan as :func:`lorq.plan_model`)."""
    if config.budget is None:
        raise ValueError("plan_streaming needs config.budget (bits/param)")
    run, used = prepare(model, config, calibration, None, (device, dtype, False, progress))
    with tempfile.TemporaryDirectory(prefix="lorq-plan-") as work:
        scratch = Path(work)
        offload = activation_offload(offload_activations, scratch, used, _buffers(run))
        fisher_pass(run, scratch, used, offload)
        plan_pass(run, scratch, used, offload)
    assert run.plan is not None
    return run.plan


def _buffers(run: Run) -> int:
    """Values of X held at once (n·L·d each): the Fisher pass keeps every block's input."""
    count = len(run.blocks) + 2 if run.config.fisher else 2
    return count * run.source.config.hidden_size


def _finish(run: Run, writer: ShardWriter, names: list[str], calibration) -> dict[str, Any]:
    """The index, config.json, tokenizer and, last, lorq.json (rank 0; the others wait)."""
    shards = {name: writer.shards[name] for name in names} if run.world.is_writer else {}
    provenance = dict(
        source=source_record(run.source.source),
        compress=run.config.to_dict(),
        plan=run.plan.to_dict() if run.plan else None,
        calibration=calibration_record(calibration),
        evaluation=None,
        stream={"sequential": run.sequential if calibration else None, "shards": len(shards)},
    )
    meta = directory_meta(run.model, shards, provenance) if run.world.is_writer else {}
    if run.world.is_writer:
        out = writer.out
        write_json(out / INDEX_FILE, shard_index(shards))
        tmp = out / ".config.json.tmp"
        if write_config(run.model, tmp, meta):
            tmp.replace(out / "config.json")
        if any(run.source.folder.glob("tokenizer*")):
            tokenizer_of(run.source.folder).save_pretrained(out)
        for scratch in (FISHER_DIR, COSTS_DIR, ".activations"):
            shutil.rmtree(out / scratch, ignore_errors=True)
        write_json(out / LORQ_FILE, meta)  # last: the directory is finished
    dist.barrier(run.world)
    return meta


ASKED = "asked"


def stream_reason(
    model: str, config: CompressConfig, device: str = "auto", asked: bool = False
) -> str | None:
    """Why ``lorq compress`` streams ``model``: ``ASKED`` (``asked``), or unasked because the GPU
    is to be used (it works one block at a time) or the checkpoint's weights in fp32 would take
    more than half of the free memory. None when loading it whole is fine or it cannot stream (a
    GGUF file, a hub id not on this machine, qa-lora, packed embeddings, a budget in MiB)."""
    if asked:
        return ASKED
    from lorq.models import resolve
    from lorq.stream.checkpoint import Checkpoint
    from lorq.stream.devices import available_memory, resolve_device

    gpu = resolve_device(device).type == "cuda"
    source = resolve(model)
    folder = Path(source.path)
    unstreamable = config.method == "qa-lora" or config.budget_mb or config.embeddings
    if source.gguf_file or not folder.is_dir() or unstreamable:
        if gpu and str(device).startswith("cuda"):
            raise ValueError(
                f"device={device!r} compresses safetensors checkpoints one block at a time; "
                f"{model!r} cannot stream (a GGUF file, a hub id not on this machine, qa-lora, "
                "packed embeddings or a budget in MiB): pass device='cpu'"
            )
        return None
    try:
        checkpoint = Checkpoint(folder)
    except (OSError, ValueError):
        return None
    if gpu:
        return "the GPU compresses one block at a time"
    need, free = 4 * checkpoint.numel, available_memory()
    if need > free // 2:
        return (
            f"its weights take {need / 1e9:.1f} GB in fp32, more than half of the "
            f"{free / 1e9:.1f} GB free"
        )
    return None
