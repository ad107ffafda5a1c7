"""The compress job's one loop: every model, device and process count runs it (ALGORITHMS.md §6).

    F     = fisher_pass()                     block-wise, before anything is compressed (if needed)
    plan  = plan_pass()                       cost rows block by block on the original, one ILP
    X     = embed(calibration tokens)         block 1's inputs (if statistics are needed)
    for each block b:
        load b                                from the source (resident, safetensors, GGUF)
        H_b   = block_hessians(b, X)          its targets' input statistics
        layer = method.compress(W, H, F, plan[W])   each target; shared out over the processes
        X     = block_b^compressed(X)   (sequential)   or block_b(X), the original's output
        sink.write(b); release b              (streamed: only one block is ever resident)
    outside: the targets outside the blocks (an LM head, on X_N), packed embeddings; sink.write

A block whose shard a killed run finished is not recomputed: its layers (sequential) or the
original (not) move X on. What is computed depends on the weights and settings only, so every
source, sink and process count gives the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, run_block
from lorq.calibrate.hessian import block_hessians
from lorq.methods import Target, method_of
from lorq.model.packing import pack_embeddings, round_factors
from lorq.model.targets import freeze_all_but_lora, set_module, weight_shape
from lorq.nn import decoded_once
from lorq.pipeline.passes import FisherStore, fisher_pass, plan_pass, top_hessians
from lorq.pipeline.run import Run
from lorq.quant import as_config
from lorq.recovery.block import RECOVERY_BATCH, recover_block
from lorq.util import dist
from lorq.util.runtime import release_free_memory


def compress_blocks(run: Run) -> None:
    """Compress every target of ``run`` into its sink (module docstring)."""
    fisher_pass(run)
    plan_pass(run)
    inputs = run.capture() if run.needs_inputs else None
    if inputs is not None and run.recovers and run.sequential:
        run.reference = inputs.empty().copy_(inputs.hidden)  # the original model's stream
    run.advance = run.progress("decomposing", -(-len(run.targets) // run.world.size))
    for index in range(len(run.blocks)):
        inputs = block_step(run, index, inputs)
    outside_step(run, inputs)


def block_step(run: Run, index: int, inputs: BlockInputs | None) -> BlockInputs | None:
    """Block ``index`` compressed into the sink (or, finished by a killed run, moved past);
    returns the next block's calibration inputs."""
    if run.sink.finished(index):
        return _past_finished(run, index, inputs)
    part = run.source.block_part(index)
    run.load(part, forward=inputs is not None)
    block = run.blocks.modules[index]
    targets = run.block_targets(index)
    hessians, original = _statistics(run, index, block, targets, inputs)
    target = _original_output(run, block, inputs, original)
    compress_targets(run, targets, hessians, FisherStore.of(run).read(index))
    extra = {"errors": {n: run.errors[n] for n in targets}}
    if target is not None:
        extra["recovery"] = _recover(run, index, block, inputs, target)
    _finalize(run, block, list(targets))
    if inputs is not None:
        hidden = _forward(run, block, inputs) if run.sequential else original
        inputs = replace(inputs, hidden=hidden)
        run.reference = target if run.reference is not None else None
    run.sink.write(index, run.model, part, extra)
    _drop(run, part, targets)
    return inputs


def _statistics(run: Run, index: int, block, targets, inputs: BlockInputs | None):
    """(H of the block's targets, the original block's output) — (None, None) without inputs;
    given statistics are used as they are (the inputs then flow for the recovery only)."""
    keep = not run.sequential
    given = run.given.hessians
    if given is not None or not run.needs_hessians:
        hessians = {n: given[n] for n in targets if n in given} if given is not None else None
        return hessians, (_forward(run, block, inputs) if inputs is not None and keep else None)
    if inputs is None:
        return None, None
    hessians, output = block_hessians(block, targets, inputs, keep, run.world)
    if run.on_statistics is not None:
        run.on_statistics(index, hessians)
    return hessians, output


def _original_output(run: Run, block, inputs: BlockInputs | None, original):
    """f_b(X) of the original block on the original model's inputs, the target of block-wise
    recovery (None without recovery): the statistics' output when the stream is the original's,
    else one more forward of the original block on the original stream."""
    if not run.recovers or inputs is None:
        return None
    if run.reference is None:
        return original
    return _forward(run, block, replace(inputs, hidden=run.reference))


def _recover(run: Run, index: int, block, inputs: BlockInputs, target) -> dict:
    """Block-wise recovery of the compressed block (``lorq.recovery.block``), its losses."""
    config = run.config
    schedule = (config.recover_steps, config.recover_lr, RECOVERY_BATCH)
    scales = config.recover_scale_lr / config.recover_lr if config.recover_scales else None
    with decoded_once(block):
        done = recover_block(block, inputs, target, *schedule, scales)
    run.recovered[index] = record = {"block": index, **asdict(done)}
    return record


