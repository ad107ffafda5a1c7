"""GGUF base + llama.cpp LoRA adapter of a model with factors. Oracles: the files read back by the
``gguf`` package (names, shapes, metadata as llama.cpp's loader checks them), the base's codes by
lorq's GGUF reader and its weights by transformers' GGUF loader, and Q + (α/r)·B·A rebuilt from
the two files equal to lorq's own effective weights. (llama.cpp itself: tests/test_llamacpp.py.)"""

import pytest
import torch
from conftest import adapted, tiny_causal

import lorq
from lorq.exporters.gguf import adapter_path, export_gguf
from lorq.io.gguf import gguf_names, open_gguf, read_gguf_quantized, rope_heads, rope_rows


def llama(quant="q4_0", method="loftq"):
    return adapted(lambda: tiny_causal("llama"), quant, method)


def read_adapter(path, config):
    """{GGUF base tensor name: (A, B in transformers' row order)} and α."""
    reader = open_gguf(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    raw = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    out = {}
    for name in {k.rsplit(".", 1)[0] for k in raw}:
        a, b = raw[f"{name}.lora_a"], raw[f"{name}.lora_b"]
        rope = rope_heads(name, heads, kv_heads)
        if rope is not None:
            b = b[torch.argsort(rope_rows(b.shape[0], rope))]
        out[name] = (a, b)
    return out, alpha, {k: reader.fields[k].contents() for k in ("general.type", "adapter.type")}


@pytest.mark.parametrize(
    ("method", "quant"), [("loftq", "q4_0"), ("lq", "q5_1"), ("qa-lora", "q4_1")]
)
def test_base_plus_adapter_rebuild_lorq_effective_weights(method, quant, tmp_path):
    model = llama(quant, method)
    export_gguf(model, tmp_path / "m.gguf", dtype="fp32")
    assert adapter_path(tmp_path / "m.gguf") == tmp_path / "m.lora.gguf"
    base = read_gguf_quantized(tmp_path / "m.gguf")
    factors, alpha, kinds = read_adapter(tmp_path / "m.lora.gguf", model.config)
    assert kinds == {"general.type": "adapter", "adapter.type": "lora"}
    layers = lorq.nn.packed_linears(model)
    assert len(factors) == len(layers)
    names = gguf_names(model.config.to_dict())
    for module, layer in layers.items():
        assert all(torch.equal(base[module].buffers[k], v) for k, v in layer.q.buffers.items())
        a, b = factors[names[f"{module}.weight"][0]]
        scale = alpha / a.shape[0] if alpha else 1.0
        rebuilt = base[module].dequantize() + scale * b @ a
        torch.testing.assert_close(rebuilt, layer.merged_weight(), rtol=1e-5, atol=1e-6)


def test_layers_with_different_scalings_fold_s_into_b(tmp_path):
    model = llama()
    layer = model.model.layers[0].mlp.down_proj
    layer.scaling = layer.scaling * 3
    export_gguf(model, tmp_path / "m.gguf", dtype="fp32")
    factors, alpha, _ = read_adapter(tmp_path / "m.lora.gguf", model.config)
    assert alpha == 0.0
    a, b = factors["blk.0.ffn_down.weight"]
    torch.testing.assert_close(b @ a, layer.scaling * layer.lora_B @ layer.lora_A)


def test_transformers_reads_the_base_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = llama()
    export_gguf(model, tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    for module, layer in lorq.nn.packed_linears(model).items():
        weight = loaded.get_submodule(module).weight
        assert torch.equal(weight, layer.q.dequantize())


@pytest.mark.parametrize("quant", ["nf4", "int4-g32"])
def test_codes_without_a_gguf_type_are_refused_before_writing(quant, tmp_path):
    model = llama(quant)
    with pytest.raises(ValueError, match="GGUF holds the presets q4_1, q8_0, q4_0, q5_0, q5_1"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_adapter_is_not_replaced_without_overwrite(tmp_path):
    model = llama()
    (tmp_path / "m.lora.gguf").write_text("mine")
    with pytest.raises(ValueError, match=r"m\.lora\.gguf"):
        export_gguf(model, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lora.gguf"]
    assert (tmp_path / "m.lora.gguf").read_text() == "mine"


def test_the_default_f16_adapter_is_half_the_f32_size_and_within_fp16_rounding(tmp_path):
    """F16 by default, as llama.cpp's convert_lora_to_gguf.py writes (--outtype f16)."""
    from gguf import GGMLQuantizationType

    model = llama()
    export_gguf(model, tmp_path / "a.gguf", dtype="fp32")
    export_gguf(model, tmp_path / "h.gguf")
    full, half = (tmp_path / n for n in ("a.lora.gguf", "h.lora.gguf"))
    assert {t.tensor_type for t in open_gguf(half).tensors} == {GGMLQuantizationType.F16}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    exact, _, _ = read_adapter(full, model.config)
    rounded, _, _ = read_adapter(half, model.config)
    for name, (a, b) in exact.items():
        assert torch.equal(rounded[name][0].float(), a.half().float())
        assert torch.equal(rounded[name][1].float(), b.half().float())


def test_a_bf16_adapter_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="fp32 or fp16"):
        export_gguf(llama(), tmp_path / "m.gguf", dtype="bf16")
    assert list(tmp_path.iterdir()) == []
