"""Bit budget. Oracles: brute-force enumeration, decompose() itself, monotonicity, round trips."""

import itertools

import numpy as np
import pytest
import torch

from lorq import DecomposeConfig, QuantConfig, decompose, quantize
from lorq.budget import (
    BudgetPlan,
    CostTable,
    candidate_grid,
    cost_table,
    plan_budget,
    plan_budgets,
    solve,
)
from lorq.io.gguf_types import gguf_type
from lorq.quant import IntConfig

PRESETS = ["nf2", "nf3", "nf4", "int4-g32", "nf8"]


def random_table(n, c, seed):
    rng = np.random.default_rng(seed)
    numels = rng.integers(1, 5, n) * 4096
    per_param = np.sort(rng.uniform(2, 8, c))
    bits = numels[:, None] * per_param[None, :] * rng.uniform(0.95, 1.05, (n, c))
    cost = np.sort(rng.uniform(0, 10, (n, c)), axis=1)[:, ::-1] * rng.uniform(0.5, 2, (n, 1))
    configs = tuple(QuantConfig.preset(p) for p in PRESETS[:c])
    norms = cost.max(1) * 2
    return CostTable(tuple(f"m{i}" for i in range(n)), numels, configs, bits, cost, norms)


def brute_force(table, budget):
    n, c = table.bits.shape
    best = np.inf
    for choice in itertools.product(range(c), repeat=n):
        idx = (np.arange(n), np.array(choice))
        if table.bits[idx].sum() <= budget * table.total_params + 1e-6:
            best = min(best, table.cost[idx].sum())
    return best


@pytest.mark.parametrize("seed", range(12))
def test_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    table = random_table(int(rng.integers(2, 7)), int(rng.integers(2, 6)), seed)
    low, high = table.feasible_range()
    for budget in np.linspace(low, high, 5):
        solution = solve(table, float(budget))
        idx = (np.arange(len(table.names)), solution.choice)
        assert table.bits[idx].sum() <= budget * table.total_params * (1 + 1e-9)
        assert table.cost[idx].sum() == pytest.approx(brute_force(table, budget), rel=1e-7)
        assert solution.status == "optimal"


def test_larger_budget_never_worse():
    table = random_table(6, 5, 3)
    low, high = table.feasible_range()
    totals = []
    for budget in np.linspace(low, high, 12):
        choice = solve(table, float(budget)).choice
        totals.append(table.cost[np.arange(6), choice].sum())
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(totals))


def test_infeasible_budget_names_range():
    table = random_table(3, 3, 0)
    low, high = table.feasible_range()
    with pytest.raises(ValueError, match=rf"feasible range \[{low:.4f}, {high:.4f}\]"):
        solve(table, low - 0.1)
    with pytest.raises(ValueError, match="outside the feasible range"):
        solve(table, high + 0.1)


@pytest.fixture(scope="module")
def matrices():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 128), (128, 64), (64, 64), (128, 128)]
    return {
        f"layers.{i}.proj": torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(shapes * 2)
    }


def test_cost_table_matches_decompose(matrices):
    grid = candidate_grid(["nf2", "nf4", "int4-g32"])
    config = DecomposeConfig(rank=4, iters=1)
    table = cost_table(matrices, grid, "lq", config)
    for i, weight in enumerate(matrices.values()):
        for c, quant in enumerate(grid):
            d = decompose(weight, DecomposeConfig(rank=4, iters=1, quant=quant))
            assert table.cost[i, c] == pytest.approx(d.error**2, rel=1e-5)
            assert table.bits[i, c] == 8 * d.q.nbytes
    plain = cost_table(matrices, grid, "plain")
    w = next(iter(matrices.values()))
    assert plain.cost[0, 0] == pytest.approx(
        float((quantize(w, grid[0]).dequantize() - w).norm() ** 2)
    )
    assert np.all(table.cost < plain.cost)  # the low-rank part always helps


