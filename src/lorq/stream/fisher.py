"""The Fisher of a streamed model, block by block, kept on disk until its block is compressed.

    OUT/.fisher/block-0000b.safetensors    {target: F (out × in) fp32} of block b

written by :func:`lorq.calibrate.fisher.blockwise_fisher` on the original weights (fp32) before
the first block is compressed; a resumed run that finds every block's file skips the pass. The
folder goes when the directory is finished.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorq.calibrate.blocks import capture_inputs
from lorq.calibrate.fisher import blockwise_fisher
from lorq.stream.checkpoint import Checkpoint
from lorq.stream.skeleton import Blocks, materialize, outside_blocks, release, release_parts

FISHER_DIR = ".fisher"


def fisher_file(out: Path, block: int) -> Path:
    return out / FISHER_DIR / f"block-{block:05d}.safetensors"


def fisher_done(out: Path, count: int) -> bool:
    """Whether every block's Fisher is on disk (a run killed in the pass wrote only some)."""
    return all(fisher_file(out, b).is_file() for b in range(count))


def read_fisher(out: Path, block: int) -> dict[str, torch.Tensor]:
    return load_file(fisher_file(out, block))


def stream_fisher(
    model: nn.Module,
    blocks: Blocks,
    checkpoint: Checkpoint,
    targets: dict[str, nn.Module],
    tokens: torch.Tensor,
    device: torch.device,
    out: Path,
    offload: Path | None = None,
) -> None:
    """Every block's F of ``targets`` into OUT/.fisher (module docstring). The embeddings, norm
    and head stay resident during the pass (the loss at the top needs them)."""
    parts = outside_blocks(model, blocks)
    (out / FISHER_DIR).mkdir(exist_ok=True)

    def load(b: int) -> None:
        part = [(blocks.name(b), blocks.modules[b], True)]
        materialize(model, part, checkpoint, torch.float32, device)

    def store(b: int, fisher: dict[str, torch.Tensor]) -> None:
        tmp = out / FISHER_DIR / f".block-{b:05d}.tmp"
        save_file({name: f.contiguous() for name, f in fisher.items()}, tmp)
        os.replace(tmp, fisher_file(out, b))

    def of_block(b: int) -> dict[str, nn.Module]:
        return {n: m for n, m in targets.items() if blocks.index_of(n) == b}

    materialize(model, parts, checkpoint, torch.float32, device)
    try:
        inputs = capture_inputs(model, blocks.modules[0], tokens, device, offload)
        steps = (load, lambda b: release(blocks.modules[b]), lambda: None)
        blockwise_fisher(model, blocks.modules, of_block, inputs, tokens, steps, store)
    finally:
        release_parts(parts)
