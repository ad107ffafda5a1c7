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

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq._version import __version__
from lorq.budget import BudgetPlan
from lorq.calibrate.blocks import BlockInputs, capture_inputs, run_block
from lorq.compress import Calibration, _decompose_layers
from lorq.config import JOB_STATISTICS, CompressConfig, uses_fisher
from lorq.hessian import DEFAULT_MAX_BYTES, Hessians, collect, input_leaders, target_groups
from lorq.io.native import FORMAT, FORMAT_VERSION, LORQ_FILE, hf_config, write_config
from lorq.layers import targets_of
from lorq.models import is_causal, source_record
from lorq.pack import round_factors
from lorq.progress import Progress, no_progress
from lorq.stream import dist
from lorq.stream.checkpoint import INDEX_FILE
from lorq.stream.devices import activation_offload, resolve_device, resolve_dtype
from lorq.stream.fisher import FISHER_DIR, fisher_done, read_fisher, stream_fisher
from lorq.stream.shards import load_shard_into, shard_payload
from lorq.stream.skeleton import (
    Blocks,
    decoder_blocks,
    materialize,
    outside_blocks,
    release,
    release_parts,
    skeleton,
)
from lorq.stream.source import StreamSource, stream_source
from lorq.stream.writer import ShardWriter, shard_names, shard_writer, write_json
from lorq.surgery import freeze_all_but_lora, set_module, weight_shape


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


