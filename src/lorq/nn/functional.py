"""y = x Qᵀ + b for a frozen packed Q, with a backward that keeps no dense copy of Q.

    forward:   Q = dequantize(dtype of x);  y = x Qᵀ + b;  Q freed
    backward:  ∂ℓ/∂x = (∂ℓ/∂y) Q        Q dequantized again, freed again
               ∂ℓ/∂b = Σ ∂ℓ/∂y          only when the bias trains;  Q itself never gets a gradient

``F.linear(x, Q)`` would save the dense Q for its backward, so a training step would hold one dense
copy of every quantized layer until its backward ran: the whole model, dense. Decoding Q twice
(as bitsandbytes' 4-bit matmul does) keeps a step's memory at the packed model plus activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dequantize = Callable[[torch.dtype], torch.Tensor]  # dtype → dense Q (out × in)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize: Dequantize, bias: torch.Tensor | None):
        weight = dequantize(x.dtype)
        y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        ctx.dequantize, ctx.x_dtype = dequantize, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ ctx.dequantize(grad_y.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def quant_linear(x: torch.Tensor, dequantize: Dequantize, bias: torch.Tensor | None = None):
    """x (…, in) ↦ x Qᵀ + b (…, out); ``dequantize(dtype)`` returns Q (out × in)."""
    if not torch.is_grad_enabled() or not (
        x.requires_grad or (bias is not None and bias.requires_grad)
    ):
        weight = dequantize(x.dtype)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return _QuantMatmul.apply(x, dequantize, bias)
