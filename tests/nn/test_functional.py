"""quant_linear. Oracles: F.linear on the dequantized weight (values and gradients), and the
tensors autograd saves (no dense weight among them)."""

import pytest
import torch
import torch.nn.functional as F

import lorq
from lorq.nn.functional import quant_linear


@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_dense_linear(gaussian, with_bias):
    q = lorq.quantize(gaussian, "nf4")
    x = torch.randn(3, 5, gaussian.shape[1], requires_grad=True)
    bias = torch.randn(gaussian.shape[0], requires_grad=True) if with_bias else None
    y = quant_linear(x, q.dequantize, bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = None if bias is None else bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, q.dequantize(), bias_ref)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if with_bias:
        torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_no_dense_weight_is_saved_for_backward(gaussian):
    q = lorq.quantize(gaussian, "nf3")
    x = torch.randn(4, gaussian.shape[1], requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quant_linear(x, q.dequantize).sum().backward()
    assert gaussian.numel() not in saved and x.grad is not None
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(x, q.dequantize()).sum()
    assert gaussian.numel() in saved  # the oracle: plain F.linear does save it
