"""A size budget in MiB for the GGUF files (``gguf_budget``, ``compress_model(budget_mb=)``).
Oracles: the files ``export_gguf`` then writes — every byte but the targets' codes is what the
budget counted, exactly, and the two files fit the budget."""

import pytest
import torch
from conftest import tiny_causal
from gguf import GGUFWriter

import lorq
from lorq.exporters.gguf import MIB, adapter_path, export_gguf, gguf_budget
from lorq.io.models import LoadedModel, ModelSource
from lorq.model.targets import targets_of
from lorq.nn.dense import weight_shape

RANK = 4


def shapes(model, config=None):
    config = config or lorq.CompressConfig(candidates="gguf", budget=5.0, rank=RANK)
    return {name: weight_shape(m) for name, m in targets_of(model, config).items()}


def padded_codes(model, targets) -> int:
    """Bytes of the targets' codes as the base file stores them (each padded to 32)."""
    layers = lorq.nn.packed_linears(model)
    return sum(GGUFWriter.ggml_pad(layers[name].q.nbytes, 32) for name in targets)


def megabytes_at(model, bits: float, embeddings=None) -> float:
    """The MiB at which the codes may take ``bits`` bits/param."""
    probe = gguf_budget(model, shapes(model), 1024.0, RANK, embeddings=embeddings)
    return probe.megabytes_for(bits)


@pytest.mark.parametrize("embeddings", [None, "q8_0"])
def test_every_byte_but_the_codes_is_counted_and_the_files_fit(embeddings, tmp_path):
    model = tiny_causal("llama")
    quant = lorq.QuantConfig.preset(embeddings) if embeddings else None
    megabytes = megabytes_at(model, 5.2, quant)
    targets = shapes(model)
    budget = gguf_budget(model, targets, megabytes, RANK, embeddings=quant)
    assert budget.bits == pytest.approx(5.2)
    config = lorq.CompressConfig(
        budget=budget.bits, candidates="gguf", rank=RANK, iters=1, embeddings=embeddings
    )
    lorq.compress(model, config)
    out = export_gguf(model, tmp_path / "m.gguf")
    base, adapter = out.stat().st_size, adapter_path(out).stat().st_size
    assert base - padded_codes(model, targets) == budget.base_bytes
    assert adapter == budget.adapter_bytes
    assert base + adapter <= megabytes * MIB


def test_budget_mb_is_one_call_of_the_job(tmp_path):
    model = tiny_causal("llama")
    megabytes = megabytes_at(model, 4.8)
    loaded = LoadedModel(model, None, ModelSource("tiny", ""))
    config = lorq.CompressConfig(candidates="gguf", rank=RANK, iters=1, budget_mb=megabytes)
    result = lorq.compress_model(loaded, config, eval_blocks=0)
    recorded = result.metadata["gguf_budget"]
    assert recorded["megabytes"] == megabytes and recorded["bits"] == pytest.approx(4.8)
    assert result.plan is not None and result.plan.achieved_bits <= recorded["bits"]
    out = export_gguf(result.model, tmp_path / "m.gguf")
    assert out.stat().st_size + adapter_path(out).stat().st_size <= megabytes * MIB


def test_a_budget_below_the_fixed_bytes_is_refused_naming_them():
    model = tiny_causal("llama")
    probe = gguf_budget(model, shapes(model), 1024.0, RANK)
    small = (probe.base_bytes + probe.adapter_bytes) / MIB * 0.9
    with pytest.raises(ValueError, match=r"leaves nothing for the quantized layers.*give more"):
        gguf_budget(model, shapes(model), small, RANK)
    with pytest.raises(ValueError, match=r"exactly one of budget=4\.0 and budget_mb=1\.0"):
        lorq.CompressConfig(budget=4.0, budget_mb=1.0)
    with pytest.raises(ValueError, match="budget_mb= becomes bits/param in lorq"):
        lorq.compress(model, lorq.CompressConfig(budget_mb=1.0))


