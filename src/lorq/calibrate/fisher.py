"""The exact empirical diagonal Fisher without the whole model (ALGORITHMS.md §6; LQ-LoRA §3.2).

    F_W = Σ_i (∂ℓ_i / ∂W)²          ℓ_i: next-token loss of calibration sequence i (batch 1)

forward, original blocks:   X_{b+1} = block_b(X_b), every X_b kept (n × L × d each; disk when large)
top:                        G_N = ∂ℓ_i/∂X_N through the final norm, the head and the loss
backward, b = N−1 … 0:      recompute Y = block_b(X_b) with gradients, backpropagate G_{b+1},
                            square each target's per-sequence gradient into F, G_b = ∂ℓ_i/∂X_b

Only one block's weights are resident at a time (``load`` / ``release`` give and take them), plus
the embeddings and head while X_0 is captured and G_N computed. It is the whole-model estimate
(``lorq.fisher.estimate_fisher``) computed in another order of the same operations; shapes of F
are lorq's (out × in), fp32, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, run_block
from lorq.fisher import _accumulator, _causal_lm_loss, _only_targets_require_grad
from lorq.nn.dense import weight_shape
from lorq.surgery import is_conv1d


class _Inject(nn.Module):
    """Stands in for the first block: returns the given X_N, whatever it receives."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _Pass(nn.Module):
    """Stands in for the other blocks: returns its input."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden


def top_gradients(
    model: nn.Module, blocks: nn.ModuleList, top: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """G_N (n × L × d): ∂ℓ_i/∂X_N of every sequence, through the model's own norm, head and loss
    (its blocks stand aside while it runs; they are put back)."""
    saved = list(blocks)
    grads = torch.empty_like(top)  # one buffer of gradients at a time
    device = top.device
    try:
        for i, row in enumerate(tokens):
            x = top[i : i + 1].detach().clone().requires_grad_(True)
            for j in range(len(blocks)):
                blocks[j] = _Inject(x) if j == 0 else _Pass()
            loss = _causal_lm_loss(model, row[None].to(device))
            if not torch.isfinite(loss):
                raise ValueError(f"calibration loss is {loss.item()}; check the model and data")
            loss.backward()
            grads[i] = x.grad[0]
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block
    return grads


def block_fisher(
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: BlockInputs,
    grads: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(F of ``targets`` inside ``block``, G_b): the block recomputed on X_b = ``inputs`` with
    gradients, each sequence's ∂ℓ/∂X_{b+1} (``grads``) backpropagated."""
    fisher = {
        name: torch.zeros(weight_shape(m), dtype=torch.float32, device=m.weight.device)
        for name, m in targets.items()
    }
    out = inputs.empty()
    with _only_targets_require_grad(block, [m.weight for m in targets.values()]):
        handles = [
            m.weight.register_post_accumulate_grad_hook(_accumulator(fisher[n], is_conv1d(m)))
            for n, m in targets.items()
        ]
        try:
            for i, (args, kwargs) in enumerate(inputs.kwargs):
                x = inputs.hidden[i : i + 1].detach().clone().requires_grad_(True)
                y = block(x, *args, **kwargs)
                y = y[0] if isinstance(y, (tuple, list)) else y
                y.backward(grads[i : i + 1])
                out[i] = x.grad[0]
        finally:
            for handle in handles:
                handle.remove()
    return {name: f.cpu() for name, f in fisher.items()}, out


def blockwise_fisher(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets_of_block: Callable[[int], dict[str, nn.Module]],
    inputs: BlockInputs,
    tokens: torch.Tensor,
    parts: tuple[Callable[[int], None], Callable[[int], None], Callable[[], None]],
    store: Callable[[int, dict[str, torch.Tensor]], None],
) -> None:
    """F of every target, one block at a time (module docstring); ``store(b, {name: F})`` gets
    each block's. ``inputs``: X_0 (from :func:`lorq.calibrate.capture_inputs`; every X_b is
    kept where it lives: on the device or in disk files); ``parts``:
    (load(b), release(b), load_head()) give a block's / the head's weights (the head, norm and
    embeddings for the loss at the top)."""
    load, release, load_head = parts
    xs = [inputs.hidden]
    for b in range(len(blocks)):
        load(b)
        xs.append(run_block(blocks[b], replace(inputs, hidden=xs[-1]), inputs.empty()))
        release(b)
    load_head()
    grads = top_gradients(model, blocks, xs.pop(), tokens)
    for b in reversed(range(len(blocks))):
        load(b)
        fisher, grads = block_fisher(
            blocks[b], targets_of_block(b), replace(inputs, hidden=xs.pop()), grads
        )
        store(b, fisher)
        release(b)
