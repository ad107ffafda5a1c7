"""8-bit factors. Oracles: the row-wise formula recomputed here, exact re-encoding of a rounded
factor (the fixed-point scale), and refusal of factors off the grid."""

import torch

from lorq.quant.factors import exact_rows, quantize_rows, round_rows


def factor(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 48, generator=g) * torch.logspace(-6, 2, 64)[:, None]
    x[3] = 0  # an all-zero row
    return x


def test_rows_follow_the_absmax_formula():
    x = factor()
    rows = quantize_rows(x)
    assert rows.codes.dtype == torch.int8 and int(rows.codes.abs().max()) == 127
    scale = x.abs().amax(1) / 127
    torch.testing.assert_close(rows.scales, scale, rtol=1e-6, atol=0)
    error = (rows.dequantize() - x).abs()
    assert bool((error <= rows.scales[:, None] / 2 * (1 + 1e-5)).all())
    assert rows.nbytes == 64 * 48 + 4 * 64


def test_a_rounded_factor_is_stored_exactly():
    for seed in range(5):
        rounded = round_rows(factor(seed))
        again = exact_rows(rounded)
        assert again is not None and torch.equal(again.dequantize(), rounded)


def test_a_factor_off_the_grid_is_not_stored_in_8_bits():
    assert exact_rows(factor()) is None
    assert exact_rows(factor().double()) is None
