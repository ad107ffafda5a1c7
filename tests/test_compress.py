"""compress(). Oracles: plan bits vs stored bytes, KL ordering against plain quantization,
the untouched original (shared copy), frozen parameters; for QA-LoRA the RTN / GPTQ / given base
recomputed here, GPTQ's proxy loss below RTN's, and merged vs unmerged logits."""

import pytest
import torch

from lorq.config import CompressConfig, QuantConfig
from lorq.evaluation.measure import compressed_bits, evaluate_model, model_nbytes
from lorq.jobs.compress import compress, plan_budgets_for
from lorq.jobs.merge import merge_qa_lora
from lorq.model.targets import find_targets, shared_copy
from lorq.nn import QALoraLinear, QuantLinear, QuantLoraLinear


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLoraLinear)]


def test_replaces_every_target_and_freezes_the_rest(llama):
    names = list(find_targets(llama))
    result = compress(llama, CompressConfig(quant="nf4", rank=4))
    assert all(isinstance(llama.get_submodule(n), QuantLoraLinear) for n in names)
    assert set(result.errors) == set(names)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert not isinstance(llama.lm_head, QuantLoraLinear)


def test_stored_bytes_match_the_plan(llama):
    dense_bytes = model_nbytes(llama)
    result = compress(llama, CompressConfig(budget=3.0, rank=4))
    layers = quant_layers(llama)
    numel = sum(m.in_features * m.out_features for m in layers)
    stored_bits = 8 * sum(m.quantized_nbytes() for m in layers) / numel
    assert stored_bits == pytest.approx(result.plan.achieved_bits, rel=1e-12)
    quant_bits, with_factors = compressed_bits(llama)
    assert quant_bits == pytest.approx(stored_bits, rel=1e-12)
    assert with_factors - quant_bits == pytest.approx(
        16 * sum(m.rank * (m.in_features + m.out_features) for m in layers) / numel, rel=1e-12
    )
    # the whole model shrank by exactly the dense linears minus their replacements
    replaced = sum(m.quantized_nbytes() + m.lora_A.nbytes + m.lora_B.nbytes for m in layers)
    assert model_nbytes(llama) == dense_bytes - 4 * numel + replaced
    assert result.plan.achieved_bits <= 3.0
    for name, entry in ((e.name, e) for e in result.plan.entries):
        assert llama.get_submodule(name).quant_config == entry.config


def test_a_given_plan_gives_the_same_model(llama):
    """Oracle: compress with the budget alone (its own cost table)."""
    config = CompressConfig(budget=3.0, rank=4)
    plans = plan_budgets_for(llama, config, [2.5, 3.0])
    given = compress(shared_copy(llama), config, plan=plans[1])
    alone = compress(shared_copy(llama), config)
    assert given.plan is plans[1] and given.plan.entries == alone.plan.entries
    a, b = given.model.state_dict(), alone.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "config, match",
    [
        (CompressConfig(budget=2.5, rank=4), "at 2.5"),
        (CompressConfig(method="loftq", budget=3.0, rank=4), "'loftq' at 3.0"),
        (CompressConfig(budget=3.0, rank=8), "rank 4, not 8"),
        (CompressConfig(budget=3.0, rank=4, include=(r"\.0\.",)), "not this model's targets"),
        (CompressConfig(method="qa-lora", quant="q4_1", rank=4), "takes no plan"),
    ],
)
def test_a_plan_for_other_settings_is_refused(llama, config, match):
    (plan,) = plan_budgets_for(llama, CompressConfig(budget=3.0, rank=4), [3.0])
    with pytest.raises(ValueError, match=match):
        compress(llama, config, plan=plan)
    assert not quant_layers(llama)


def kl(model, reference, blocks):
    return evaluate_model(model, blocks, reference).kl


@pytest.mark.parametrize("setting", [{"quant": "nf3"}, {"quant": "nf2"}, {"budget": 2.5}])
def test_lq_lora_closer_to_original_than_plain(llama, setting):
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = compress(shared_copy(llama), CompressConfig(method="plain", rank=8, **setting)).model
    lq = compress(shared_copy(llama), CompressConfig(method="lq", rank=8, **setting)).model
    assert kl(lq, llama, blocks) < kl(plain, llama, blocks)


def test_shared_copy_leaves_original_modules(llama):
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = llama(ids).logits
    copy = compress(shared_copy(llama), CompressConfig(quant="nf2", rank=4)).model
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)
        assert not torch.equal(copy(ids).logits, before)
    assert not quant_layers(llama)


