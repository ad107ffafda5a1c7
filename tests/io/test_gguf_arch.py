"""A Qwen2 GGUF (llama.cpp's qwen2 architecture: q/k/v biases, no RoPE row permutation) whose
linears are llama.cpp's block types, loaded packed. Oracles: transformers' own GGUF loader
(dense float32) gives the same weights and logits, and every packed layer decodes to lorq's
encoding of the original weight in the file's type."""

import pytest
import torch
from conftest import tiny_causal

import lorq
from lorq.io.gguf_model import load_packed
from lorq.io.gguf_types import gguf_type, to_gguf
from lorq.io.models import load_model
from lorq.nn import QuantEmbedding, QuantLinear

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
TYPES = {  # module suffix → GGUF type of its weight
    "q_proj": "q4_k",
    "k_proj": "q6_k",
    "v_proj": "q8_0",
    "o_proj": "iq4_nl",
    "gate_proj": "q5_k",
    "up_proj": "q3_k",
    "down_proj": "q2_k",
    "embed_tokens": "q8_0",
}


def tiny_qwen2():
    """256-wide rows, so that every K-quant fits."""
    model = tiny_causal("qwen2", hidden_size=256, intermediate_size=512)
    with torch.no_grad():  # q/k/v biases start at 0: give them values the oracle can see
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


def write_qwen2(model, path):
    """The file llama.cpp's converter writes for ``model``, linears in the TYPES, the rest F32."""
    from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map

    c = model.config
    writer = GGUFWriter(path, "qwen2")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    names = get_tensor_name_map(MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        kind = next((t for k, t in TYPES.items() if f".{k}.weight" in name), None)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if kind is None:
            writer.add_tensor(gguf_name, tensor.float().numpy())
            continue
        q = lorq.quantize(tensor.float(), kind)
        raw = to_gguf(q)
        writer.add_tensor(gguf_name, raw.numpy(), raw_dtype=gguf_type(q.config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen2_gguf_loads_packed_with_transformers_weights_and_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_qwen2()
    path = write_qwen2(original, tmp_path / "q.gguf")
    packed = load_packed(path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf").eval()
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 * 7
    assert isinstance(packed.model.embed_tokens, QuantEmbedding)
    for name, layer in layers.items():
        kind = TYPES[name.rsplit(".", 1)[1]]
        assert layer.q.config.name == kind
        weight = original.get_submodule(name).weight.detach().float()
        assert torch.equal(layer.q.dequantize(), lorq.quantize(weight, kind).dequantize())
        assert torch.equal(layer.q.dequantize(), reference.get_submodule(name).weight)
        bias = reference.get_submodule(name).bias
        assert (layer.bias is None) == (bias is None)
        if bias is not None:
            assert torch.equal(layer.bias, bias) and bias.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=1e-5
        )


def test_a_truncated_qwen2_gguf_is_refused_naming_the_file(tmp_path):
    path = write_qwen2(tiny_qwen2(), tmp_path / "q.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"q\.gguf is a corrupted or truncated GGUF file"):
        load_packed(path)
    with pytest.raises(ValueError, match=r"q\.gguf is a corrupted or truncated GGUF file"):
        load_model(str(path), with_tokenizer=False, packed=True)
    assert path.read_bytes() == data[: len(data) // 3]  # the input is left as it was