def compress_targets(run: Run, targets: dict[str, nn.Module], hessians, fisher) -> None:
    """Each target of this process (the i-th of the block when i mod W = rank) → its method's
    layer, in place; then every process gets every layer from its owner."""
    names = list(targets)
    owners = run.world.deal([_numel(targets[n]) for n in names])
    for i, name in enumerate(names):
        if owners[i] != run.world.rank:
            continue
        target = Target(
            name, targets[name], run.quant_of(name),
            hessians.pop(name, None) if hessians is not None else None,
            fisher.pop(name, None) if fisher is not None else None,
            (run.given.base or {}).get(name),
        )  # fmt: skip
        rank, _ = run.adapter_of(name)
        config = run.config if rank in (0, run.config.rank) else replace(run.config, rank=rank)
        done = method_of(config.method, rank).compress(target, config)
        set_module(run.model, name, done.layer)
        run.errors[name] = done.error
        run.advance(1)
    if run.world.size > 1:
        _share(run, names, owners)


def _numel(module: nn.Module) -> int:
    out, inp = weight_shape(module)
    return out * inp


def _share(run: Run, names: list[str], owners: list[int]) -> None:
    """Every layer (and its error) on every process, from the process that made it."""
    for name, owner in zip(names, owners, strict=True):
        layer = run.model.get_submodule(name).cpu() if owner == run.world.rank else None
        layer, error = dist.broadcast((layer, run.errors.get(name)), owner, run.world)
        set_module(run.model, name, layer.to(run.device))
        run.errors[name] = error


def _finalize(run: Run, block: nn.Module, names: list[str]) -> None:
    """The factors of targets ``names`` stored in 8 bits on their grid; all but the factors of
    ``block`` frozen."""
    for name in names:
        if run.adapter_of(name)[1] == 8:
            round_factors(run.model.get_submodule(name))
    freeze_all_but_lora(block)


def _forward(run: Run, block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """X_b = block(X_{b−1}): each process runs its sequences; all gather them."""
    out = inputs.empty()
    with decoded_once(block):
        mine = [i for i in range(len(inputs)) if run.world.owns(i)]
        rows = {i: run_block(block, inputs.row(i))[0] for i in mine}
    for i, row in dist.gather_rows(rows, run.world).items():
        out[i] = row.to(out.device)
    return out


def _drop(run: Run, parts, targets: dict[str, nn.Module]) -> None:
    """A streamed source gives the part back: its original (meta) modules in place of the
    compressed ones, every weight on the meta device. A resident model keeps its layers."""
    if not run.sink.keeps_layers or not run.source.resident:
        for name, module in targets.items():
            set_module(run.model, name, module)
    run.source.release(parts)
    release_free_memory()  # a block's temporaries fragment the heap


def _past_finished(run: Run, index: int, inputs: BlockInputs | None) -> BlockInputs | None:
    """A block a killed run finished: its output from its saved layers (sequential) or from the
    original block (not); nothing when no statistics flow."""
    if inputs is None:
        return None
    part = run.source.block_part(index)
    block = run.blocks.modules[index]
    targets = run.block_targets(index)
    if run.reference is not None:  # the original stream moves through the original block
        run.load(part, forward=True)
        run.reference = _forward(run, block, replace(inputs, hidden=run.reference))
        _drop(run, part, {})
    if run.sequential:
        run.sink.load_finished(run.model, index, run.device)
    else:
        run.load(part, forward=True)
    inputs = replace(inputs, hidden=_forward(run, block, inputs))
    _drop(run, part, targets if not run.sequential else {})
    return inputs


def outside_step(run: Run, inputs: BlockInputs | None) -> None:
    """The tensors outside the blocks: the targets there (an LM head, on X_N), the embeddings
    packed when asked or planned; then written."""
    if run.sink.finished(None):
        return
    parts = run.source.outside_parts()
    forward = any(run.blocks.index_of(n) is None for n in run.targets) and inputs is not None
    run.load(parts, forward=forward)
    targets = run.block_targets(None)
    hessians = top_hessians(run, targets, inputs) if forward else None
    if run.given.hessians is not None:
        hessians = {n: run.given.hessians[n] for n in targets if n in run.given.hessians}
    compress_targets(run, targets, hessians, FisherStore.of(run).read(None))
    if run.config.embeddings is not None:
        pack_embeddings(run.model, as_config(run.config.embeddings))
    elif run.plan is not None and (planned := run.plan.embedding_entry) is not None:
        pack_embeddings(run.model, planned.config, head=False)  # an untied head: as it is
    parts = run.source.outside_parts()
    for name, module, _ in parts:
        _finalize_own(module, run.adapter_of(name)[1] if name in targets else None)
    run.sink.write(None, run.model, parts, {"errors": {n: run.errors[n] for n in targets}})
    _drop(run, parts, targets)


def _finalize_own(module: nn.Module, factor_bits: int | None) -> None:
    """:func:`_finalize` of one outside module's own parameters (a compressed head's factors)."""
    if factor_bits == 8 and getattr(module, "has_lora", False):
        round_factors(module)
    for leaf, param in module._parameters.items():
        if param is not None:
            param.requires_grad_(leaf in ("lora_A", "lora_B"))