def test_an_f32_adapter_is_counted_at_four_bytes_a_value():
    model = tiny_causal("llama")
    half = gguf_budget(model, shapes(model), 1024.0, RANK)
    full = gguf_budget(model, shapes(model), 1024.0, RANK, adapter_dtype="fp32")
    values = sum(RANK * (o + i) for o, i in shapes(model).values())
    assert full.adapter_bytes - half.adapter_bytes == pytest.approx(2 * values, abs=32 * 28)
    assert torch.tensor(full.bits) < torch.tensor(half.bits)


def test_plan_rounding_shapes_the_costs_only():
    """plan_rounding="weighted" with GPTQ decompositions: the plan is the one a cost table of
    weighted rounding gives (made separately), the layers are rounded by GPTQ."""
    from lorq.budget import plan_budgets
    from lorq.jobs.statistics import estimate_hessians
    from lorq.model.targets import DenseWeights

    model = tiny_causal("llama")
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    common = dict(budget=5.0, candidates="gguf", weighting="activations", rank=RANK, iters=1)
    config = lorq.CompressConfig(**common, rounding="gptq", plan_rounding="weighted")
    targets = targets_of(model, config)
    hessians = estimate_hessians(model, blocks, targets)
    (expected,) = plan_budgets(
        DenseWeights(targets), [5.0], "gguf", "lq", RANK, None, hessians=hessians,
        weighting="activations", rounding="weighted",
    )  # fmt: skip
    result = lorq.compress(model, config, hessians=hessians)
    assert result.plan.rounding == "weighted" and result.config.rounding == "gptq"
    assert [e.config for e in result.plan.entries] == [e.config for e in expected.entries]
    with pytest.raises(ValueError, match="plan_rounding='weighted' shapes the costs"):
        lorq.CompressConfig(plan_rounding="weighted")


def test_a_budget_the_smallest_candidates_miss_is_refused_in_mib():
    model = tiny_causal("llama")
    megabytes = megabytes_at(model, 1.0)  # below q4_0's 4.5 bits: no plan fits
    loaded = LoadedModel(model, None, ModelSource("tiny", ""))
    config = lorq.CompressConfig(candidates="q4_0,q8_0", rank=RANK, budget_mb=megabytes)
    with pytest.raises(ValueError, match=r"leaves 1\.000 bits/param .* give at least [0-9.]+ MiB"):
        lorq.compress_model(loaded, config, eval_blocks=0)
    roomy = lorq.CompressConfig(candidates="q4_0,q8_0", rank=RANK, budget_mb=megabytes * 10)
    result = lorq.compress_model(loaded, roomy, eval_blocks=0)  # more than q8_0 everywhere
    assert {e.config.name for e in result.plan.entries} == {"q8_0"}


def test_a_planned_table_is_counted_with_the_codes_and_the_files_fit(tmp_path):
    """plan_embeddings: the token embedding's data leaves the fixed bytes and joins the codes
    (its params in the bits/param); the base file is then the fixed bytes + every planned
    tensor's padded data, and both files fit."""
    model = tiny_causal("llama", tie_word_embeddings=True)
    tables = {"model.embed_tokens": (128, 64)}
    probe = gguf_budget(model, shapes(model), 1024.0, RANK, tables=tables)
    fixed = gguf_budget(model, shapes(model), 1024.0, RANK)
    assert fixed.base_bytes - probe.base_bytes == 128 * 64 * 2  # the F16 table, now planned
    assert probe.target_params - fixed.target_params == 128 * 64
    megabytes = probe.megabytes_for(5.0)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = lorq.CompressConfig(candidates="gguf", rank=RANK, iters=1, budget_mb=megabytes,
                                 weighting="activations", plan_weighting="kl",
                                 plan_embeddings=True)  # fmt: skip
    loaded = LoadedModel(model, None, ModelSource("tiny", ""))
    result = lorq.compress_model(loaded, config, calibration=tokens, eval_blocks=0)
    table = result.model.get_input_embeddings()
    assert result.plan.embedding_entry.bits == 8 * table.q.nbytes
    out = export_gguf(result.model, tmp_path / "m.gguf")
    codes = padded_codes(result.model, shapes(model)) + GGUFWriter.ggml_pad(table.q.nbytes, 32)
    base, adapter = out.stat().st_size, adapter_path(out).stat().st_size
    assert base - codes == probe.base_bytes
    assert base + adapter <= megabytes * MIB