def test_nf_method_starts_at_plain_quantization(llama):
    from lorq import quantize

    target = "model.layers.0.mlp.up_proj"
    weight = llama.get_submodule(target).weight.detach().clone()
    compress(llama, CompressConfig(method="plain", quant="nf4", rank=4))
    layer = llama.get_submodule(target)
    assert torch.all(layer.lora_B == 0)
    assert torch.equal(layer.q.dequantize(), quantize(weight, "nf4").dequantize())


def test_no_targets(llama):
    with pytest.raises(ValueError, match="no linear layers matched"):
        compress(llama, CompressConfig(include=("nothing_matches_this",)))


def test_fisher_needs_calibration(llama):
    with pytest.raises(ValueError, match="calibration"):
        compress(llama, CompressConfig(weighting="fisher"))


def test_fisher_compress_runs(llama):
    blocks = torch.randint(0, 128, (3, 16))
    result = compress(llama, CompressConfig(budget=3.0, weighting="fisher", rank=4), blocks)
    assert result.plan.weighted


def test_bad_compress_config():
    with pytest.raises(ValueError, match="exactly one of"):
        CompressConfig(quant="nf4", budget=3.0)
    with pytest.raises(ValueError, match="unknown quantization preset"):
        CompressConfig(quant="nf5")
    with pytest.raises(ValueError, match="method='qlora'"):
        CompressConfig(method="qlora")


# --- QA-LoRA ---------------------------------------------------------------------------------


def qa_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoraLinear)}


def randomize_b(model, std: float = 0.05) -> None:
    """Give every adapter's B seeded nonzero values, as if trained."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in qa_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def test_qa_lora_starts_at_the_rtn_base(llama):
    from lorq import quantize

    weights = {n: m.weight.detach().clone() for n, m in find_targets(llama).items()}
    result = compress(llama, CompressConfig(method="qa-lora", rank=4))
    assert result.config.quant == "q4_1"
    assert set(qa_layers(llama)) == set(weights)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in weights for x in "AB"}
    for name, weight in weights.items():
        layer = llama.get_submodule(name)
        q = quantize(weight, "q4_1").dequantize()
        assert torch.all(layer.lora_B == 0) and layer.lora_A.shape == (4, weight.shape[1] // 32)
        assert torch.equal(layer.q.dequantize(), q)
        expected = float((weight - q).norm() / weight.norm())
        assert result.errors[name] == pytest.approx(expected, rel=1e-6)


def test_qa_lora_uses_a_given_base(llama):
    from lorq import quantize

    name = "model.layers.1.mlp.down_proj"
    given = quantize(llama.get_submodule(name).weight.detach(), "int4-g32")
    compress(llama, CompressConfig(method="qa-lora", rank=4), base={name: given})
    layer = llama.get_submodule(name)
    assert layer.quant_config.name == "int4-g32"
    assert all(torch.equal(layer.q.tensors()[k], t) for k, t in given.tensors().items())
    other = llama.get_submodule("model.layers.1.mlp.up_proj")
    assert other.quant_config.name == "q4_1"


def test_qa_lora_base_errors(llama):
    from lorq import quantize

    name = "model.layers.0.mlp.up_proj"
    weight = llama.get_submodule(name).weight.detach()
    config = CompressConfig(method="qa-lora", rank=4)
    with pytest.raises(ValueError, match="not targets of this compression"):
        compress(llama, config, base={"model.nothing": quantize(weight, "q4_1")})
    with pytest.raises(ValueError, match="give a Q of the module's own shape"):
        compress(llama, config, base={name: quantize(weight.T.contiguous(), "q4_1")})
    with pytest.raises(ValueError, match="not supported with method='qa-lora'"):
        compress(llama, config, base={name: quantize(weight, "nf4")})
    with pytest.raises(ValueError, match="only used by method='qa-lora'"):
        compress(llama, CompressConfig(quant="nf4"), base={name: quantize(weight, "q4_1")})
    assert not quant_layers(llama) and not qa_layers(llama)  # nothing replaced on error


def test_qa_lora_gptq_needs_calibration(llama):
    with pytest.raises(ValueError, match="needs calibration"):
        compress(llama, CompressConfig(method="qa-lora", rounding="gptq"))


def output_error(weight, q, hessian) -> float:
    """GPTQ's proxy loss tr((W − Q) H (W − Q)ᵀ)."""
    residual = weight - q.dequantize()
    return float(torch.trace(residual @ hessian @ residual.T))


