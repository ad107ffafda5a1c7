"""Merged QA-LoRA models as GGUF and GPTQ. Oracles: the codes read back bit-identical (lorq's own
reader and, for GGUF, transformers' loader on the logits), the GPTQ tensors decoded by the
format's rule, and clear refusals of codes the target cannot hold. (Models with factors:
tests/export/test_handoff.py and tests/export/test_gguf_lora.py.)"""

import pytest
import torch
from conftest import tiny_llama

import lorq
from lorq.exporters.gguf import export_gguf
from lorq.exporters.gptq import export_gptq
from lorq.io.gguf import read_gguf_quantized
from lorq.io.gptq import from_gptq
from lorq.jobs.merge import merge_qa_lora


def merged_qa_lora(quant: str):
    model = tiny_llama()
    lorq.compress(model, lorq.CompressConfig(method="qa-lora", quant=quant, rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    merge_qa_lora(model)
    return model


def test_gguf_export_keeps_the_merged_codes_and_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = merged_qa_lora("q4_1")
    path = export_gguf(model, tmp_path / "m.gguf")
    read = read_gguf_quantized(path)
    layers = {n: m.q for n, m in model.named_modules() if hasattr(m, "q")}
    assert set(read) == set(layers)
    for name, q in layers.items():
        for key, tensor in q.tensors().items():
            assert torch.equal(read[name].tensors()[key], tensor), (name, key)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.half().float()
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


def test_gptq_export_decodes_to_the_merged_weights(tmp_path):
    from safetensors.torch import load_file

    model = merged_qa_lora("int4-g32")
    path, fmt = export_gptq(model, tmp_path / "g")
    tensors = load_file(path / "model.safetensors")
    layer = model.model.layers[1].mlp.down_proj
    own = {
        k.rsplit(".", 1)[1]: v
        for k, v in tensors.items()
        if k.startswith("model.layers.1.mlp.down_proj.")
    }
    q = from_gptq(own, 4, 32, fmt)
    assert torch.equal(q.dequantize(), layer.q.dequantize())
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight)


def test_gguf_export_refuses_int_zero_layers(tmp_path):
    model = merged_qa_lora("int4-g32")
    with pytest.raises(ValueError, match="GGUF holds the presets"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gguf", "gptq"])
def test_registry_export_writes_the_same_files(fmt, tmp_path):
    """lorq.exporters dispatches to the target: the same bytes as the target's own writer."""
    model = merged_qa_lora("q4_1" if fmt == "gguf" else "int4-g32")
    direct = {"gguf": export_gguf, "gptq": export_gptq}[fmt]
    direct(model, tmp_path / "a")
    exported = lorq.export(model, tmp_path / "b", fmt)
    assert exported.path == tmp_path / "b" and fmt.upper() in exported.summary
    files = {"gguf": [""], "gptq": ["model.safetensors", "config.json"]}[fmt]
    for name in files:
        a, b = (tmp_path / d / name if name else tmp_path / d for d in "ab")
        assert a.read_bytes() == b.read_bytes()
