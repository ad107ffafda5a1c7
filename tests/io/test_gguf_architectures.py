"""Every GGUF architecture lorq reads and writes (``lorq.io.gguf_arch``), one tiny random model
each, its linears in a mix of llama.cpp's block types. Oracles: the model's own logits with its
weights quantized (lorq's import of lorq's export computes them, packed), and transformers' own
GGUF loader (it reads the file's tensors to the same float weights: names, RoPE row order,
Gemma's norm offset checked independently)."""

import re

import pytest
import torch
from conftest import (
    LLAMA3_ROPE,
    assert_same_bytes,
    byte_bpe_tokenizer,
    quantized_export,
    saved_tensors,
    tiny_arch,
)

import lorq
from lorq.io.gguf import gguf_tensors
from lorq.io.gguf_model import load_packed
from lorq.io.gguf_write import write_gguf
from lorq.nn import QuantEmbedding
from lorq.nn.quant_embedding import packed_linears

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "starcoder2"]
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_architecture_round_trips_packed_with_its_logits(model_type, tmp_path):
    reference = quantized_export(tiny_arch(model_type), tmp_path / "m.gguf")
    packed = load_packed(tmp_path / "m.gguf")
    assert type(packed).__name__ == type(reference).__name__.replace("Mistral", "Llama")
    layers = packed_linears(packed)  # a tied head is the embedding's table
    assert isinstance(packed.get_input_embeddings(), QuantEmbedding)
    linears = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(layers) == sorted(n for n in linears if n != "lm_head")
    for name, layer in layers.items():
        torch.testing.assert_close(
            layer.q.dequantize(), reference.get_submodule(name).weight, rtol=0, atol=0
        )
    with torch.no_grad():
        ours, theirs = packed(input_ids=IDS).logits, reference(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_transformers_reads_every_tensor_lorq_writes(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = quantized_export(tiny_arch(model_type), tmp_path / "m.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ours = dict(reference.named_parameters())
    read = dict(theirs.named_parameters())
    assert sorted(read) == sorted(ours)
    for name, value in read.items():
        torch.testing.assert_close(value, ours[name].float(), rtol=0, atol=1e-6, msg=name)
    assert {t.param for t in gguf_tensors(tmp_path / "m.gguf")} >= set(ours) - {"lm_head.weight"}
    if not model_type.startswith("gemma"):  # transformers leaves Gemma's query scale at 256
        with torch.no_grad():
            expected = load_packed(tmp_path / "m.gguf")(input_ids=IDS).logits
            torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, rtol=0, atol=1e-4)


def test_gguf_candidates_leave_out_k_quants_where_rows_do_not_tile():
    """Qwen2-0.5B's 896 (here 640) wide rows: K-quants need 256-wide rows, so a plan over the
    GGUF grid gives those matrices a 32-wide type and the 1280-wide down_proj may take a K-quant;
    lorq exports and reads it back as planned."""
    from lorq.budget.plan import plan_budgets
    from lorq.quant.base import fits

    model = tiny_arch(
        "qwen2", hidden_size=640, intermediate_size=1280, num_attention_heads=5, num_hidden_layers=1
    )
    matrices = {
        n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    matrices.pop("lm_head")
    (plan,) = plan_budgets(matrices, [5.0], candidates="gguf", method="plain")
    k_quants = {e.name for e in plan.entries if e.config.name.endswith("_k")}
    assert k_quants and all(name.endswith("down_proj") for name in k_quants)
    assert all(fits(e.config, e.shape) for e in plan.entries)


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("gemma2", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar=100"),
        ("gemma2", {"tie_word_embeddings": False}, "untied lm_head"),
        ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping=None"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type='yarn'",
        ),
        ("gpt2", {}, "model_type='gpt2' is not supported yet; supported model types: llama"),
    ],
)
def test_what_llama_cpp_would_run_differently_is_refused_before_writing(
    model_type, fields, message, tmp_path
):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    config.update(fields)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_gguf(tmp_path / "m.gguf", {}, {}, config)
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_type_lorq_cannot_decode_is_named_before_loading(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    quantized_export(tiny_arch("qwen3"), tmp_path / "m.gguf")
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    tensor = next(
        t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.attn_norm.weight"
    )
    # the tensor info's type field: the 4 bytes before its 8-byte data offset
    info = data.find(b"blk.0.attn_norm.weight") + len("blk.0.attn_norm.weight")
    n_dims = int.from_bytes(data[info : info + 4], "little")
    at = info + 4 + 8 * n_dims
    assert int.from_bytes(data[at : at + 4], "little") == int(tensor.tensor_type)
    data[at : at + 4] = int(GGMLQuantizationType.F64).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_norm\.weight' is of GGML type F64"):
        load_packed(tmp_path / "bad.gguf")


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_a_packed_scaled_embedding_keeps_its_scale_saved_and_loaded(model_type, tmp_path):
    """Gemma multiplies its embedding rows by √dim: the packed table does too, in memory and
    after lorq.save / lorq.load (dropping the scale fails both)."""
    reference = quantized_export(tiny_arch(model_type), tmp_path / "m.gguf")
    packed = load_packed(tmp_path / "m.gguf")
    assert packed.get_input_embeddings().scale == pytest.approx(256**0.5)
    loaded = lorq.load(lorq.save(packed, tmp_path / "saved"))
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3", "starcoder2"])
def test_a_gguf_source_of_any_architecture_streams_to_the_bytes_of_its_packed_load(
    model_type, tmp_path
):
    """LQ-LoRA with activation statistics of a GGUF source, in memory and read block by block
    into a directory: the same tensors (Gemma's scaled packed embedding, Phi-3's fused
    matrices, StarCoder2's biases included)."""
    quantized_export(tiny_arch(model_type), tmp_path / "m.gguf")
    config = lorq.CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations")
    calibration = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    options = {"calibration": calibration, "eval_blocks": 0, "baseline": False}
    memory = lorq.compress_model(str(tmp_path / "m.gguf"), config, **options)
    lorq.save(memory, tmp_path / "memory")
    lorq.compress_model(str(tmp_path / "m.gguf"), config, tmp_path / "written", **options)
    assert_same_bytes(saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "written"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_merged_qa_lora_model_of_every_architecture_exports_its_codes(model_type, tmp_path):
    """QA-LoRA (q4_1), B perturbed, merged into the mins: the GGUF holds the merged codes and
    mins as they are, and lorq's packed import of it computes the merged model's logits."""
    from lorq.exporters.gguf import export_gguf
    from lorq.jobs.merge import merge_qa_lora

    model = tiny_arch(model_type)
    lorq.compress(model, lorq.CompressConfig(method="qa-lora", quant="q4_1", rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    merge_qa_lora(model)
    path = export_gguf(model, tmp_path / "m.gguf", byte_bpe_tokenizer())
    packed = load_packed(path)
    for name, layer in packed_linears(packed).items():
        merged = model.get_submodule(name).q.tensors()
        assert all(torch.equal(t, merged[k]) for k, t in layer.q.tensors().items()), name
    with torch.no_grad():  # GGUF holds the dense embedding (and an untied head) as F16
        for param in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            param.data = param.data.half().float()
        ours, theirs = packed(input_ids=IDS).logits, model(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_gemma3_linear_rope_scaling_and_local_base_round_trip(tmp_path):
    """Gemma 3 (4B and up): global layers' RoPE scaled linearly by 8, local layers' own base,
    one global layer in six. Written as llama.cpp's keys, read back into the same config."""
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    model = tiny_arch("gemma3_text", num_hidden_layers=6, rope_parameters=rope, sliding_window=8)
    assert model.config.layer_types.count("full_attention") == 1
    reference = quantized_export(model, tmp_path / "m.gguf")
    packed = load_packed(tmp_path / "m.gguf")
    assert packed.config.layer_types == reference.config.layer_types
    assert packed.config.rope_parameters == reference.config.rope_parameters
    with torch.no_grad():  # 16 tokens: the 8-token window matters
        ours, theirs = packed(input_ids=IDS).logits, reference(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """Llama 3.1+: no key, a rope_freqs tensor of frequency divisors (as llama.cpp's converter
    computes them); read back into rope_type llama3 with the same logits."""
    from lorq.io.gguf_meta import llama3_factors

    model = tiny_arch("llama", rope_parameters=dict(LLAMA3_ROPE))
    reference = quantized_export(model, tmp_path / "m.gguf")
    factors = llama3_factors(model.config.to_dict())
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2
    stored = {t.name: t for t in gguf_tensors(tmp_path / "m.gguf")}["rope_freqs.weight"]
    assert torch.equal(stored.dense(), factors)
    packed = load_packed(tmp_path / "m.gguf")
    assert packed.config.rope_parameters == LLAMA3_ROPE
    ids = torch.randint(0, 320, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 256 positions: the scaled long wavelengths turn visibly
        ours, theirs = packed(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_rope_divisors_of_another_shape_are_refused(tmp_path):
    rope = {**LLAMA3_ROPE, "low_freq_factor": 2.0}
    quantized_export(tiny_arch("llama", rope_parameters=rope), tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"rope_freqs\.weight holds RoPE frequency divisors"):
        load_packed(tmp_path / "m.gguf")
