"""Second-level scale quantization. Oracles: the §1.2 formula recomputed here, and invariants."""

import pytest
import torch

from lorq import quantize
from lorq.quant import IntConfig, NFConfig
from lorq.quant.base import round_up_to_dtype
from lorq.quant.double_quant import quantize_scales


def test_scales_follow_formula():
    torch.manual_seed(0)
    s1 = torch.rand(1000) + 0.5
    q = quantize_scales(s1, bits=8, block_size=256, super_scale_dtype="fp32")
    offset = s1.min()
    shifted = s1 - offset
    padded = torch.cat([shifted, torch.zeros(24)]).view(-1, 256)
    m = padded.amax(1)
    codes = torch.round(padded / (m[:, None] / 255)).view(-1)[:1000]
    expected = offset + codes * (m / 255).repeat_interleave(256)[:1000]
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=1e-6)
    assert q.super_scales.numel() == 4 and q.offset.item() == offset.item()


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scale_error_bounded_by_half_step(dtype, bits):
    torch.manual_seed(bits)
    s1 = torch.rand(4096) * 3
    q = quantize_scales(s1, bits=bits, block_size=64, super_scale_dtype=dtype)
    step = q.super_scales.float().repeat_interleave(64) / (2**bits - 1)
    assert torch.all((q.dequantize() - s1).abs() <= step / 2 + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_up_never_below(dtype):
    x = torch.rand(10_000) * 100
    assert torch.all(round_up_to_dtype(x, dtype, "scale_dtype").float() >= x)


@pytest.mark.parametrize(
    "config",
    [
        NFConfig(bits=4, scale_bits=None, scale_dtype="fp16"),
        NFConfig(bits=4, super_scale_dtype="fp16"),
        IntConfig(bits=4, block_size=32),
    ],
)
def test_fp16_overflow_is_a_clear_error(config):
    weight = torch.randn(64, 128)
    weight[0, 0] = 1e6  # scales beyond fp16's 65504
    field = "super_scale_dtype" if getattr(config, "double_quant", False) else "scale_dtype"
    with pytest.raises(ValueError, match=f"overflows {field}"):
        quantize(weight, config)


def test_more_scale_bits_less_error(heavy_tailed):
    errors = []
    for b0 in (2, 3, 4, 8, None):
        q = quantize(heavy_tailed, NFConfig(bits=4, block_size=64, scale_bits=b0))
        errors.append(float((q.dequantize() - heavy_tailed).norm()))
    assert errors[:-1] == sorted(errors[:-1], reverse=True)
    assert errors[-2] == pytest.approx(errors[-1], rel=0.01)  # 8-bit scales ≈ fp32 scales
