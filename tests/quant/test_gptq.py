"""GPTQ rounding. Oracles: RTN when H is diagonal, lower output error than RTN on correlated inputs,
a hand decoder of the stored layout, invariants of dead inputs and of the block size."""

import pytest
import torch

from lorq import QuantConfig, quantize
from lorq.quant import IntConfig
from lorq.quant.affine import affine_codes
from lorq.quant.gptq import gptq_quantize, inverse_cholesky

PRESETS = ["int4-g32", "int3-g32", "int2-g32", "int8-g128", "q4_1"]
NF_PRESETS = ["nf4", "nf3", "nf2", "nf8", "nf4-fp32-scales"]


def correlated_inputs(n=1024, size=256, seed=0):
    """X = Z·M: Gaussian rows mixed by a random matrix, so features are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=g) / size**0.5 + torch.eye(size)
    return torch.randn(n, size, generator=g) @ mixing


def weight(out=64, size=256, seed=1):
    return torch.randn(out, size, generator=torch.Generator().manual_seed(seed))


def output_error(x, w, q):
    return (x @ (w - q.dequantize()).T).norm().item()


@pytest.mark.parametrize("preset", PRESETS + NF_PRESETS)
def test_diagonal_hessian_is_round_to_nearest(preset):
    """No off-diagonal H ⇒ no error feedback ⇒ exactly quantize_int's buffers."""
    w = weight()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) + 0.1)
    q, rtn = gptq_quantize(w, h, QuantConfig.preset(preset)), quantize(w, preset)
    assert q.tensors().keys() == rtn.tensors().keys()
    for name, tensor in rtn.tensors().items():
        assert torch.equal(q.tensors()[name], tensor), name


@pytest.mark.parametrize(
    "preset", ["int4-g32", "int3-g32", "int2-g32", "q4_1", "nf4", "nf3", "nf2"]
)
def test_beats_round_to_nearest_on_correlated_inputs(preset):
    x, w = correlated_inputs(), weight()
    h = 2 / x.shape[0] * x.T @ x
    q = gptq_quantize(w, h, QuantConfig.preset(preset))
    ratio = output_error(x, w, q) / output_error(x, w, quantize(w, preset))
    assert ratio < 0.9, ratio


@pytest.mark.parametrize("preset", ["int4-g32", "int3-g32", "q4_1"])
def test_stored_layout_decodes_by_hand(preset):
    """codes, scales and zeros/mins decode to q.dequantize() by ŵ = s·(c − z) or s·c + m."""
    x, w = correlated_inputs(), weight()
    q = gptq_quantize(w, 2 / x.shape[0] * x.T @ x, QuantConfig.preset(preset))
    codes = q.codes_unpacked().float().view(-1, q.config.block_size)
    scales, zeros = q.scales.float()[:, None], q.block_zeros()[:, None]
    int_zero = isinstance(q.config, IntConfig)
    expected = scales * (codes - zeros) if int_zero else scales * codes + zeros
    torch.testing.assert_close(q.dequantize(), expected.view(q.shape), rtol=0, atol=1e-6)
    assert q.nbytes == quantize(w, preset).nbytes


def test_dead_inputs_keep_their_weights_and_get_no_feedback():
    x, w = correlated_inputs(), weight()
    dead = [3, 40, 41, 200]
    x[:, dead] = 0
    q = gptq_quantize(w, 2 / x.shape[0] * x.T @ x, QuantConfig.preset("int4-g32"))
    scales = q.scales.float().view(w.shape[0], -1)
    zeros = q.block_zeros().view(w.shape[0], -1)
    for j in dead:
        g = j // 32
        expected = affine_codes(w[:, j, None], scales[:, g, None], zeros[:, g, None], 4, "int")
        assert torch.equal(q.codes_unpacked()[:, j], expected[:, 0])
    dense = q.dequantize()
    assert torch.isfinite(dense).all()
    assert (dense[:, dead] - w[:, dead]).abs().max() <= scales.max() / 2 + 1e-6


def test_block_columns_only_change_float_rounding():
    x, w = correlated_inputs(), weight()
    h, config = 2 / x.shape[0] * x.T @ x, QuantConfig.preset("int4-g32")
    reference = gptq_quantize(w, h, config, block_columns=256).codes_unpacked()
    for block_columns in (32, 100, 128):
        codes = gptq_quantize(w, h, config, block_columns=block_columns).codes_unpacked()
        assert (codes != reference).float().mean() < 1e-3


def test_group_larger_than_block_columns():
    """G = 256 > block_columns = 128: blocks are widened to whole groups (same result)."""
    x, w = correlated_inputs(size=512), weight(size=512)
    h, config = 2 / x.shape[0] * x.T @ x, IntConfig(bits=4, block_size=256)
    q = gptq_quantize(w, h, config)
    assert output_error(x, w, q) < output_error(x, w, quantize(w, config))


def test_indefinite_hessian_retries_larger_damping():
    size = 64
    u = torch.randn(size, generator=torch.Generator().manual_seed(3))
    u /= u.norm()
    h = torch.eye(size) - 1.05 * torch.outer(u, u)  # one eigenvalue −0.05: λ = 0.01 fails
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(size))
    upper = inverse_cholesky(h)
    assert torch.isfinite(upper).all()
    q = gptq_quantize(weight(8, size), h, QuantConfig.preset("int4-g32"))
    assert torch.isfinite(q.dequantize()).all()


def test_hopeless_hessian_is_a_clear_error():
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(weight(8, 64), -torch.eye(64), QuantConfig.preset("int4-g32"))


@pytest.mark.parametrize(
    ("w", "h", "preset", "match"),
    [
        (weight(8, 64), torch.eye(64), "bnb-nf4", "GPTQ rounding is not available for bnb-nf4"),
        (weight(8, 64), torch.eye(32), "int4-g32", r"\(64, 64\)"),
        (weight(8, 48), torch.eye(48), "int4-g32", "does not divide"),
        (weight(8, 64), torch.full((64, 64), float("nan")), "int4-g32", "NaN"),
    ],
)
def test_bad_inputs_are_value_errors(w, h, preset, match):
    with pytest.raises(ValueError, match=match):
        gptq_quantize(w, h, QuantConfig.preset(preset))


def test_bad_damping_is_a_value_error():
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(weight(8, 64), torch.eye(64), QuantConfig.preset("int4-g32"), damp=-1)
