"""QuantLoraLinear. Oracles: F.linear on the dequantized weight, x(Q + s·B·A)ᵀ, merge identity."""

import pytest
import torch
from torch import nn

from lorq import DecomposeConfig, QuantConfig, decompose, quantize
from lorq.nn import QuantLoraLinear


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(128, 96, bias=True)


def test_zero_b_equals_dequantized_linear(linear):
    q = quantize(linear.weight.detach(), "nf4")
    layer = QuantLoraLinear(q, torch.zeros(96, 8), torch.randn(8, 128), 2.0, linear.bias)
    x = torch.randn(5, 7, 128)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, q.dequantize(), linear.bias))


@pytest.mark.parametrize("alpha", [16.0, 3.0])
def test_from_linear_computes_q_plus_sba(linear, alpha):
    config = DecomposeConfig(method="lq", rank=8, lora_alpha=alpha, iters=3)
    layer = QuantLoraLinear.from_linear(linear, config)
    d = decompose(linear.weight.detach(), config)
    x = torch.randn(4, 128)
    expected = x @ (d.q.dequantize() + d.scaling * d.lora_B @ d.lora_A).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert layer.scaling == alpha / 8


def test_merge_equals_forward_and_is_idempotent(linear):
    layer = QuantLoraLinear.from_linear(linear, DecomposeConfig(rank=8, iters=2))
    with torch.no_grad():
        layer.lora_B.add_(0.01)  # as if trained
    x = torch.randn(3, 128)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.merge().weight, merged.weight, rtol=0, atol=0)


def test_merge_inverts_from_linear_up_to_decomposition_error(linear):
    config = DecomposeConfig(rank=16, quant=QuantConfig.preset("nf8"))
    layer = QuantLoraLinear.from_linear(linear, config)
    back = layer.merge()
    err = float((back.weight - linear.weight).norm() / linear.weight.norm())
    assert err < 0.01
    assert torch.equal(back.bias, linear.bias)


def test_conv1d(gpt2):
    conv = gpt2.transformer.h[0].mlp.c_fc
    layer = QuantLoraLinear.from_linear(
        conv, DecomposeConfig(rank=4, quant=QuantConfig.preset("nf8"))
    )
    x = torch.randn(2, 5, conv.weight.shape[0])
    torch.testing.assert_close(layer(x), conv(x), rtol=0.05, atol=0.02)
    assert (layer.out_features, layer.in_features) == (conv.nf, conv.weight.shape[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compute(linear, dtype):
    layer = QuantLoraLinear.from_linear(linear, DecomposeConfig(rank=8, iters=2))
    x = torch.randn(4, 128)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_only_lora_trainable_and_no_dense_copy(linear):
    layer = QuantLoraLinear.from_linear(linear, DecomposeConfig(rank=8, iters=2))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert all(b.dtype in (torch.uint8, torch.float32) for b in layer.buffers())
    assert layer.quantized_nbytes() == layer.q.nbytes < linear.weight.numel() * 4 / 6
    layer(torch.randn(2, 128)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