@dataclass(frozen=True)
class TokenBlocks:
    """Calibration given as token ids (n × L), instead of a text to cut."""

    tokens: torch.Tensor

    @property
    def blocks(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def record(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.tokens.cpu().numpy().tobytes()).hexdigest()
        return {"tokens": list(self.tokens.shape), "sha256": digest}


def _calibration_record(calibration) -> dict[str, Any] | None:
    if calibration is None:
        return None
    if isinstance(calibration, TokenBlocks):
        return calibration.record()
    return dataclasses.asdict(calibration)


def _tokens(calibration, folder: Path) -> torch.Tensor:
    if isinstance(calibration, TokenBlocks):
        return calibration.tokens
    return calibration.load(_tokenizer(folder))


@dataclass
class _Run:
    """The state of one streaming run (shared by its steps)."""

    source: StreamSource
    model: nn.Module
    blocks: Blocks
    config: CompressConfig
    plan: BudgetPlan | None
    device: torch.device
    dtype: torch.dtype
    sequential: bool
    world: dist.World
    progress: Progress
    targets: dict[str, nn.Module] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    advance: Any = None  # the decomposition's progress, one step per target of this rank
    statistics: Any = None  # a callback(block index, Hessians) for tests and tools


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
    if isinstance(calibration, torch.Tensor):
        calibration = TokenBlocks(calibration)
    elif isinstance(calibration, str):
        calibration = Calibration(calibration)
    world = dist.world()
    target_device = resolve_device(device, world)
    run_dtype = resolve_dtype(dtype, target_device)
    source = stream_source(model)
    _check_streamable(config, plan)
    built = skeleton(source.config, is_causal(source.config))
    blocks = decoder_blocks(built)
    run = _Run(
        source, built, blocks, config, plan, target_device, run_dtype, sequential, world, progress
    )
    run.statistics = on_statistics
    _check_targets(run)
    used = calibration if config.activations or uses_fisher(config.weighting) else None
    settings = _settings(run, used)
    with shard_writer(out, settings, resume, overwrite, source.inputs, world) as writer:
        names = shard_names(len(blocks) + 1)
        reused = tuple(n for n in names if n in writer.finished)
        offload = activation_offload(
            offload_activations, writer.out, used, source.config.hidden_size
        )
        _fisher(run, writer.out, used, offload)
        run.advance = progress("decomposing", -(-len(run.targets) // world.size))
        inputs = _outside(run, writer, names[0], used if config.activations else None, offload)
        for index in range(len(blocks)):
            inputs = _block(run, writer, index, names[index + 1], inputs)
        metadata = _finish(run, writer, names, used)
    return StreamResult(Path(out), config, run.errors, tuple(run.computed), reused, metadata)


def _fisher(run: _Run, out: Path, calibration, offload: Path | None) -> None:
    """The Fisher pass (rank 0, before any block is compressed), unless a killed run finished it
    (``lorq.stream.fisher``)."""
    if not uses_fisher(run.config.weighting):
        return
    if run.world.is_writer and not fisher_done(out, len(run.blocks)):
        tokens = _tokens(calibration, run.source.folder)
        stream_fisher(
            run.model, run.blocks, run.source.checkpoint, run.targets, tokens, run.device, out,
            offload,
        )  # fmt: skip
    dist.barrier(run.world)


def _check_streamable(config: CompressConfig, plan: BudgetPlan | None) -> None:
    """What the streaming job does not do (yet), refused before any work."""
    if config.method == "qa-lora":
        raise ValueError("method='qa-lora' is not streamed; compress without stream (--stream)")
    if config.budgeted and plan is None:
        raise ValueError(
            "a budget streams with a plan made beforehand (lorq plan … --out plan.json, then "
            "plan= / --plan plan.json)"
        )
    if config.embeddings is not None:
        raise ValueError("embeddings= (packed embeddings) is not streamed; leave it unset")


def _check_targets(run: _Run) -> None:
    """The config's targets, all inside the transformer blocks (what is streamed)."""
    from lorq.preflight import check_plan

    targets = targets_of(run.model, run.config)
    outside = [name for name in targets if run.blocks.index_of(name) is None]
    if outside:
        raise ValueError(
            f"target {outside[0]!r} lies outside the transformer blocks ({run.blocks.prefix}); "
            "streaming compresses the blocks' layers: exclude it (exclude=)"
        )
    if run.plan is not None:
        check_plan(run.plan, run.config, {name: weight_shape(m) for name, m in targets.items()})
    run.targets = targets


def _settings(run: _Run, calibration: Calibration | None) -> dict[str, Any]:
    """What a resumed run must share with the partial one (not the world size: it does not
    change a byte)."""
    from lorq.stream.devices import dtype_name

    settings = {
        "format_version": FORMAT_VERSION,
        "source": run.source.fingerprint(),
        "config": run.config.to_dict(),
        "plan": run.plan.to_dict() if run.plan else None,
        "calibration": _calibration_record(calibration),
        "sequential": run.sequential if calibration else None,
        "device": run.device.type,
        "dtype": dtype_name(run.dtype),
    }
    return json.loads(json.dumps(settings, default=str))  # as the manifest holds them


def _outside(
    run: _Run, writer: ShardWriter, shard: str, calibration, offload
) -> BlockInputs | None:
    """Shard 1 (the tensors outside the blocks, as stored) and the calibration inputs of block
    1; the embeddings are released again before the first block loads."""
    parts = outside_blocks(run.model, run.blocks)
    if shard in writer.finished and calibration is None:
        return None
    materialize(run.model, parts, run.source.checkpoint, torch.float32, run.device)
    if shard not in writer.finished:
        writer.write(shard, *shard_payload(run.model, parts))
        run.computed.append(shard)
    inputs = None
    if calibration is not None:
        for _, module, _ in parts:
            module.to(run.dtype)
        tokens = _tokens(calibration, run.source.folder)
        inputs = capture_inputs(run.model, run.blocks.modules[0], tokens, run.device, offload)
    release_parts(parts)
    return inputs


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{folder} has no usable tokenizer for the calibration text "
            f"({str(err).splitlines()[0]})"
        ) from None


def _block(run: _Run, writer: ShardWriter, index: int, shard: str, inputs: BlockInputs | None):
    """Block ``index``: compressed into ``shard`` (or read back from it when finished, if its
    output is needed); returns the next block's calibration inputs."""
    block = run.blocks.modules[index]
    parts = [(run.blocks.name(index), block, True)]
    if shard in writer.finished:
        if inputs is not None:
            load_shard_into(run.model, writer.out / shard, writer.shards[shard], run.device)
            inputs = _forward(run, block, inputs)
        release(block)
        return inputs
    targets = {n: m for n, m in run.targets.items() if run.blocks.index_of(n) == index}
    materialize(run.model, parts, run.source.checkpoint, run.dtype, run.device)
    hessians, original = _statistics(run, block, targets, inputs)
    if run.statistics is not None and hessians is not None:
        run.statistics(index, hessians)
    fisher = read_fisher(writer.out, index) if uses_fisher(run.config.weighting) else None
    _compress_block(run, targets, (fisher, hessians))
    _finalize(run, block)
    if inputs is not None:
        inputs = (
            _forward(run, block, inputs) if run.sequential else replace(inputs, hidden=original)
        )
    tensors, record = shard_payload(run.model, parts)
    writer.write(shard, tensors, {**record, "errors": {n: run.errors[n] for n in targets}})
    run.computed.append(shard)
    release(block)
    return inputs


def _statistics(run: _Run, block: nn.Module, targets, inputs: BlockInputs | None):
    """(H of the block's targets on X, the original block's output X_b) — (None, None) when
    the config needs no statistics."""
    if inputs is None or not run.config.activations:
        return None, None
    first = inputs.row(0)
    leaders = input_leaders(targets, lambda: run_block(block, first))
    original = None if run.sequential else torch.empty_like(inputs.hidden)
    packed: dict[str, tuple[int, torch.Tensor]] = {}
    for group in target_groups(targets, DEFAULT_MAX_BYTES, leaders):
        packed.update(collect(group, leaders, lambda: run_block(block, inputs, original)))
    return Hessians(packed, {name: leaders.get(name, name) for name in targets}), original


def _compress_block(run: _Run, targets: dict[str, nn.Module], statistics) -> None:
    """Decompose the targets this rank owns, then give every rank every layer."""
    names = list(targets)
    mine = {n: targets[n] for i, n in enumerate(names) if run.world.owns(i)}
    progress = lambda label, total: run.advance  # noqa: E731  one bar for the whole run
    errors = _decompose_layers(run.model, run.config, mine, run.plan, statistics, progress)
    run.errors.update(errors)
    if run.world.size == 1:
        return
    for i, name in enumerate(names):
        owner = i % run.world.size
        layer = run.model.get_submodule(name).cpu() if run.world.owns(i) else None
        layer, error = dist.broadcast((layer, run.errors.get(name)), owner, run.world)
        set_module(run.model, name, layer.to(run.device))
        run.errors[name] = error


def _finalize(run: _Run, block: nn.Module) -> None:
    """What ``lorq.compress`` does to the whole model at the end, done to one block: factors on
    their 8-bit grid (factor_bits=8), all but the factors frozen."""
    if run.config.factor_bits == 8:
        round_factors(block)
    freeze_all_but_lora(block)


def _forward(run: _Run, block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """X_b = block(X_{b−1}): each rank runs its sequences; all gather them."""
    out = torch.empty_like(inputs.hidden)
    mine = [i for i in range(len(inputs)) if run.world.owns(i)]
    rows = {}
    for i in mine:
        rows[i] = run_block(block, inputs.row(i))[0]
    for i, row in dist.gather_rows(rows, run.world).items():
        out[i] = row.to(out.device)
    return replace(inputs, hidden=out)


def _lorq_meta(run: _Run, shards: dict[str, dict], calibration) -> dict[str, Any]:
    """lorq.json of the finished directory: what ``lorq.io.native.payload`` records, gathered
    from the shards' records, with the job's provenance."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorq_version": __version__,
        "model_class": type(run.model).__name__,
        "hf_config": hf_config(run.model),
    }
    for key in ("layers", "aliases", "restore_dtypes", "tensors"):
        meta[key] = {k: v for record in shards.values() for k, v in record[key].items()}
    for key in ("int8_factors", "trainable"):
        meta[key] = sorted(v for record in shards.values() for v in record[key])
    meta.update(
        source=source_record(run.source.source),
        compress=run.config.to_dict(),
        plan=run.plan.to_dict() if run.plan else None,
        calibration=_calibration_record(calibration),
        evaluation=None,
        stream={"sequential": run.sequential if calibration else None, "shards": len(shards)},
    )
    return meta


def _index(shards: dict[str, dict]) -> dict[str, Any]:
    """transformers' model.safetensors.index.json of the shards."""
    from lorq.stream.checkpoint import ITEM_BYTES

    weight_map, total = {}, 0
    for shard, record in shards.items():
        for name, (dtype, shape) in record["tensors"].items():
            weight_map[name] = shard
            count = 1
            for n in shape:
                count *= n
            total += count * ITEM_BYTES.get(dtype, 4)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _finish(run: _Run, writer: ShardWriter, names: list[str], calibration) -> dict[str, Any]:
    """The index, config.json, tokenizer and, last, lorq.json (rank 0; the others wait)."""
    shards = {name: writer.shards[name] for name in names} if run.world.is_writer else {}
    meta = _lorq_meta(run, shards, calibration) if run.world.is_writer else {}
    if run.world.is_writer:
        out = writer.out
        write_json(out / INDEX_FILE, _index(shards))
        tmp = out / ".config.json.tmp"
        if write_config(run.model, tmp, meta):
            tmp.replace(out / "config.json")
        if any(run.source.folder.glob("tokenizer*")):
            _tokenizer(run.source.folder).save_pretrained(out)
        for scratch in (FISHER_DIR, ".activations"):
            shutil.rmtree(out / scratch, ignore_errors=True)
        write_json(out / LORQ_FILE, meta)  # last: the directory is finished
    dist.barrier(run.world)
    return meta
