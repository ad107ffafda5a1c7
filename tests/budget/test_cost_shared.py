"""The cost table's shared quantization work. Oracles: ``quantize(T, c).dequantize()`` (bit for
bit), ``torch.bucketize`` on each width's own midpoints, the previous cost table kept verbatim
below (``previous_cost_table``: equal floats, equal plans), ``decompose()`` itself."""

import dataclasses

import numpy as np
import pytest
import torch

from lorq import DecomposeConfig, decompose
from lorq.budget import candidate_grid, cost_table, solve
from lorq.budget.cost import _spread, fitting
from lorq.budget.grid import full_grid
from lorq.budget.shared import bit_groups, merged_levels, nf_dequantized
from lorq.decomposition.common import LowRankStep, Rounding, Weighting, check_rank
from lorq.quant import NFConfig, quantize
from lorq.quant.base import check_weight
from lorq.quant.codebook import nf_levels, nf_midpoints
from lorq.quant.tensor import storage_nbytes

MIXED = ["nf2", "nf3", "nf4", "nf8", "int4-g32", "q4_0", "nf4-fp32-scales"]


# --- the cost table as it was before the shared work (commit 2b8f501), kept as the oracle ---
def _previous_row_lq_shared(weight, candidates, config, weighting, rounding):
    low_rank = LowRankStep(config, weighting, weight)(weight).dense()
    bits, cost = [], []
    for candidate in candidates:
        q = rounding(weight - low_rank, candidate)
        bits.append(8.0 * q.nbytes)
        cost.append(weighting.error(weight - q.dequantize() - low_rank) ** 2)
    return bits, cost


def _previous_row(weight, candidates, method, config, fisher, hessian):
    weight = weight.detach().float()
    if method != "plain":
        check_rank(weight, config.rank)
    check_weight(weight)
    weighting = Weighting.build(weight, config, fisher, hessian)
    rounding = Rounding(config, hessian, weight.device, weighting.chol)
    norm = weighting.error(weight) ** 2
    if method == "lq" and config.iterations == 1:
        return (*_previous_row_lq_shared(weight, candidates, config, weighting, rounding), norm)
    bits, cost = [], []
    for candidate in candidates:
        if method == "plain":
            q = rounding(weight, candidate)
            err = weighting.error(weight - q.dequantize())
        else:
            d = decompose(weight, dataclasses.replace(config, quant=candidate), fisher, hessian)
            q, err = d.q, d.error
        bits.append(8.0 * q.nbytes)
        cost.append(err**2)
    return bits, cost, norm


def previous_cost_table(matrices, candidates, method, config, fisher=None, hessians=None):
    """(bits, cost, norms) of the previous ``cost_table``'s loop, as numpy arrays."""
    if method != "plain":
        config = dataclasses.replace(config, method=method)
    rows = []
    for name, weight in matrices.items():
        statistics = (fisher or {}).get(name), (hessians or {}).get(name)
        fit = fitting(name, (weight.shape[0], weight.shape[1]), candidates)
        usable = [c for c, ok in zip(candidates, fit, strict=True) if ok]
        bits, cost, norm = _previous_row(weight, usable, method, config, *statistics)
        rows.append((_spread(bits, fit), _spread(cost, fit), norm))
    return tuple(np.array([r[k] for r in rows], dtype=np.float64) for k in range(3))


