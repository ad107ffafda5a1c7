"""One block of a streaming run: load, statistics, decompose (shared out over the processes),
the next block's inputs, its shard, release."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from lorq.calibrate.blocks import BlockInputs, block_hessians, run_block
from lorq.compress import _decompose_layers
from lorq.compress_stream.state import Run
from lorq.config import uses_fisher
from lorq.pack import round_factors
from lorq.runtime import release_free_memory
from lorq.stream import dist
from lorq.stream.fisher import read_fisher
from lorq.stream.shards import load_shard_into, shard_payload
from lorq.stream.skeleton import (
    materialize,
    release,
)
from lorq.stream.writer import ShardWriter
from lorq.surgery import freeze_all_but_lora, set_module


def block_step(run: Run, writer: ShardWriter, index: int, shard: str, inputs: BlockInputs | None):
    """Block ``index``: compressed into ``shard`` (or read back from it when finished, if its
    output is needed); returns the next block's calibration inputs."""
    block = run.blocks.modules[index]
    parts = [(run.blocks.name(index), block, True)]
    targets = {n: m for n, m in run.targets.items() if run.blocks.index_of(n) == index}
    if shard in writer.finished:
        if inputs is not None:
            load_shard_into(run.model, writer.out / shard, writer.shards[shard], run.device)
            inputs = _forward(run, block, inputs)
        _drop(run, block, targets)
        return inputs
    # without a forward the matrices stay as stored (bf16: half the memory); each is decomposed
    # from its own fp32 copy either way
    dtype = run.dtype if inputs is not None else None
    materialize(run.model, parts, run.source.checkpoint, dtype, run.device)
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
    _drop(run, block, targets)
    return inputs


def _drop(run: Run, block: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Free the block: its original (meta) layers back in place of the compressed ones, which
    go with their codes, and every weight back on the meta device."""
    for name, module in targets.items():
        set_module(run.model, name, module)
    release(block)
    release_free_memory()  # the block's temporaries fragment the heap


def _statistics(run: Run, block: nn.Module, targets, inputs: BlockInputs | None):
    """(H of the block's targets on X, the original block's output X_b) — (None, None) when
    the config needs no statistics."""
    if inputs is None or not run.config.activations:
        return None, None
    return block_hessians(block, targets, inputs, keep_output=not run.sequential)


def _compress_block(run: Run, targets: dict[str, nn.Module], statistics) -> None:
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


def _finalize(run: Run, block: nn.Module) -> None:
    """What ``lorq.compress`` does to the whole model at the end, done to one block: factors on
    their 8-bit grid (factor_bits=8), all but the factors frozen."""
    if run.config.factor_bits == 8:
        round_factors(block)
    freeze_all_but_lora(block)


def _forward(run: Run, block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """X_b = block(X_{b−1}): each rank runs its sequences; all gather them."""
    out = inputs.empty()
    mine = [i for i in range(len(inputs)) if run.world.owns(i)]
    rows = {}
    for i in mine:
        rows[i] = run_block(block, inputs.row(i))[0]
    for i, row in dist.gather_rows(rows, run.world).items():
        out[i] = row.to(out.device)
    return replace(inputs, hidden=out)
