"""Oracles: bitsandbytes' NF4 table, the published NF2 levels, and torch.bucketize."""

import pytest
import torch

from lorq.quant.codebook import nearest_level, nf_grid, nf_levels, nf_midpoints


def test_nf4_equals_bitsandbytes_table():
    bnb = pytest.importorskip("bitsandbytes.functional")
    _, state = bnb.quantize_4bit(torch.randn(64, 64), quant_type="nf4", blocksize=64)
    assert torch.equal(nf_levels(4), state.code[:16].float())


def test_nf2_levels():
    expected = torch.tensor([-1.0, 0.0, 0.3379, 1.0])
    torch.testing.assert_close(nf_levels(2), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_shape_and_range(bits):
    levels = nf_levels(bits)
    assert levels.numel() == 2**bits
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert torch.all(levels[1:] > levels[:-1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_search_equals_binary_search(bits):
    mids = nf_midpoints(bits)
    up, down = torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)
    dense = torch.linspace(-1.5, 1.5, 200_001)
    x = torch.cat([mids, up, down, dense, torch.tensor([-1e9, 1e9, 0.0, -0.0])])
    assert torch.equal(nf_grid(bits).codes(x), nearest_level(x, mids))


def test_grid_codes_are_nearest_levels():
    x = torch.randn(10_000)
    codes = nf_grid(3).codes(x).long()
    levels = nf_levels(3)
    brute = (x[:, None] - levels[None, :]).abs().argmin(1)
    # identical except exact ties (none in random data)
    assert torch.equal(codes, brute)
