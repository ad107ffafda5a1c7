"""INT-k quantization. Oracles: representable matrices, an independent decoder, invariants."""

import numpy as np
import pytest
import torch

from lorq import quantize
from lorq.quant import FloatMinConfig, IntConfig

AFFINE = {"int": IntConfig, "float": FloatMinConfig}


def representable(bits, group, zero, rows=8, cols=128, seed=0):
    """A matrix built from codes, fp16 scales and zeros/mins: quantizing it must give it back."""
    g = torch.Generator().manual_seed(seed)
    groups = rows * cols // group
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (groups, group), generator=g)
    codes[:, 0], codes[:, 1] = 0, maxq  # every group spans its full range
    scale = (torch.rand(groups, generator=g) * 0.1 + 0.01).half().float()
    if zero == "int":
        z = torch.randint(1, maxq, (groups,), generator=g).float()
        w = scale[:, None] * (codes - z[:, None])
    else:
        m = (-torch.rand(groups, generator=g)).half().float()
        w = scale[:, None] * codes + m[:, None]
    return w.view(rows, cols)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero", ["int", "float"])
def test_representable_matrix_is_reproduced(bits, zero):
    w = representable(bits, 32, zero, seed=bits)
    q = quantize(w, AFFINE[zero](bits=bits, block_size=32))
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=2e-3 * w.abs().max().item())


def numpy_decode(q):
    """Independent decoder written from §1.3 with numpy (no lorq unpacking code)."""
    bits, group = q.config.bits, q.config.block_size
    raw = np.unpackbits(q.codes.numpy())  # big-endian bits: the packing puts code 0 first
    n = q.numel
    codes = raw[: n * bits].reshape(n, bits) @ (1 << np.arange(bits - 1, -1, -1))
    codes = codes.reshape(-1, group).astype(np.float64)
    scale = q.scales.float().numpy().astype(np.float64)[:, None]
    if isinstance(q.config, IntConfig):
        zraw = np.unpackbits(q.zeros.numpy())[: q.num_blocks * bits].reshape(-1, bits)
        zero = (zraw @ (1 << np.arange(bits - 1, -1, -1)))[:, None]
        out = scale * (codes - zero)
    else:
        out = scale * codes + q.zeros.float().numpy().astype(np.float64)[:, None]
    return torch.from_numpy(out.reshape(q.shape)).float()


@pytest.mark.parametrize("preset", ["int4-g32", "int3-g32", "int2-g32", "int8-g128", "q4_1"])
def test_independent_decoder(heavy_tailed, preset):
    q = quantize(heavy_tailed, preset)
    torch.testing.assert_close(q.dequantize(), numpy_decode(q), rtol=1e-6, atol=1e-6)


def test_integer_zero_in_range_and_zero_exact(gaussian):
    q = quantize(gaussian, "int3-g32")
    zeros = q.block_zeros()
    assert torch.all((zeros >= 0) & (zeros <= 7)) and torch.equal(zeros, zeros.round())
    w = gaussian.clone()
    w[:, :32] = 0.0
    assert torch.all(quantize(w, "int3-g32").dequantize()[:, :32] == 0)


@pytest.mark.parametrize("matrix", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("zero", ["int", "float"])
def test_error_falls_with_bits_and_group(matrix, zero, request):
    w = request.getfixturevalue(matrix)

    def err(bits, group):
        q = quantize(w, AFFINE[zero](bits=bits, block_size=group))
        return float((q.dequantize() - w).norm())

    assert [err(b, 32) for b in (2, 3, 4, 8)] == sorted([err(b, 32) for b in (2, 3, 4, 8)])[::-1]
    assert [err(3, g) for g in (16, 32, 128, 512)] == sorted(err(3, g) for g in (16, 32, 128, 512))


def test_constant_group_float_min_is_exact():
    w = torch.full((2, 32), 0.25)
    assert torch.equal(quantize(w, "q4_1").dequantize(), w)
