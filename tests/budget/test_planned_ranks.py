"""Plans that choose each matrix's rank (0 included) and factor precision under a budget that
counts the factors (docs/algorithms.md §10). Oracles: today's cost table and plan (one rank),
plain quantization (rank 0), decompose() with its factors rounded independently (8 bits),
brute-force enumeration, and the bytes of the compressed model and its files."""

import itertools

import numpy as np
import pytest
import torch
from conftest import low_rank_llama
from gguf import GGUFReader

import lorq
from lorq import DecomposeConfig, decompose
from lorq.budget import candidate_grid, cost_table, plan_budget, plan_budgets, solve
from lorq.budget.choices import Choices, adapter_bits
from lorq.evaluation.measure import compressed_bits
from lorq.exporters.gguf import MIB, adapter_path, export_gguf, gguf_budget
from lorq.io.models import LoadedModel, ModelSource
from lorq.model.targets import targets_of
from lorq.nn import packed_linears
from lorq.quant.factors import exact_rows, round_rows

GRID = ["nf2", "nf3", "nf4"]


@pytest.fixture
def matrices():
    """Matrices with a strong low-rank part in some (so that ranks compete) and none in others."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (rows, cols) in enumerate([(64, 128), (128, 64), (64, 64), (96, 64)]):
        noise = torch.randn(rows, cols, generator=g)
        low = torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
        out[f"layers.{i}.proj"] = noise + (4.0 * i % 3) * low
    return out


def test_one_rank_column_is_todays_table_and_todays_plan(matrices):
    grid = candidate_grid(GRID)
    today = cost_table(matrices, grid, "lq", DecomposeConfig(rank=4, iters=1))
    planned = cost_table(matrices, Choices(grid, (4,), (16,)), "lq", DecomposeConfig(iters=1))
    extra = [adapter_bits(tuple(w.shape), 4, 16) for w in matrices.values()]
    np.testing.assert_array_equal(planned.cost, today.cost)
    np.testing.assert_array_equal(planned.bits, today.bits + np.array(extra)[:, None])
    for budget in (2.6, 3.1, 3.7):
        before = plan_budget(matrices, budget, GRID, rank=4)
        shifted = budget + sum(extra) / today.total_params
        (after,) = plan_budgets(matrices, [shifted], GRID, ranks=(4,))
        assert [e.config for e in after.entries] == [e.config for e in before.entries]
        assert [e.bits for e in after.entries] == [e.bits for e in before.entries]
        assert after.achieved_total_bits == pytest.approx(before.bits_with_low_rank(16))


def test_rank_zero_is_plain_quantization(matrices):
    grid = candidate_grid(GRID)
    plain = cost_table(matrices, grid, "plain")
    planned = cost_table(matrices, Choices(grid, (0, 4)), "lq", DecomposeConfig(iters=1))
    zero = [c for c in range(len(planned.candidates)) if planned.adapter_of(c)[0] == 0]
    np.testing.assert_array_equal(planned.cost[:, zero], plain.cost)
    np.testing.assert_array_equal(planned.bits[:, zero], plain.bits)


def test_8_bit_factors_cost_the_decomposition_with_its_factors_rounded(matrices):
    grid = candidate_grid(["nf3", "int4-g32"])
    table = cost_table(matrices, Choices(grid, (4,), (16, 8)), "lq", DecomposeConfig(iters=1))
    for i, (name, weight) in enumerate(matrices.items()):
        for c, quant in enumerate(table.candidates):
            rank, bits = table.adapter_of(c)
            d = decompose(weight, DecomposeConfig(rank=4, iters=1, quant=quant))
            lora_B, lora_A = d.lora_B, d.lora_A
            if bits == 8:
                lora_B, lora_A = round_rows(lora_B), round_rows(lora_A)
            residual = weight - d.q.dequantize() - d.scaling * lora_B @ lora_A
            assert table.cost[i, c] == pytest.approx(float(residual.norm() ** 2), rel=1e-4), name
            stored = 8 * d.q.nbytes + adapter_bits(tuple(weight.shape), rank, bits)
            assert table.bits[i, c] == stored
    lora_B, lora_A = round_rows(torch.randn(96, 4)), round_rows(torch.randn(4, 64))
    stored = sum(8 * exact_rows(f).nbytes for f in (lora_B, lora_A))
    assert stored == adapter_bits((96, 64), 4, 8)  # the bytes lorq.io.native writes


def test_planned_ilp_is_optimal_by_brute_force(matrices):
    small = dict(itertools.islice(matrices.items(), 3))
    choices = Choices(candidate_grid(["nf2", "nf4"]), (0, 2, 4), (16, 8))
    table = cost_table(small, choices, "lq", DecomposeConfig(iters=1))
    low, high = table.feasible_range()
    n, c = table.bits.shape
    for budget in np.linspace(low, high, 6):
        solution = solve(table, float(budget))
        best = np.inf
        for choice in itertools.product(range(c), repeat=n):
            idx = (np.arange(n), np.array(choice))
            if table.bits[idx].sum() <= budget * table.total_params * (1 + 1e-12):
                best = min(best, table.cost[idx].sum())
        idx = (np.arange(n), solution.choice)
        assert table.cost[idx].sum() == pytest.approx(best, rel=1e-9)


def test_a_rank_grid_larger_than_a_matrix_is_refused_naming_it(matrices):
    with pytest.raises(ValueError, match=r"plan rank 64 must be smaller than .* layers\.0\.proj"):
        plan_budgets(matrices, [3.0], GRID, ranks=(0, 64))
    with pytest.raises(ValueError, match=r"plan ranks .* integers ≥ 0"):
        Choices(candidate_grid(GRID), (-1,))
    with pytest.raises(ValueError, match="method 'lq', plan_iters=1"):
        plan_budgets(matrices, [3.0], GRID, method="loftq", ranks=(0, 4))
    with pytest.raises(ValueError, match="plans LQ-LoRA's adapters"):
        lorq.CompressConfig(method="plain", budget=3.0, plan_ranks=(0, 4))
    with pytest.raises(ValueError, match="give budget="):
        lorq.CompressConfig(plan_ranks="0,4")


def test_compress_follows_the_planned_ranks_and_counts_their_bytes(tmp_path):
    model = low_rank_llama()
    config = lorq.CompressConfig(
        budget=4.2, candidates="nf2,nf3,nf4", plan_ranks=(0, 4), plan_factor_bits=(16, 8), iters=1
    )
    result = lorq.compress_model(model, config, eval_blocks=0, baseline=False)
    plan, layers = result.plan, packed_linears(result.model)
    assert plan.adapters_planned and plan.achieved_total_bits <= 4.2
    ranks = {e.adapter_label for e in plan.entries}
    assert "r0" in ranks and ranks - {"r0"}, ranks  # a mix: some adapters, some none
    for entry in plan.entries:
        layer = layers[entry.name]
        assert layer.quant_config == entry.config
        if entry.rank == 0:
            assert not layer.has_lora
            continue
        assert layer.rank == entry.rank
        on_grid = all(exact_rows(f.detach()) is not None for f in (layer.lora_A, layer.lora_B))
        assert on_grid == (entry.factor_bits == 8), entry.name
    assert compressed_bits(result.model)[1] == pytest.approx(plan.achieved_total_bits, rel=1e-12)
    lorq.save(result.model, tmp_path / "m")
    back = lorq.load(tmp_path / "m")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, result.model(ids).logits)


def test_a_budget_in_mib_with_planned_ranks_counts_the_adapter_it_writes(tmp_path):
    model = low_rank_llama()
    config = lorq.CompressConfig(candidates="gguf", budget=5.0, rank=4)
    shapes = {n: tuple(m.weight.shape) for n, m in targets_of(model, config).items()}
    probe = gguf_budget(model, shapes, 1024.0, None)
    megabytes = probe.megabytes_for(5.5)
    planned = lorq.CompressConfig(
        candidates="gguf", budget_mb=megabytes, plan_ranks=(0, 4), iters=1
    )
    loaded = LoadedModel(model, None, ModelSource("tiny", ""))
    result = lorq.compress_model(loaded, planned, eval_blocks=0, baseline=False)
    assert {e.rank for e in result.plan.entries} == {0, 4}
    out = export_gguf(result.model, tmp_path / "m.gguf")
    files = out.stat().st_size + adapter_path(out).stat().st_size
    assert files <= megabytes * MIB
    plan = result.plan
    counted = gguf_budget(model, shapes, megabytes, None).fixed_bytes
    assert files <= counted + plan.achieved_total_bits * plan.total_params / 8  # what it relied on
    tensors = GGUFReader(adapter_path(out)).tensors
    assert sum(t.name.endswith(".lora_a") for t in tensors) == sum(
        e.rank == 4 for e in result.plan.entries
    )
