"""Empirical diagonal Fisher information of the target weights (LQ-LoRA §3.2;
docs/algorithms.md §2.4).

    F_W = Σ_{samples b} (∂ℓ_b / ∂W)²        ℓ_b: next-token loss of calibration sequence b
    shape of F_W = shape of W in lorq's (out × in) layout (GPT-2 Conv1D gradients are transposed)

Per-sample gradients come from batch size 1. Memory stays bounded: each weight's gradient is
squared into its fp32 Fisher buffer and freed as soon as autograd has accumulated it (a
post-accumulate hook), so at most one fp32 buffer per target weight persists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from lorq.nn.dense import is_packed_linear, weight_shape
from lorq.progress import Progress, no_progress
from lorq.surgery import find_targets, is_conv1d


@contextlib.contextmanager
def _only_targets_require_grad(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
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


def _accumulator(buffer: torch.Tensor, transpose: bool) -> Callable[[nn.Parameter], None]:
    def hook(param: nn.Parameter) -> None:
        assert param.grad is not None
        grad = param.grad.float()
        buffer.addcmul_(grad.T if transpose else grad, grad.T if transpose else grad)
        param.grad = None

    return hook


def _causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    try:
        loss = getattr(model(input_ids=ids, labels=ids), "loss", None)
    except TypeError:
        loss = None
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returns no loss for labels; the Fisher needs a causal "
            "language model (an encoder has no next-token loss)"
        )
    return loss


def estimate_fisher(
    model: nn.Module,
    batches: torch.Tensor,
    targets: Mapping[str, nn.Module] | None = None,
    progress: Progress = no_progress,
) -> dict[str, torch.Tensor]:
    """F for every target weight, from token blocks ``batches`` (n × seq_len, LongTensor).

    ``model`` must be a causal LM that returns a loss when given ``labels``; its parameters and
    mode are left as they were. Returns {module name: fp32 tensor (out × in)} on the CPU.
    """
    if batches.dim() != 2 or batches.shape[0] == 0 or batches.shape[1] < 2:
        raise ValueError(
            f"calibration batches must be a non-empty (n × seq_len ≥ 2) tensor of token ids, got "
            f"shape {tuple(batches.shape)}"
        )
    targets = dict(targets if targets is not None else find_targets(model))
    if not targets:
        raise ValueError("the model has no target linear layers to estimate the Fisher of")
    packed = [name for name, m in targets.items() if is_packed_linear(m)]
    if packed:
        raise ValueError(
            f"the Fisher needs dense weights to differentiate, but {packed[0]!r} (and "
            f"{len(packed) - 1} more) are packed QuantLinear layers; load the model with "
            "packed=False"
        )
    advance = progress("Fisher information", batches.shape[0])
    weights = [m.weight for m in targets.values()]
    device = weights[0].device
    fisher = {
        name: torch.zeros(weight_shape(m), dtype=torch.float32, device=device)
        for name, m in targets.items()
    }
    with _only_targets_require_grad(model, weights):
        handles = [
            m.weight.register_post_accumulate_grad_hook(_accumulator(fisher[name], is_conv1d(m)))
            for name, m in targets.items()
        ]
        try:
            for row in batches:
                loss = _causal_lm_loss(model, row[None].to(device))
                if not torch.isfinite(loss):
                    raise ValueError(f"calibration loss is {loss.item()}; check the model and data")
                loss.backward()
                advance(1)
        finally:
            for handle in handles:
                handle.remove()
    return {name: f.cpu() for name, f in fisher.items()}
