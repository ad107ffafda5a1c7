"""The empirical diagonal Fisher of the target weights, one block at a time (LQ-LoRA §3.2;
docs/algorithms.md §2.3, §6).

    F_W = Σ_i (∂ℓ_i / ∂W)²          ℓ_i: next-token loss of calibration sequence i (batch 1)
    shape of F_W = lorq's (out × in) layout (GPT-2 Conv1D gradients are transposed), fp32

forward, original blocks:   X_{b+1} = block_b(X_b), every X_b kept (n × L × d each; disk when large)
top:                        G_N = ∂ℓ_i/∂X_N through the final norm, the head and the loss (the
                            targets outside the blocks — an LM head — get their F here)
backward, b = N−1 … 0:      recompute Y = block_b(X_b) with gradients, backpropagate G_{b+1},
                            square each target's per-sequence gradient into F, G_b = ∂ℓ_i/∂X_b

Only one block's weights need to be resident at a time (``load`` / ``release`` give and take
them), plus the embeddings, norm and head while X_0 is captured and G_N computed. The squares are
accumulated as soon as autograd has a weight's gradient (a post-accumulate hook), so at most one
gradient per target weight exists at a time. The same operations as a whole-model backward, in
another order: the two agree bit for bit (tests/calibrate/test_fisher.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from lorq.calibrate.blocks import BlockInputs, run_block
from lorq.nn import decoded_once
from lorq.nn.dense import is_conv1d, is_packed_linear, weight_shape

Store = Callable[[int | None, dict[str, torch.Tensor]], None]  # (block, or None: outside; F)


class BlockLoader(Protocol):
    """Gives a block's weights (dense, fp32) and takes them back; the targets by name."""

    def load(self, index: int) -> None: ...

    def release(self, index: int) -> None: ...

    def targets(self, index: int | None) -> dict[str, nn.Module]: ...


@contextlib.contextmanager
def only_targets_require_grad(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for the target weights only; every flag and the train/eval mode restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


@contextlib.contextmanager
def squared_gradients(
    model: nn.Module, targets: dict[str, nn.Module]
) -> Iterator[dict[str, torch.Tensor]]:
    """{target: F (out × in, fp32, zeros)} that every backward in the block adds (∂ℓ/∂W)² to."""
    packed = [name for name, m in targets.items() if is_packed_linear(m)]
    if packed:
        raise ValueError(
            f"the Fisher needs dense weights to differentiate, but {packed[0]!r} (and "
            f"{len(packed) - 1} more) are packed QuantLinear layers; load them densely"
        )
    fisher = {
        name: torch.zeros(weight_shape(m), dtype=torch.float32, device=m.weight.device)
        for name, m in targets.items()
    }
    with only_targets_require_grad(model, [m.weight for m in targets.values()]):
        handles = [
            m.weight.register_post_accumulate_grad_hook(_square_into(fisher[n], is_conv1d(m)))
            for n, m in targets.items()
        ]
        try:
            yield fisher
        finally:
            for handle in handles:
                handle.remove()


def _square_into(buffer: torch.Tensor, transpose: bool) -> Callable[[nn.Parameter], None]:
    def hook(param: nn.Parameter) -> None:
        assert param.grad is not None
        grad = param.grad.float()
        grad = grad.T if transpose else grad
        buffer.addcmul_(grad, grad)
        param.grad = None

    return hook


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own next-token loss on ``ids`` (1 × L); ValueError for a model without one
    or a loss that is not finite."""
    try:
        loss = getattr(model(input_ids=ids, labels=ids), "loss", None)
    except TypeError:
        loss = None
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returns no loss for labels; the Fisher needs a causal "
            "language model (an encoder has no next-token loss)"
        )
    if not torch.isfinite(loss):
        raise ValueError(f"calibration loss is {loss.item()}; check the model and data")
    return loss


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


@contextlib.contextmanager
def blocks_bypassed(blocks: nn.ModuleList) -> Iterator[Callable[[torch.Tensor], None]]:
    """While active, the model's blocks stand aside: ``inject(X_N)`` makes the model's own top
    (final norm, head, loss) run on X_N; the blocks are put back after."""
    saved = list(blocks)

    def inject(hidden: torch.Tensor) -> None:
        for j in range(len(blocks)):
            blocks[j] = _Inject(hidden) if j == 0 else _Pass()

    try:
        yield inject
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block


def top_gradients(
    model: nn.Module,
    blocks: nn.ModuleList,
    top: torch.Tensor,
    tokens: torch.Tensor,
    outside: dict[str, nn.Module],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(G_N (n × L × d): ∂ℓ_i/∂X_N of every sequence, F of the ``outside`` targets) through the
    model's own norm, head and loss."""
    grads = torch.empty_like(top)
    with blocks_bypassed(blocks) as inject, squared_gradients(model, outside) as fisher:
        for i, row in enumerate(tokens):
            x = top[i : i + 1].detach().clone().requires_grad_(True)
            inject(x)
            causal_lm_loss(model, row[None].to(top.device)).backward()
            grads[i] = x.grad[0]
    return grads, {name: f.cpu() for name, f in fisher.items()}


def block_fisher(
    block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs, grads: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(F of ``targets`` inside ``block``, G_b): the block recomputed on X_b = ``inputs`` with
    gradients, each sequence's ∂ℓ/∂X_{b+1} (``grads``) backpropagated."""
    out = inputs.empty()
    with squared_gradients(block, targets) as fisher, decoded_once(block):
        for i, (args, kwargs) in enumerate(inputs.kwargs):
            x = inputs.hidden[i : i + 1].detach().clone().requires_grad_(True)
            y = block(x, *args, **kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            y.backward(grads[i : i + 1])
            out[i] = x.grad[0]
    return {name: f.cpu() for name, f in fisher.items()}, out


def blockwise_fisher(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: BlockInputs,
    tokens: torch.Tensor,
    loader: BlockLoader,
    store: Store,
) -> None:
    """F of every target, one block at a time (module docstring); ``store(b, {name: F})`` gets
    each block's, ``store(None, …)`` the outside targets'. ``inputs``: X_0 (every X_b is kept
    where X_0 lives: on the device or in disk files); the embeddings, norm and head are resident
    throughout."""
    xs = [inputs.hidden]
    for b in range(len(blocks)):
        loader.load(b)
        xs.append(run_block(blocks[b], replace(inputs, hidden=xs[-1]), inputs.empty()))
        loader.release(b)
    grads, outside = top_gradients(model, blocks, xs.pop(), tokens, loader.targets(None))
    store(None, outside)
    for b in reversed(range(len(blocks))):
        loader.load(b)
        fisher, grads = block_fisher(
            blocks[b], loader.targets(b), replace(inputs, hidden=xs.pop()), grads
        )
        store(b, fisher)
        loader.release(b)
