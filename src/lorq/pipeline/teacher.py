"""The original model's next-token top-k for end-to-end recovery, computed block by block, so
that a teacher larger than memory is never whole in it (ALGORITHMS.md §9).

    X_0 = what block 0 receives for example e     (the outside parts resident all along)
    X_{b+1} = block_b(X_b)                         block b read once, run on every example, let go
    rows of e = TopK.of(top(X_N)[P_e], k)          the model's own final norm and head, at P_e

Examples of one length L share an (n_L × L × d) buffer, on the device or, when the states of all
of them would take more than a quarter of the free memory, in an unlinked file under ``scratch``
(lorq.calibrate.blocks.activation_buffer). A block's output overwrites its input row by row.
The same weights give the same rows as the whole model run on each example.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lorq.calibrate.blocks import BlockInputs, capture_inputs, forward_kwargs, run_block
from lorq.calibrate.fisher import blocks_bypassed
from lorq.nn import decoded_once
from lorq.pipeline.devices import spill_folder
from lorq.pipeline.sources import Source
from lorq.recovery.teacher import Text
from lorq.recovery.topk import TopK

Progress = Callable[[int], None] | None


def teacher_rows(
    source: Source,
    texts: Sequence[Text],
    k: int,
    device: torch.device,
    scratch: Path,
    progress: Progress = None,
) -> list[list[TopK]]:
    """Per text, per example, the teacher's top-k at the example's positions (module docstring);
    ``progress(1)`` after each block and after the top."""
    flat = [example for text in texts for example in text]
    groups = _by_length(flat)
    outside = source.outside_parts()
    source.load(outside, torch.float32, device)
    try:
        offload = _offload(flat, source, scratch)
        states = {
            length: capture_inputs(source.model, source.blocks.modules[0], tokens, device, offload)
            for length, (tokens, _) in groups.items()
        }
        for index in range(len(source.blocks)):
            _run(source, index, states, device)
            if progress is not None:
                progress(1)
        rows = _top(source, flat, groups, states, k)
    finally:
        source.release(outside)
    if progress is not None:
        progress(1)
    return _split(rows, texts)


def _by_length(flat: Sequence) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """Examples of one length as one (n × L) token tensor, with their places in ``flat``."""
    places: dict[int, list[int]] = defaultdict(list)
    for i, (ids, _) in enumerate(flat):
        places[len(ids)].append(i)
    return {
        length: (torch.tensor([list(flat[i][0]) for i in where]), where)
        for length, where in places.items()
    }


def _offload(flat: Sequence, source: Source, scratch: Path) -> Path | None:
    """``scratch`` when the examples' hidden states would not fit beside the blocks."""
    return spill_folder(sum(len(ids) for ids, _ in flat) * source.model.config.hidden_size, scratch)


def _run(source: Source, index: int, states: dict[int, BlockInputs], device) -> None:
    """Block ``index`` on every example, in place."""
    parts = source.block_part(index)
    source.load(parts, torch.float32, device)
    try:
        block = source.blocks.modules[index]
        for inputs in states.values():
            run_block(block, inputs, inputs.hidden)
    finally:
        source.release(parts)


def _top(source: Source, flat, groups, states: dict[int, BlockInputs], k: int) -> list[TopK]:
    """The top-k of the model's own top run on X_N of every example, in ``flat``'s order."""
    rows: list[TopK | None] = [None] * len(flat)
    extra = forward_kwargs(source.model)
    model = source.model
    with torch.no_grad(), blocks_bypassed(source.blocks.modules) as inject, decoded_once(model):
        for length, (tokens, where) in groups.items():
            hidden = states[length].hidden
            for j, i in enumerate(where):
                inject(hidden[j : j + 1])
                ids = tokens[j : j + 1].to(hidden.device)
                logits = model(input_ids=ids, **extra).logits[0]
                rows[i] = TopK.of(logits[list(flat[i][1])].cpu(), k)
    return rows  # type: ignore[return-value]


def _split(rows: list[TopK], texts: Sequence[Text]) -> list[list[TopK]]:
    out, start = [], 0
    for text in texts:
        out.append(rows[start : start + len(text)])
        start += len(text)
    return out
