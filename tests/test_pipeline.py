"""compress(). Oracles: plan bits vs stored bytes, KL ordering against plain quantization,
the untouched original (shared copy), and frozen parameters."""

import pytest
import torch

from lorq.config import CompressConfig
from lorq.evaluate import compressed_bits, evaluate_model, model_nbytes
from lorq.nn import QuantLoraLinear
from lorq.pipeline import compress
from lorq.surgery import find_targets, shared_copy


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


def kl(model, reference, blocks):
    return evaluate_model(model, blocks, reference).kl


@pytest.mark.parametrize("setting", [{"quant": "nf3"}, {"quant": "nf2"}, {"budget": 2.5}])
def test_lq_lora_closer_to_original_than_plain(llama, setting):
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = compress(shared_copy(llama), CompressConfig(method="nf", rank=8, **setting)).model
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
    compress(llama, CompressConfig(method="nf", quant="nf4", rank=4))
    layer = llama.get_submodule(target)
    assert torch.all(layer.lora_B == 0)
    assert torch.equal(layer.q.dequantize(), quantize(weight, "nf4").dequantize())


def test_no_targets(llama):
    with pytest.raises(ValueError, match="no linear layers matched"):
        compress(llama, CompressConfig(include=("nothing_matches_this",)))


def test_fisher_needs_calibration(llama):
    with pytest.raises(ValueError, match="calibration"):
        compress(llama, CompressConfig(fisher=True))


def test_fisher_compress_runs(llama):
    blocks = torch.randint(0, 128, (3, 16))
    result = compress(llama, CompressConfig(budget=3.0, fisher=True, rank=4), blocks)
    assert result.plan.weighted


def test_bad_compress_config():
    with pytest.raises(ValueError, match="exactly one of"):
        CompressConfig(quant="nf4", budget=3.0)
    with pytest.raises(ValueError, match="unknown quantization preset"):
        CompressConfig(quant="nf5")
    with pytest.raises(ValueError, match="method='qlora'"):
        CompressConfig(method="qlora")