# --- nf_dequantized: bit for bit what quantize + dequantize give ---
def awkward_target(shape, seed):
    """Gaussian values plus what rounding finds hard: a zero block, a constant block, values
    exactly on (and one ulp around) scaled midpoints, a huge and a tiny row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 0.05
    t[0, :128] = 0.0
    t[1, :128] = -0.25
    mids = torch.cat([nf_midpoints(k) for k in (2, 3, 4, 8)])
    on = mids[torch.randint(len(mids), (shape[1],), generator=g)] * 0.05
    t[2] = on
    t[3] = torch.nextafter(on, torch.full_like(on, 1.0))
    t[4] = torch.nextafter(on, torch.full_like(on, -1.0))
    t[5] *= 1e4
    t[6] *= 1e-6
    return t


NF_GRIDS = {
    "default": candidate_grid("default"),
    "full (every 5th)": full_grid()[::5],
    "fp scales": tuple(
        NFConfig(bits=b, block_size=bs, scale_bits=None, scale_dtype=d)
        for b in (2, 3, 4, 8)
        for bs, d in ((64, "fp32"), (32, "fp16"), (16, "bf16"))
    ),
}


@pytest.mark.parametrize("grid", NF_GRIDS, ids=str)
@pytest.mark.parametrize("shape", [(8, 256), (48, 128), (96, 384)])
def test_nf_dequantized_is_quantize_dequantize_bit_for_bit(grid, shape):
    candidates = NF_GRIDS[grid]
    target = awkward_target(shape, seed=shape[0])
    seen = set()
    for i, dense in nf_dequantized(target, candidates):
        assert dense.dtype == torch.float32 and dense.shape == target.shape
        assert torch.equal(dense, quantize(target, candidates[i]).dequantize()), candidates[i]
        seen.add(i)
    assert seen == set(range(len(candidates)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf_dequantized_on_cuda_is_quantize_dequantize_there():
    candidates = NF_GRIDS["default"]
    target = awkward_target((96, 384), seed=2).cuda()
    for i, dense in nf_dequantized(target, candidates):
        assert dense.is_cuda
        assert torch.equal(dense, quantize(target, candidates[i]).dequantize()), candidates[i]


def test_nf_dequantized_skips_other_formats():
    candidates = candidate_grid(MIXED)
    target = awkward_target((16, 256), seed=1)
    got = dict(nf_dequantized(target, candidates))
    nf = {i for i, c in enumerate(candidates) if isinstance(c, NFConfig)}
    assert set(got) == nf and len(nf) < len(candidates)


def ulps(x, n):
    """x and its n float32 neighbours on either side."""
    out, up, down = [x], x, x
    for _ in range(n):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        out += [up, down]
    return torch.cat(out)


def test_one_level_search_serves_nf2_to_nf4():
    assert bit_groups((2, 3, 4, 8)) == ((2, 3, 4), (8,))
    assert bit_groups((8, 4)) == ((4,), (8,))
    g = torch.Generator().manual_seed(0)
    mids = torch.cat([nf_midpoints(k) for k in (2, 3, 4, 8)])
    for group in bit_groups((2, 3, 4, 8)):
        grid, tables = merged_levels(group)
        edges = torch.linspace(-1.0, 1.0, grid.cells + 1)  # where the cell arithmetic rounds
        y = torch.cat(
            [
                torch.rand(200_000, generator=g) * 2.4 - 1.2,  # beyond ±1 too
                ulps(mids, 4),
                ulps(edges, 2),
                torch.tensor([-1.0, 0.0, -0.0, 1.0, -3.0, 3.0]),
            ]
        )
        code = grid.codes(y).int()
        for k in group:
            expected = nf_levels(k)[torch.bucketize(y, nf_midpoints(k))]
            assert torch.equal(tables[k][code], expected), (group, k)


def test_bits_are_what_the_quantized_tensor_stores():
    target = awkward_target((48, 256), seed=3)
    for grid in NF_GRIDS.values():
        for c in grid:
            assert storage_nbytes(c, (48, 256)) == quantize(target, c).nbytes, c


# --- the cost table: the previous table's floats, hence its plans ---
@pytest.fixture(scope="module")
def matrices():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 128), (128, 64), (96, 256), (256, 96)]
    return {
        f"layers.{i}.proj": torch.randn(s, generator=g) * (0.02 + 0.01 * i)
        for i, s in enumerate(shapes * 2)
    }


def statistics_for(matrices, weighting, rounding):
    g = torch.Generator().manual_seed(1)
    fisher, hessians = None, None
    if weighting in ("fisher", "both"):
        fisher = {n: torch.rand(w.shape, generator=g) for n, w in matrices.items()}
    if weighting in ("activations", "both") or rounding != "nearest":
        hessians = {}
        for n, w in matrices.items():
            x = torch.randn(4 * w.shape[1], w.shape[1], generator=g)
            hessians[n] = x.T @ x / x.shape[0]
    return fisher, hessians


CASES = [
    ("lq", "none", "nearest", "default"),
    ("lq", "fisher", "nearest", "default"),
    ("lq", "activations", "nearest", MIXED),
    ("lq", "both", "nearest", MIXED),
    ("plain", "none", "nearest", MIXED),
    ("plain", "fisher", "nearest", "default"),
    ("lq", "none", "weighted", ["q4_0", "iq4_nl", "q8_0"]),
    ("lq", "activations", "gptq", ["nf2", "nf3", "int4-g32"]),
]


@pytest.mark.parametrize("method, weighting, rounding, grid", CASES, ids=str)
def test_cost_table_equals_the_previous_one(matrices, method, weighting, rounding, grid):
    candidates = candidate_grid(grid)
    config = DecomposeConfig(rank=4, iters=1, weighting=weighting, rounding=rounding)
    fisher, hessians = statistics_for(matrices, weighting, rounding)
    before = previous_cost_table(matrices, candidates, method, config, fisher, hessians)
    for shared_work in (True, False):
        table = cost_table(
            matrices, candidates, method, config, fisher, hessians=hessians, shared_work=shared_work
        )
        for got, expected in zip((table.bits, table.cost, table.norms), before, strict=True):
            np.testing.assert_array_equal(got, expected)
        low, high = table.feasible_range()
        for budget in np.linspace(low, high, 7)[1:-1]:
            assert np.array_equal(solve(table, budget).choice, old_choice(before, table, budget))


def old_choice(before, table, budget):
    bits, cost, norms = before
    old = dataclasses.replace(table, bits=bits, cost=cost, norms=norms)
    return solve(old, budget).choice


def test_cost_table_is_the_one_step_decomposition(matrices):
    """Independent of both tables: LQ-LoRA's own first step, the same floats."""
    candidates = candidate_grid("default")
    config = DecomposeConfig(rank=4, iters=1)
    table = cost_table(matrices, candidates, "lq", config)
    for i, weight in enumerate(list(matrices.values())[:3]):
        for c, quant in enumerate(candidates):
            d = decompose(weight, dataclasses.replace(config, quant=quant))
            assert table.cost[i, c] == d.error**2
            assert table.bits[i, c] == 8 * d.q.nbytes