@pytest.mark.parametrize("method", ["lq", "loftq", "plain"])
def test_plan_respects_budget_and_beats_uniform(matrices, method):
    grid = ["nf2", "nf3", "nf4"]
    uniform = cost_table(matrices, candidate_grid(grid), method, DecomposeConfig(rank=4, iters=1))
    for c, name in enumerate(grid):
        budget = uniform.bits[:, c].sum() / uniform.total_params  # exactly one uniform config
        plan = plan_budget(matrices, budget, grid, method=method, rank=4)
        assert plan.achieved_bits <= budget + 1e-12
        assert plan.total_error <= uniform.cost[:, c].sum() * (1 + 1e-9), name


def test_plan_json_round_trip(matrices, tmp_path):
    plan = plan_budget(
        matrices,
        3.0,
        "default",
        rank=4,
        fisher={name: torch.rand_like(w) for name, w in matrices.items()},
    )
    plan.save(tmp_path / "plan.json")
    back = BudgetPlan.load(tmp_path / "plan.json")
    assert back == plan and back.weighted
    assert [e.config for e in back.entries] == [e.config for e in plan.entries]
    assert plan.bits_with_low_rank(16) > plan.achieved_bits


def test_plan_load_errors(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid lorq plan"):
        BudgetPlan.load(bad)


def test_bad_candidates_and_empty_model(matrices):
    with pytest.raises(ValueError, match="unknown quantization preset 'nf9'"):
        plan_budget(matrices, 3.0, ["nf9"])
    with pytest.raises(ValueError, match="no matrices"):
        plan_budget({}, 3.0)
    with pytest.raises(ValueError, match="method='svd'"):
        plan_budget(matrices, 3.0, method="svd")


def test_grids():
    assert len(candidate_grid("full")) == 432
    default = candidate_grid("default")
    assert len(default) == 16
    assert min(c.nominal_bits for c in default) == pytest.approx(2 + 8 / 128 + 32 / (128 * 256))
    assert all(isinstance(c, IntConfig) for c in candidate_grid("int"))


def test_one_table_serves_many_budgets(matrices):
    """Oracle: plan_budget at each budget on its own (a fresh table every time)."""
    budgets = [2.5, 3.0, 3.5]
    together = plan_budgets(matrices, budgets, ["nf2", "nf3", "nf4"], rank=4)
    for budget, plan in zip(budgets, together, strict=True):
        alone = plan_budget(matrices, budget, ["nf2", "nf3", "nf4"], rank=4)
        assert plan.budget == budget and plan.entries == alone.entries


def test_many_budgets_check_each_before_the_table(matrices):
    with pytest.raises(ValueError, match="budget"):
        plan_budgets(matrices, [3.0, 0.5], ["nf2", "nf3"], rank=4)


def test_the_gguf_grid_is_what_a_gguf_file_holds():

    grid = candidate_grid("gguf")
    names = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"}
    names |= {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
    assert {c.name for c in grid} == names
    assert all(gguf_type(c) is not None for c in grid)


def test_candidates_that_do_not_tile_a_matrix_are_excluded_for_it():
    """96-wide rows take no int4-g128 group: the plan gives that matrix q8_0 even at the lowest
    budget, and the feasible range counts only what fits (oracle: the range by hand)."""
    generator = torch.Generator().manual_seed(0)
    matrices = {
        "narrow": torch.randn(64, 96, generator=generator),
        "wide": torch.randn(64, 256, generator=generator),
    }
    table = cost_table(matrices, candidate_grid("int4-g128,q8_0"), "plain")
    assert np.isinf(table.bits[0, 0]) and np.isinf(table.cost[0, 0])
    narrow, wide = 64 * 96, 64 * 256
    q8, int4 = 8.5, 4 + (16 + 4) / 128  # fp16 scale + 4-bit zero per group of 128
    low, high = table.feasible_range()
    assert low == pytest.approx((narrow * q8 + wide * int4) / (narrow + wide))
    assert high == pytest.approx(q8)
    plan = plan_budget(matrices, low, "int4-g128,q8_0", method="plain")
    assert [e.config.name for e in plan.entries] == ["q8_0", "int4-g128"]


def test_a_matrix_no_candidate_fits_is_named():
    with pytest.raises(ValueError, match=r"no candidate fits odd of shape \(8, 48\)"):
        plan_budget({"odd": torch.randn(8, 48)}, 5.0, "int4-g128,iq4_nl", method="plain")
