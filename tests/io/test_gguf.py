"""GGUF import/export of Q4_1 codes.

Oracles: bit-identical codes/scales/mins after write → read; transformers' GGUF loader (an
independent reader) gives the logits of a torch model holding ``q.dequantize()``; on the built-in
SmolLM2 GGUF, transformers' dequantized weights equal ours exactly; bad input leaves no file.
"""

import copy
import os
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tied_llama, tiny_gpt2, tiny_llama
from torch import nn

import lorq
from lorq.io.gguf import read_gguf_quantized
from lorq.io.gguf_write import write_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantize_linears(model: nn.Module) -> dict:
    return {
        name: lorq.quantize(module.weight, "q4_1")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def dense_rest(model: nn.Module, layers: dict) -> dict:
    return {n: p for n, p in model.named_parameters() if n.removesuffix(".weight") not in layers}


def export(model: nn.Module, path, **kwargs):
    layers = quantize_linears(model)
    if model.config.tie_word_embeddings:
        layers.pop("lm_head")
    dense = dense_rest(model, layers)
    return layers, write_gguf(path, layers, dense, model.config.to_dict(), **kwargs)


def assert_same_codes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].config == b[name].config and a[name].shape == b[name].shape, name
        for key, tensor in a[name].tensors().items():
            other = b[name].tensors()[key]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (name, key)
            assert other.is_contiguous(), (name, key)


