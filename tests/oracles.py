"""Whole-model references of the statistics lorq computes block by block: independent, plain
implementations used only as test oracles.

    fisher_whole_model    F = Σ_i (∂ℓ_i/∂W)², one backward of the whole model per sequence
    hessians_whole_model  H = XᵀX / N, forward hooks on the whole model (captured inputs)
"""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def fisher_whole_model(
    model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``targets`` (lorq's out × in layout), by autograd on the
    whole model, batch size 1, squares accumulated as soon as each gradient exists."""
    saved = {p: p.requires_grad for p in model.parameters()}
    fisher = {}
    handles = []
    for name, module in targets.items():
        weight = module.weight
        shape = weight.shape[::-1] if _is_conv1d(module) else weight.shape
        fisher[name] = torch.zeros(shape, dtype=torch.float32)

        transposed = _is_conv1d(module)

        def hook(param, buffer=fisher[name], transpose=transposed):
            grad = param.grad.float()
            grad = grad.T if transpose else grad
            buffer.addcmul_(grad, grad)
            param.grad = None

        handles.append((weight, hook))
    for p in model.parameters():
        p.requires_grad_(False)
    for weight, _ in handles:
        weight.requires_grad_(True)
    registered = [w.register_post_accumulate_grad_hook(h) for w, h in handles]
    try:
        model.eval()
        for row in tokens:
            model(input_ids=row[None], labels=row[None]).loss.backward()
    finally:
        for handle in registered:
            handle.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return fisher


def hessians_whole_model(
    model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """H = XᵀX / N of every target's inputs, from forward hooks on the whole model (one sequence
    at a time), accumulated in float64 and returned in float32."""
    sums = {name: None for name in targets}
    rows = dict.fromkeys(targets, 0)

    def hook(name):
        def keep(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            rows[name] += x.shape[0]

        return keep

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for row in tokens:
                model(input_ids=row[None])
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / rows[name]).float() for name in targets}
