"""Block-wise recovery (ALGORITHMS.md §9; EfficientQAT's Block-AP, OmniQuant): after a block's
matrices are decomposed, train what the block stores toward the original block's output.

    min_θ  1/(n·L·d) Σ_i ‖ f̂_b(X̂_i; θ) − f_b(X_i) ‖²        θ = the block's B, A (every layer)
                                                             and, asked, its stored scales

X̂ (n × L × d): the inputs the compressed model gives block b (block-sequential), X: the original
model's, so the target f_b(X) lets a block correct what earlier blocks got wrong. Adam over
``steps`` steps, each on a batch of ``batch`` sequences taken in a fixed order (so the result does
not depend on the machine's process count). With ``scales`` the continuous parameters the block's
formats store train too, rounded straight-through to their stored grid (``lorq.nn.scales``); the
codes, integer sub-scales and every other parameter stay frozen. The full-data loss is measured
before and after: if training did not lower it (a learning rate that diverges, a non-finite
loss), the factors and scales keep their decomposed values and the outcome says at which step it
stopped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, first_output
from lorq.nn.scales import Session, trainable_layers, trained_scales

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
    None), every element weighted alike; a scalar tensor (with gradients when enabled).
    Consecutive sequences with the same other inputs (a causal LM's equal-length sequences) run
    as one batch."""
    rows = list(range(len(inputs)) if rows is None else rows)
    total, count = 0.0, 0
    for group in _batches(inputs, rows):
        args, kwargs = inputs.kwargs[group[0]]
        y = first_output(block(inputs.hidden[group], *args, **kwargs))
        total = total + (y.float() - target[group].float()).pow(2).sum()
        count += y.numel()
    return total / count


def _batches(inputs: BlockInputs, rows: list[int]) -> list[list[int]]:
    """``rows`` cut into runs of RECOVERY_BATCH at most whose inputs besides X are identical."""
    groups: list[list[int]] = []
    for i in rows:
        last = groups[-1] if groups else None
        if last and len(last) < RECOVERY_BATCH and _same(inputs.kwargs[last[0]], inputs.kwargs[i]):
            last.append(i)
        else:
            groups.append([i])
    return groups


def _same(a, b) -> bool:
    """Whether two (args, kwargs) are equal, tensors by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        return both and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


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
    scales: float | None = None,
) -> Recovered:
    """Train ``block``'s factors toward ``target`` (n × L × d) on ``inputs`` (module docstring),
    and with ``scales`` (their rate relative to the factors', ``lorq.nn.scales``) the continuous
    parameters its formats store; ``block`` is changed in place."""
    with torch.no_grad():
        before = float(block_loss(block, inputs, target))
    if steps <= 0 or not (factors_of(block) or (scales and trainable_layers(block))):
        return Recovered(before, before, 0, False)
    factors = factors_of(block)
    saved = [p.detach().clone() for p in factors]
    with (
        trained_scales(block, scales) if scales else contextlib.nullcontext(Session([])) as session
    ):
        stopped = _train(block, inputs, target, factors + session.params, (steps, lr, batch))
        with torch.no_grad():
            after = float(block_loss(block, inputs, target))
        kept = stopped is None and after == after and after < before
        session.keep = kept
    if not kept:
        with torch.no_grad():
            for p, value in zip(factors, saved, strict=True):
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
