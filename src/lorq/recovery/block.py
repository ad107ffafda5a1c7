"""Block-wise recovery (ALGORITHMS.md §9; EfficientQAT's Block-AP, OmniQuant): after a block's
matrices are decomposed, train what the block stores toward the original block's output.

    min_θ  1/(n·L·d) Σ_i ‖ f̂_b(X̂_i; θ) − f_b(X_i) ‖²        θ = the block's B, A (every layer)

X̂ (n × L × d): the inputs the compressed model gives block b (block-sequential), X: the original
model's, so the target f_b(X) lets a block correct what earlier blocks got wrong. Adam over
``steps`` steps, each on a batch of ``batch`` sequences taken in a fixed order (so the result does
not depend on the machine's process count); the codes, scales and every other parameter stay
frozen. The full-data loss is measured before and after: if training did not lower it (a
learning rate that diverges, a non-finite loss), the factors go back to their decomposed values
and the outcome says at which step it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, first_output

FACTORS = ("lora_A", "lora_B")
RECOVERY_BATCH = 4  # calibration sequences per step


@dataclass(frozen=True)
class Recovered:
    """The full-data loss before and after, the steps run, and whether the result was kept."""

    before: float
    after: float
    steps: int
    kept: bool
    stopped: int | None = None  # the step whose loss was not finite, when one was


def block_loss(block: nn.Module, inputs: BlockInputs, target: torch.Tensor, rows=None):
    """Mean squared error of block(X̂) against ``target`` over the sequences ``rows`` (all when
    None), every element weighted alike; a scalar tensor (with gradients when enabled)."""
    rows = range(len(inputs)) if rows is None else rows
    total, count = 0.0, 0
    for i in rows:
        args, kwargs = inputs.kwargs[i]
        y = first_output(block(inputs.hidden[i : i + 1], *args, **kwargs))
        total = total + (y.float() - target[i : i + 1].float()).pow(2).sum()
        count += y.numel()
    return total / count


def factors_of(block: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors of every compressed layer of ``block``, in module order."""
    return [p for name, p in block.named_parameters() if name.rsplit(".", 1)[-1] in FACTORS]


def recover_block(
    block: nn.Module,
    inputs: BlockInputs,
    target: torch.Tensor,
    steps: int,
    lr: float,
    batch: int,
) -> Recovered:
    """Train ``block``'s factors toward ``target`` (n × L × d) on ``inputs`` (module docstring);
    ``block`` is changed in place."""
    params = factors_of(block)
    with torch.no_grad():
        before = float(block_loss(block, inputs, target))
    if not params or steps <= 0:
        return Recovered(before, before, 0, False)
    saved = [p.detach().clone() for p in params]
    stopped = _train(block, inputs, target, params, (steps, lr, batch))
    with torch.no_grad():
        after = float(block_loss(block, inputs, target))
    kept = stopped is None and after == after and after < before
    if not kept:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
    return Recovered(before, after if kept else before, steps, kept, stopped)


def _train(block, inputs, target, params, schedule) -> int | None:
    """Adam on ``params`` only; returns the step whose loss was not finite, if one was."""
    steps, lr, batch = schedule
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    n = len(inputs)
    try:
        for step in range(steps):
            rows = [(step * batch + k) % n for k in range(min(batch, n))]
            loss = block_loss(block, inputs, target, rows)
            if not torch.isfinite(loss):
                return step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return None
