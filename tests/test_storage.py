"""Token embeddings and dense tensors in storage. Oracles: the table quantized by hand with the
same preset, the tie kept (one table, no second copy on disk), bit-exact save / load, and the
narrowed dtype holding every value exactly."""

import pytest
import torch
from conftest import tied_llama, tiny_llama
from safetensors import safe_open

import lorq
from lorq.config import CompressConfig
from lorq.jobs.compress import compress
from lorq.nn import QuantEmbedding, QuantLinear, tied_packed_head
from lorq.quant.factors import round_rows

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def stored(path, name):
    with safe_open(path / "model.safetensors", "pt") as f:
        return f.get_tensor(name) if name in set(f.keys()) else None


def stored_names(path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("preset", ["q8_0", "int4-g32", "nf4"])
def test_tied_embeddings_become_one_packed_table(preset, tmp_path):
    model = tied_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    config = CompressConfig(method="plain", quant="nf4", rank=2, embeddings=preset)
    result = compress(model, config)
    embedding = model.model.embed_tokens
    assert isinstance(embedding, QuantEmbedding) and tied_packed_head(model) is model.lm_head
    expected = lorq.quantize(table, preset).dequantize()
    assert torch.equal(embedding(IDS), expected[IDS])
    assert result.metadata["compress"]["embeddings"] == preset
    lorq.save(model, tmp_path / "m")
    back = lorq.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
    names = stored_names(tmp_path / "m")  # the table is written once, under the embedding
    assert not any(n.startswith("lm_head.") for n in names)
    assert any(n.startswith("model.embed_tokens.q_") for n in names)


def test_untied_output_layer_is_packed_too():
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    compress(model, CompressConfig(method="plain", quant="nf4", rank=2, embeddings="q8_0"))
    assert isinstance(model.lm_head, QuantLinear) and not model.lm_head.has_lora
    assert torch.equal(model.lm_head.q.dequantize(), lorq.quantize(head, "q8_0").dequantize())


def test_embeddings_of_the_wrong_shape_are_refused_before_work():
    model = tied_llama()  # hidden size 64: int8-g128 groups do not fit
    before = model.model.layers[0].mlp.up_proj
    with pytest.raises(ValueError, match="block_size=128 does not divide in_features=64"):
        compress(model, CompressConfig(rank=2, embeddings="int8-g128"))
    assert model.model.layers[0].mlp.up_proj is before


def test_dense_tensors_are_stored_in_the_narrowest_exact_dtype(tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # an embedding that came from a bf16 checkpoint
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.bfloat16().float())
    compress(model, CompressConfig(method="plain", quant="nf4", rank=2))
    lorq.save(model, tmp_path / "m")
    assert stored(tmp_path / "m", "model.embed_tokens.weight").dtype == torch.bfloat16
    assert stored(tmp_path / "m", "lm_head.weight").dtype == torch.float32  # random fp32 values
    back = lorq.load(tmp_path / "m")
    assert back.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_8_bit_factors_are_rounded_stored_and_restored(tmp_path):
    model = tiny_llama()
    compress(model, CompressConfig(rank=4, quant="nf4", factor_bits=8))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A, round_rows(layer.lora_A))  # on the grid after compress
    lorq.save(model, tmp_path / "m")
    assert stored(tmp_path / "m", "model.layers.0.self_attn.q_proj.lora_A").dtype == torch.int8
    back = lorq.load(tmp_path / "m")
    assert back.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
        layer.lora_B.add_(1e-3)  # as training would: off the grid, so stored as float32
    lorq.save(model, tmp_path / "trained")
    assert stored(tmp_path / "trained", "model.layers.0.self_attn.q_proj.lora_B").dtype == (
        torch.float32
    )
    assert torch.equal(
        lorq.load(tmp_path / "trained").model.layers[0].self_attn.q_proj.lora_B, layer.lora_B
    )