@pytest.mark.parametrize("make", [tiny_llama, tied_llama], ids=["untied", "tied"])
def test_write_read_round_trip_is_bit_exact(make, tmp_path):
    layers, path = export(make(), tmp_path / "m.gguf")
    assert_same_codes(layers, read_gguf_quantized(path))
    assert os.listdir(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("make", [tiny_llama, tied_llama], ids=["untied", "tied"])
def test_transformers_gguf_loader_reads_our_file(make, tmp_path):
    """Oracle: transformers' GGUF loader (gguf dequantize + its own q/k un-permutation)."""
    from transformers import AutoModelForCausalLM

    model = make()
    layers, path = export(model, tmp_path / "m.gguf")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, q in layers.items():
            reference.get_submodule(name).weight.copy_(q.dequantize())
        embed = reference.get_input_embeddings().weight
        embed.copy_(embed.half().float())  # 2-D dense tensors are stored as F16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert (expected - model(input_ids=ids).logits).abs().max() > 1e-3  # quantization is visible


def test_source_gguf_metadata_is_copied(tmp_path):
    from gguf import GGUFReader

    model = tiny_llama()
    _, source = export(model, tmp_path / "a.gguf")
    layers, copied = export(model, tmp_path / "b.gguf", source_gguf=source)
    a, b = GGUFReader(source).fields, GGUFReader(copied).fields
    assert a.keys() == b.keys()
    assert all(a[k].contents() == b[k].contents() for k in a if not k.startswith("GGUF."))
    assert b["general.file_type"].contents() == 3  # LlamaFileType.MOSTLY_Q4_1
    assert_same_codes(layers, read_gguf_quantized(copied))


def test_source_gguf_of_another_shape_is_refused(tmp_path):
    _, source = export(tiny_llama(), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match=r"llama\.block_count=2 but the model has 1"):
        export(tied_llama_with_layers(1), tmp_path / "b.gguf", source_gguf=source)
    assert sorted(os.listdir(tmp_path)) == ["a.gguf"]


def tied_llama_with_layers(layers: int) -> nn.Module:
    model = tied_llama()
    model.config.num_hidden_layers = layers
    model.model.layers = model.model.layers[:layers]
    return model


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"x\.gguf is not a GGUF file"):
        read_gguf_quantized(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf not found"):
        read_gguf_quantized(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "g.gguf"
    writer = GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported yet"):
        read_gguf_quantized(path)
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported yet"):
        write_gguf(tmp_path / "o.gguf", {}, dict(gpt2.named_parameters()), gpt2.config.to_dict())
    assert os.listdir(tmp_path) == ["g.gguf"]


def test_non_q4_1_layer_is_refused(tmp_path):
    model = tiny_llama()
    layers = quantize_linears(model)
    layers["model.layers.0.mlp.up_proj"] = lorq.quantize(
        model.model.layers[0].mlp.up_proj.weight, "nf4"
    )
    with pytest.raises(ValueError, match="'nf4' is not supported: GGUF holds the presets q4_1"):
        write_gguf(tmp_path / "o.gguf", layers, dense_rest(model, layers), model.config.to_dict())
    assert os.listdir(tmp_path) == []


def test_missing_and_unknown_tensors_are_refused(tmp_path):
    model = tiny_llama()
    layers = quantize_linears(model)
    dense = dense_rest(model, layers)
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=r"missing tensors \['model\.norm\.weight'\]"):
        write_gguf(
            tmp_path / "o.gguf",
            layers,
            {k: v for k, v in dense.items() if k != "model.norm.weight"},
            config,
        )
    with pytest.raises(ValueError, match="not the model's parameters"):
        write_gguf(
            tmp_path / "o.gguf", layers, {**dense, "model.extra.weight": torch.ones(3)}, config
        )
    assert os.listdir(tmp_path) == []


def test_existing_file_needs_overwrite(tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"GGUF keep")
    with pytest.raises(ValueError, match="exists; pass overwrite"):
        export(tiny_llama(), out)
    assert out.read_bytes() == b"GGUF keep" and os.listdir(tmp_path) == ["o.gguf"]
    layers, _ = export(tiny_llama(), out, overwrite=True)
    assert_same_codes(layers, read_gguf_quantized(out))


def test_overwrite_never_replaces_a_file_that_is_not_gguf(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        export(tiny_llama(), notes, overwrite=True)
    assert notes.read_text() == "my notes" and os.listdir(tmp_path) == ["notes.txt"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import lorq.io.gguf_write as gguf_io

    def broken(path, kv, tensors):
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_io, "write_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(tiny_llama(), tmp_path / "o.gguf")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def smollm2():
    """The built-in SmolLM2 loaded once by transformers' own GGUF loader (~20 s of CPU)."""
    from transformers import AutoModelForCausalLM

    from lorq.io.models import builtin_path

    folder = str(builtin_path("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    return model, os.path.join(folder, SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2_layers(smollm2):
    start = time.perf_counter()
    layers = read_gguf_quantized(smollm2[1])
    print(f"\nSmolLM2: read {len(layers)} packed tensors in {time.perf_counter() - start:.2f} s")
    return layers


@pytest.mark.slow
def test_smollm2_codes_equal_transformers_weights(smollm2, smollm2_layers):
    """Oracle: transformers' GGUF loader dequantizes every Q4_1 and Q8_0 tensor to exactly our
    values."""
    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(smollm2[1]).tensors)
    print(f"SmolLM2 tensor types: {dict(types)}")
    assert len(smollm2_layers) == types["Q4_1"] + types["Q8_0"] == 211
    state = smollm2[0].state_dict()
    for name, q in smollm2_layers.items():
        assert torch.equal(q.dequantize(), state[f"{name}.weight"]), name


@pytest.mark.slow
def test_smollm2_reexport_is_byte_identical(smollm2, smollm2_layers, tmp_path):
    """Oracle: llama.cpp's own file: every Q4_1 and Q8_0 block and every metadata value come
    back."""
    from gguf import GGUFReader

    model = smollm2[0]
    dense = dense_rest(model, smollm2_layers)
    out = write_gguf(
        tmp_path / "a.gguf", smollm2_layers, dense, model.config.to_dict(), source_gguf=smollm2[1]
    )
    source, copied = GGUFReader(smollm2[1]), GGUFReader(out)
    packed = ("Q4_1", "Q8_0")
    blocks = {t.name: t.data for t in copied.tensors if t.tensor_type.name in packed}
    originals = [t for t in source.tensors if t.tensor_type.name in packed]
    assert len(blocks) == len(originals) == 211
    assert all(np.array_equal(blocks[t.name], t.data) for t in originals)
    own = ("GGUF.", "general.alignment")
    fields = {k for k in source.fields if not k.startswith(own)}
    assert fields == {k for k in copied.fields if not k.startswith(own)}
    assert all(source.fields[k].contents() == copied.fields[k].contents() for k in fields)


@pytest.mark.slow
def test_smollm2_tokenizer_without_source_gguf(smollm2, tmp_path):
    """Oracle: transformers rebuilds a tokenizer from our metadata that encodes identically."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(smollm2[1]), gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    out = write_gguf(
        tmp_path / "t.gguf",
        {},
        dict(model.named_parameters()),
        config.to_dict(),
        tokenizer=tokenizer,
    )
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "<|im_start|>user\nHello,  world! 12345 déjà 日本語\n\n<|im_end|>" + __doc__
    assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back.chat_template == tokenizer.chat_template
