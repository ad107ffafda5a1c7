"""Layer-input Hessians for GPTQ rounding (docs/algorithms.md §1.7).

For a linear layer y = x Wᵀ (+ b) with W (out × in), the proxy loss ‖X Wᵀ − X Qᵀ‖²_F / N has the
Hessian (with respect to each row of W)

    H = 2/N · Σ_{rows x} x xᵀ = 2/N · Xᵀ X        X (N × in): every input row the layer saw
    shape (in × in), float32, N = calibration blocks × tokens per block

collected by forward pre-hooks during no-grad forwards of the calibration blocks (batch size 1).
GPT-2 ``Conv1D`` takes the same (…, in) inputs, so it needs no special case.

This is the *non-sequential* variant: every layer's inputs come from the unquantized model, so
the Hessians of all targets are estimated at once (GPTQ's reference code re-runs each block on
inputs that went through the already-quantized earlier blocks).

Memory: one (in × in) fp32 accumulator per target. When all of them together exceed
``max_bytes``, the targets are split into groups that fit (in model order) and the forwards are
re-run once per group; a single target larger than ``max_bytes`` forms a group of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lorq.nn.dense import device_of, is_linear, weight_shape
from lorq.progress import Progress, no_progress

DEFAULT_MAX_BYTES = 1 << 30


class _Accumulator:
    """Σ x xᵀ over input rows and their count N, for one target."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.sum = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.rows = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = args[0] if args else next(iter(kwargs.values()))
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("a target layer saw no input during the calibration forwards")
        return self.sum.mul_(2.0 / self.rows).cpu()


def _check_inputs(
    token_blocks: torch.Tensor, targets: Mapping[str, nn.Module], max_bytes: int
) -> None:
    if not isinstance(token_blocks, torch.Tensor) or token_blocks.dim() != 2:
        shape = tuple(token_blocks.shape) if isinstance(token_blocks, torch.Tensor) else None
        raise ValueError(f"token_blocks must be an (n × seq_len) tensor of token ids, got {shape}")
    if token_blocks.numel() == 0 or token_blocks.is_floating_point():
        raise ValueError(
            f"token_blocks must be a non-empty integer tensor, got shape "
            f"{tuple(token_blocks.shape)} dtype {token_blocks.dtype}"
        )
    if not targets:
        raise ValueError("no target layers given; pass {name: linear module}")
    for name, module in targets.items():
        if not is_linear(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not nn.Linear or GPT-2 Conv1D"
            )
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} is not supported; allowed: a positive integer")


def target_groups(targets: Mapping[str, nn.Module], max_bytes: int) -> list[dict[str, nn.Module]]:
    """Targets split in model order into groups whose fp32 (in × in) accumulators fit max_bytes."""
    groups: list[dict[str, nn.Module]] = [{}]
    used = 0
    for name, module in targets.items():
        size = weight_shape(module)[1] ** 2 * 4
        if groups[-1] and used + size > max_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = module
        used += size
    return groups


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


def _collect(
    model: nn.Module,
    token_blocks: torch.Tensor,
    group: Mapping[str, nn.Module],
    advance: Callable[[int], None],
) -> dict[str, torch.Tensor]:
    """Run every calibration block once with hooks on the targets of ``group``."""
    accumulators = {
        name: _Accumulator(weight_shape(m)[1], device_of(m)) for name, m in group.items()
    }
    device = next(model.parameters()).device
    handles = [
        group[name].register_forward_pre_hook(acc.hook, with_kwargs=True)
        for name, acc in accumulators.items()
    ]
    try:
        with torch.no_grad():
            for row in token_blocks:
                model(input_ids=row[None].to(device))
                advance(1)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian() for name, acc in accumulators.items()}


def estimate_hessians(
    model: nn.Module,
    token_blocks: torch.Tensor,
    targets: Mapping[str, nn.Module],
    progress: Progress = no_progress,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, torch.Tensor]:
    """H = 2/N·XᵀX of every target's inputs from calibration ``token_blocks`` (n × seq_len).

    ``targets``: {name: nn.Linear or Conv1D} inside ``model``. Returns {name: fp32 (in × in)} on
    the CPU, in the order of ``targets``. The model's train/eval mode is restored and every hook
    removed, also when a forward fails.
    """
    _check_inputs(token_blocks, targets, max_bytes)
    groups = target_groups(targets, max_bytes)
    advance = progress("Hessians", len(groups) * token_blocks.shape[0])
    found: dict[str, torch.Tensor] = {}
    with _eval_mode(model):
        for group in groups:
            found.update(_collect(model, token_blocks, group, advance))
    return {name: found[name] for name in targets}
