"""A LLaMA GGUF loaded with its Q4_1 linears packed (lorq.io.gguf_model).

Oracles: transformers' own GGUF loader (dense float32) gives bit-identical logits; compressing the
packed model gives bit-identical layers to compressing the dense one (same W, decoded on demand);
an incomplete file is refused by name.
"""

import pytest
import torch
from conftest import tied_llama, tiny_llama
from test_gguf import export
from torch import nn

from lorq.config import CompressConfig
from lorq.io.gguf import gguf_tensors
from lorq.io.gguf_model import load_packed
from lorq.io.models import load_model
from lorq.jobs.compress import compress
from lorq.model.targets import find_targets, shared_copy
from lorq.nn import QuantLinear

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def transformers_model(path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.mark.parametrize("make", [tiny_llama, tied_llama], ids=["untied", "tied"])
def test_packed_logits_equal_transformers_loader(make, tmp_path):
    model = make()
    layers, path = export(model, tmp_path / "m.gguf")
    packed = load_packed(path)
    quantized = {n for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(layers) - {"lm_head"}  # the output layer stays dense
    tied = packed.lm_head.weight is packed.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings
    with torch.no_grad():
        expected = transformers_model(path)(input_ids=IDS).logits
        assert torch.equal(packed(input_ids=IDS).logits, expected)
    dense_bytes = sum(p.numel() * 4 for n, p in packed.named_parameters())
    packed_bytes = sum(m.quantized_nbytes() for m in packed.modules() if isinstance(m, QuantLinear))
    linear_bytes = sum(layers[n].numel * 4 for n in quantized)
    assert packed_bytes * 32 == linear_bytes * 5 and dense_bytes > 0  # Q4_1: 5 of 32 bits


def test_load_model_packed_flag(tmp_path):
    _, path = export(tiny_llama(), tmp_path / "m.gguf")
    packed = load_model(str(path), with_tokenizer=False, packed=True).model
    dense = load_model(str(path), with_tokenizer=False).model
    assert isinstance(packed.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(dense.model.layers[0].mlp.up_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(packed(input_ids=IDS).logits, dense(input_ids=IDS).logits)


@pytest.mark.parametrize(
    "config",
    [
        CompressConfig(method="lq", quant="nf3", rank=4),
        CompressConfig(method="loftq", budget=3.0, rank=4),
        CompressConfig(method="plain", budget=2.75, rank=4),
        CompressConfig(method="qa-lora", quant="int3-g32-fmin", rank=4),
    ],
    ids=["lq-nf3", "loftq-budget", "nf-budget", "qa-lora"],
)
def test_compressing_packed_equals_compressing_dense(config, tmp_path):
    _, path = export(tied_llama(), tmp_path / "m.gguf")
    packed, dense = load_packed(path), transformers_model(path)
    a = compress(shared_copy(packed), config)
    b = compress(shared_copy(dense), config)
    assert a.errors == b.errors
    if config.budget is not None:
        assert a.plan.entries == b.plan.entries
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert all(isinstance(m, QuantLinear) for m in find_targets(packed).values())  # untouched


def test_fisher_of_a_packed_model_equals_the_dense_load(tmp_path):
    """The Fisher differentiates packed layers through their decoded weights: the same F as the
    model transformers' GGUF loader builds densely, and the packed layers are back after."""
    from lorq.jobs.statistics import estimate_fisher

    _, path = export(tied_llama(), tmp_path / "m.gguf")
    packed = load_packed(path)
    dense = load_model(str(path), with_tokenizer=False).model
    got = estimate_fisher(packed, IDS)
    expected = estimate_fisher(dense, IDS)
    assert list(got) == list(expected)
    for name, f in expected.items():
        assert torch.equal(got[name], f), name
    assert all(isinstance(m, QuantLinear) for m in find_targets(packed).values())


def test_incomplete_file_is_refused(tmp_path, monkeypatch):
    import lorq.io.gguf_write as gguf_io

    every_tensor = gguf_io._tensors

    def without_final_norm(*args):
        return [t for t in every_tensor(*args) if t[0] != "output_norm.weight"]

    monkeypatch.setattr(gguf_io, "_tensors", without_final_norm)
    _, path = export(tied_llama(), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"no tensor for \['model\.norm\.weight'\]"):
        load_packed(path)


def test_listed_tensors_read_the_files_bytes(tmp_path):
    """The listing keeps offsets, not the reader: each tensor's bytes equal the gguf reader's view
    of them, and a file cut short after listing is refused by name rather than read short."""
    from gguf import GGUFReader

    _, path = export(tiny_llama(), tmp_path / "m.gguf")
    tensors = gguf_tensors(path)
    by_name = {t.name: t for t in GGUFReader(path).tensors}
    assert sorted(by_name) == sorted(t.name for t in tensors)
    for t in tensors:
        expected = by_name[t.name].data.reshape(t.rows, -1).view("uint8")
        assert (t.read_rows() == expected).all()
        assert (t.read_rows(1, 2) == expected[1:3]).all()
    last = max(tensors, key=lambda t: t.offset)
    with open(path, "r+b") as file:
        file.truncate(last.offset + last.nbytes - 1)
    with pytest.raises(ValueError, match=f"truncated: tensor '{last.name}'"):
        last.dense()


def test_packed_flag_loads_other_sources_densely(tmp_path):
    """A transformers folder has no Q4_1 codes to keep: packed=True loads it as saved."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"), with_tokenizer=False, packed=True).model
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def q8_0_embedding_gguf(tmp_path):
    """A tied tiny LLaMA whose token embedding the GGUF stores as Q8_0 (like SmolLM2's)."""
    from test_gguf import dense_rest, quantize_linears

    from lorq.io.gguf_write import write_gguf
    from lorq.quant import quantize

    model = tied_llama()
    layers = quantize_linears(model)
    layers.pop("lm_head")
    layers["model.embed_tokens"] = quantize(model.model.embed_tokens.weight.detach(), "q8_0")
    dense = dense_rest(model, layers)
    return write_gguf(tmp_path / "m.gguf", layers, dense, model.config.to_dict())


def test_packed_q8_0_embedding_is_tied_and_exact(tmp_path):
    """Oracle: transformers' loader (dense) gives the same logits; the head shares the table."""
    from lorq.nn import QuantEmbedding, tied_packed_head

    path = q8_0_embedding_gguf(tmp_path)
    packed = load_packed(path)
    assert isinstance(packed.model.embed_tokens, QuantEmbedding)
    assert tied_packed_head(packed) is packed.lm_head
    with torch.no_grad():
        expected = transformers_model(path)(input_ids=IDS).logits
        assert torch.equal(packed(input_ids=IDS).logits, expected)


def test_packed_embedding_survives_save_load_and_exports(tmp_path):
    """Oracles: bit-identical logits after lorq.load, the table stored once, and the exports
    read back by transformers (dense) and by lorq's GGUF reader (the Q8_0 codes as they were)."""
    from safetensors import safe_open

    import lorq
    from lorq.io.gguf import read_gguf_quantized

    path = q8_0_embedding_gguf(tmp_path)
    model = compress(load_packed(path), CompressConfig(method="qa-lora", quant="q4_1", rank=2))
    lorq.save(model.model, tmp_path / "saved")
    back = lorq.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model.model(input_ids=IDS).logits)
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.q_blocks" in names and not any(
        n.startswith("lm_head") for n in names
    )
    merged = lorq.merge(back).model
    lorq.export(merged, tmp_path / "out.gguf", "gguf")
    codes = read_gguf_quantized(tmp_path / "out.gguf")["model.embed_tokens"]
    assert torch.equal(codes.buffers["blocks"], back.model.embed_tokens.q_blocks)
    dense = lorq.merge(back, dequantize=True)
    dense.save(tmp_path / "hf")
    hf = transformers_hf(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=IDS).logits, back(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )


def transformers_hf(path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("preset", ["q4_0", "q5_0", "q5_1", "q8_0"])
def test_llama_cpp_block_types_load_packed_and_write_back(preset, tmp_path):
    """Oracles: transformers' GGUF loader (the gguf package's dequantize) gives the same logits
    as the packed model, and the codes read back are the ones written."""
    from test_gguf import dense_rest

    from lorq.io.gguf import read_gguf_quantized
    from lorq.io.gguf_write import write_gguf
    from lorq.quant import quantize

    model = tiny_llama()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = {n: quantize(m.weight.detach(), preset) for n, m in linears.items()}
    path = write_gguf(
        tmp_path / "m.gguf", layers, dense_rest(model, layers), model.config.to_dict()
    )
    back = read_gguf_quantized(path)
    assert set(back) == set(layers)
    assert all(
        torch.equal(back[n].buffers["blocks"], q.buffers["blocks"]) for n, q in layers.items()
    )
    packed = load_packed(path)
    assert isinstance(packed.model.layers[0].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        expected = transformers_model(path)(input_ids=IDS).logits
        assert torch.equal(packed(input_ids=IDS).logits, expected)