def test_qa_lora_gptq_base(llama):
    from lorq import quantize
    from lorq.jobs.statistics import estimate_hessians
    from lorq.quant.gptq import gptq_quantize

    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    include = (r"layers\.0\.mlp\.",)
    targets = find_targets(llama, include)
    hessians = estimate_hessians(llama, blocks, targets)
    weights = {n: m.weight.detach().clone() for n, m in targets.items()}
    config = CompressConfig(
        method="qa-lora", quant="int3-g32", rounding="gptq", rank=4, include=include
    )
    compress(llama, config, blocks)
    quant = QuantConfig.preset("int3-g32")
    assert len(weights) == 3
    for name, weight in weights.items():
        layer = llama.get_submodule(name)
        expected = gptq_quantize(weight, hessians[name], quant)
        assert all(torch.equal(layer.q.tensors()[k], t) for k, t in expected.tensors().items())
        rtn = quantize(weight, quant)
        assert output_error(weight, layer.q, hessians[name]) < output_error(
            weight, rtn, hessians[name]
        )


@pytest.mark.parametrize("preset", ["q4_1", "int4-g32"])
def test_merged_qa_lora_logits(llama, preset):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    compress(llama, CompressConfig(method="qa-lora", quant=preset, rank=4))
    with torch.no_grad():
        base = llama(ids).logits
        randomize_b(llama)
        adapted = llama(ids).logits
        errors = merge_qa_lora(llama)
        merged = llama(ids).logits
    assert not qa_layers(llama)
    assert all(type(m) is QuantLinear for m in llama.modules() if isinstance(m, QuantLinear))
    assert not any(p.requires_grad for p in llama.parameters())
    effect = float((adapted - base).abs().max())
    if preset == "q4_1":  # float mins: exact up to fp16 rounding of the mins
        # each merged min is off by ≤ 2⁻¹¹·|min'|, and |min'| is a few times |Δ| here: ≲ 1 %
        assert max(e.max_abs for e in errors.values()) < 1e-4
        assert float((merged - adapted).abs().max()) < 1e-2 * effect
    else:  # integer zeros: lossy, but most of the adapter survives and the loss is reported
        assert min(e.delta_relative for e in errors.values()) > 0
        assert float((merged - adapted).norm()) < 0.5 * float((base - adapted).norm())


def test_merge_qa_lora_needs_qa_lora_layers(llama):
    with pytest.raises(ValueError, match="no QALoraLinear layers"):
        merge_qa_lora(llama)


def test_qa_lora_config_validation(llama):
    assert CompressConfig(method="qa-lora").quant == "q4_1"
    assert CompressConfig().quant == "nf3"
    with pytest.raises(ValueError, match=r"quant='nf4' is not supported with method='qa-lora'"):
        compress(llama, CompressConfig(method="qa-lora", quant="nf4"))  # before any work
    assert not qa_layers(llama)
    with pytest.raises(ValueError, match=r"budget=3\.0 is not supported with method='qa-lora'"):
        CompressConfig(method="qa-lora", budget=3.0)
    for weighting in ("fisher", "both"):
        with pytest.raises(ValueError, match=rf"weighting='{weighting}' is not supported with"):
            CompressConfig(method="qa-lora", weighting=weighting)
    with pytest.raises(ValueError, match=r"rounding='gptp' is not supported; allowed"):
        CompressConfig(method="lq", rounding="gptp")
    with pytest.raises(ValueError, match=r"weighting='hessian' is not supported; allowed"):
        CompressConfig(weighting="hessian")
    with pytest.raises(ValueError, match=r"damp=-0\.1 is not supported"):
        CompressConfig(damp=-0.1)
    config = CompressConfig(method="qa-lora", quant="q4_1", rounding="gptq")
    assert CompressConfig.from_dict(config.to_dict()) == config
    old = CompressConfig(quant="nf4").to_dict()
    for key in ("rounding", "weighting", "damp"):
        del old[key]  # lorq.json written before QA-LoRA / activation weighting
    assert CompressConfig.from_dict(old) == CompressConfig(quant="nf4")
    legacy = {**old, "fisher": True, "gptq": False}  # lorq 0.1's flags
    assert CompressConfig.from_dict(legacy) == CompressConfig(quant="nf4", weighting="fisher")
    qa = {**CompressConfig(method="qa-lora").to_dict(), "gptq": True}
    del qa["rounding"]
    assert CompressConfig.from_dict(qa).rounding == "gptq"
