"""The calibration activations of a decoder, one block at a time (ALGORITHMS.md §6).

    X_0 = embed(tokens)                      captured at block 1's input, with its keyword inputs
    X_b = block_b(X_{b−1}, **kwargs)         (attention mask, rotary cos/sin, positions)

X holds n sequences × L tokens × d features, one entry per calibration sequence (the forwards run
with batch size 1, as the whole-model statistics do, so each sequence's numbers do not depend on
how many others there are). It lives on the device, in RAM, or in a disk-backed file
(``torch.from_file``) when it would not fit (``offload``).
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.nn import decoded_once


class _Captured(Exception):
    """Raised by the hook at block 1 once its inputs are kept: the rest of the model never runs."""


@dataclass
class BlockInputs:
    """X (n × L × d) and the other inputs every block gets (positional after X, keyword), per
    calibration sequence."""

    hidden: torch.Tensor
    kwargs: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)
    offload: Path | None = None  # where X's buffers are files (None: on the device)

    def row(self, i: int) -> BlockInputs:
        """Sequence ``i`` alone."""
        return BlockInputs(self.hidden[i : i + 1], self.kwargs[i : i + 1])

    def empty(self) -> torch.Tensor:
        """A new buffer like X, where X's buffers live (the device, or a disk file)."""
        return activation_buffer(
            tuple(self.hidden.shape), self.hidden.dtype, self.hidden.device, self.offload
        )

    def __len__(self) -> int:
        return self.hidden.shape[0]


def activation_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, offload: Path | None
) -> torch.Tensor:
    """An uninitialised (n × L × d) buffer: on ``device``, or a file under ``offload`` that the
    OS pages in and out (the file is unlinked at once: nothing is left behind)."""
    if offload is None:
        return torch.empty(shape, dtype=dtype, device=device)
    offload.mkdir(parents=True, exist_ok=True)
    count = 1
    for n in shape:
        count *= n
    with tempfile.NamedTemporaryFile(dir=offload, prefix="activations-") as f:
        buffer = torch.from_file(f.name, shared=True, size=count, dtype=dtype)
    return buffer.view(shape)


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the model's forward takes it (no KV cache is built)."""
    return (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )


def capture_inputs(
    model: nn.Module,
    first_block: nn.Module,
    token_blocks: torch.Tensor,
    device: torch.device,
    offload: Path | None = None,
) -> BlockInputs:
    """Run the model on each calibration sequence (n × L token ids) up to ``first_block`` and
    keep what it receives; only the modules before it need real weights."""
    seen: list[tuple[torch.Tensor, tuple[tuple, dict[str, Any]]]] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, (tuple(args[1:]), kwargs)))
        raise _Captured

    handle = first_block.register_forward_pre_hook(keep, with_kwargs=True)
    extra = forward_kwargs(model)
    inputs = None
    try:
        with torch.no_grad():
            for i, row in enumerate(token_blocks):
                with contextlib.suppress(_Captured):
                    model(input_ids=row[None].to(device), **extra)
                hidden, kwargs = seen.pop()
                if inputs is None:
                    shape = (len(token_blocks), *hidden.shape[1:])
                    buffer = activation_buffer(shape, hidden.dtype, device, offload)
                    inputs = BlockInputs(buffer, offload=offload)
                inputs.hidden[i] = hidden[0]
                inputs.kwargs.append(kwargs)
    finally:
        handle.remove()
    assert inputs is not None
    return inputs


def first_output(output: Any) -> torch.Tensor:
    """A block's hidden states: its output, or the first element of the tuple it returns."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(
    block: nn.Module, inputs: BlockInputs, out: torch.Tensor | None = None
) -> torch.Tensor:
    """block(X_i, **kwargs_i) of every sequence i, written into ``out`` (n × L × d; a new buffer
    like X when None); returns it."""
    out = torch.empty_like(inputs.hidden) if out is None else out
    with torch.no_grad(), decoded_once(block):
        for i, (args, kwargs) in enumerate(inputs.kwargs):
            out[i] = first_output(block(inputs.hidden[i : i + 1], *args, **kwargs))[0]
    return out
