"""compress() with activation weighting and GPTQ rounding (docs/algorithms.md §5). Oracles: the
decomposition recomputed here from independently estimated H, the layers' measured output error on
the calibration text against the unweighted compression, the plan's costs against the decomposition
errors, an encoder without a language-model loss, QA-LoRA's pooled init against B = 0."""

import pytest
import torch
from conftest import captured_inputs, tiny_bert

from lorq.config import CompressConfig
from lorq.decomposition import decompose
from lorq.jobs.compress import compress
from lorq.jobs.statistics import estimate_hessians
from lorq.model.targets import dense_weight, find_targets, shared_copy
from lorq.nn import QALoraLinear

BLOCKS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def layer_inputs(model, blocks, targets):
    """Every target's inputs on ``blocks`` (N × in), captured by forward hooks (not lorq's)."""
    seen = captured_inputs(model, blocks, targets)
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def output_errors(model, original_weights, inputs) -> dict[str, float]:
    """Mean over calibration tokens of ‖x (W − Ŵ)ᵀ‖², per layer (Ŵ = Q + s·B·A or its merge)."""
    out = {}
    for name, x in inputs.items():
        layer = model.get_submodule(name)
        approx = layer.q.dequantize() + layer.delta_weight()
        out[name] = float(((x @ (original_weights[name] - approx).T) ** 2).sum(1).mean())
    return out


def test_layers_are_the_decompositions_of_their_own_hessians(llama):
    targets = find_targets(llama)
    weights = {n: dense_weight(m).detach().clone() for n, m in targets.items()}
    hessians = estimate_hessians(llama, BLOCKS, targets)
    config = CompressConfig(quant="nf3", rank=4, weighting="activations", rounding="gptq", iters=3)
    compress(llama, config, BLOCKS)
    for name in list(targets)[:5]:
        expected = decompose(
            weights[name], config.decompose_config(config.quant_config), None, hessians[name]
        )
        layer = llama.get_submodule(name)
        assert torch.equal(layer.lora_A, expected.lora_A) and torch.equal(
            layer.lora_B, expected.lora_B
        )
        assert torch.equal(layer.q.codes, expected.q.codes)


def test_output_error_falls_with_activation_weighting_and_gptq(llama):
    targets = find_targets(llama)
    weights = {n: dense_weight(m).detach().clone() for n, m in targets.items()}
    inputs = layer_inputs(llama, BLOCKS, targets)
    totals = {}
    for weighting, rounding in [("none", "nearest"), ("activations", "gptq")]:
        model = shared_copy(llama)
        config = CompressConfig(quant="nf2", rank=4, weighting=weighting, rounding=rounding)
        compress(model, config, BLOCKS)
        totals[weighting] = sum(output_errors(model, weights, inputs).values())
    assert totals["activations"] < 0.8 * totals["none"], totals


def test_plan_costs_are_the_h_norm_errors(llama):
    config = CompressConfig(budget=3.0, rank=4, weighting="activations", rounding="gptq", iters=1)
    targets = find_targets(llama)
    weights = {n: dense_weight(m).detach().clone() for n, m in targets.items()}
    hessians = estimate_hessians(llama, BLOCKS, targets)
    assert not compress(shared_copy(llama), CompressConfig(budget=3.0, rank=4)).plan.weighted
    result = compress(llama, config, BLOCKS)
    assert (result.plan.weighting, result.plan.rounding) == ("activations", "gptq")
    for entry in result.plan.entries[:6]:
        d = decompose(
            weights[entry.name], config.decompose_config(entry.config), None, hessians[entry.name]
        )
        assert entry.error == pytest.approx(d.error**2, rel=1e-5)


def test_an_encoder_gets_an_activation_weighted_plan():
    """No language-model loss (so no Fisher), but H from the calibration text."""
    bert = tiny_bert()
    with pytest.raises(ValueError, match="returns no loss"):
        compress(shared_copy(bert), CompressConfig(weighting="fisher", rank=4), BLOCKS)
    result = compress(bert, CompressConfig(budget=3.0, rank=4, weighting="activations"), BLOCKS)
    assert result.plan.weighting == "activations" and result.plan.achieved_bits <= 3.0


def test_qa_lora_pooled_init_lowers_the_output_error(llama):
    targets = find_targets(llama)
    weights = {n: dense_weight(m).detach().clone() for n, m in targets.items()}
    inputs = layer_inputs(llama, BLOCKS, targets)
    errors = {}
    for weighting in ("none", "activations"):
        model = shared_copy(llama)
        config = CompressConfig(method="qa-lora", quant="int3-g32", rank=4, weighting=weighting)
        compress(model, config, BLOCKS)
        assert all(isinstance(model.get_submodule(n), QALoraLinear) for n in targets)
        errors[weighting] = output_errors(model, weights, inputs)
    for name in targets:  # the same base (RTN); the pooled fit only removes error
        assert errors["activations"][name] < errors["none"][name], name


def test_fisher_plan_with_activation_decompositions(llama):
    """plan_weighting="fisher": the plan is the Fisher-weighted one, the layers are the
    activation-weighted decompositions of their own H (no Fisher inside them)."""
    from lorq.jobs.compress import plan_budgets_for
    from lorq.jobs.statistics import estimate_fisher

    targets = find_targets(llama)
    weights = {n: dense_weight(m).detach().clone() for n, m in targets.items()}
    hessians = estimate_hessians(llama, BLOCKS, targets)
    fisher = estimate_fisher(llama, BLOCKS, targets)
    fisher_config = CompressConfig(budget=3.0, rank=4, weighting="fisher")
    (expected,) = plan_budgets_for(llama, fisher_config, [3.0], fisher)
    config = CompressConfig(budget=3.0, rank=4, weighting="activations", plan_weighting="fisher")
    assert config.fisher and config.activations
    result = compress(llama, config, BLOCKS)
    assert result.plan.weighting == "fisher"
    assert [e.config for e in result.plan.entries] == [e.config for e in expected.entries]
    for entry in result.plan.entries[:4]:
        d = decompose(
            weights[entry.name], config.decompose_config(entry.config), None, hessians[entry.name]
        )
        assert torch.equal(llama.get_submodule(entry.name).lora_A, d.lora_A)
    with pytest.raises(ValueError, match="plan_weighting='fisher' shapes the costs of a budget"):
        CompressConfig(plan_weighting="fisher")
