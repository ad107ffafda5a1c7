"""Every GGUF architecture lorq reads and writes (``lorq.io.gguf_arch``) against the real
llama.cpp, one tiny random model each (SmolLM2's tokenizer, so that llama.cpp's converter knows
its pre-tokenizer). Oracles:

- the metadata llama.cpp's own ``convert_hf_to_gguf.py`` writes for the model equals lorq's
  export's, key by key;
- a file of llama.cpp's (converter, then ``llama-quantize`` to Q4_K_M: Q4_K, Q6_K, … mixed in
  one file) read by lorq packed scores llama-perplexity's perplexity, and its matrices are
  transformers' GGUF loader's weights;
- lorq's export of a compressed model (base + LoRA adapter) scores, in llama-perplexity with the
  adapter, lorq's own perplexity of the model.

Needs the llama.cpp tools and source: ``make test-llamacpp``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA3_ROPE, tiny_arch
from test_llamacpp import TOLERANCE, llama_perplexity, lorq_perplexity, text_file, tools

import lorq
from lorq.exporters.gguf import export_gguf
from lorq.io.gguf import read_gguf_quantized
from lorq.io.gguf_model import load_packed
from lorq.io.gguf_write import write_gguf
from lorq.io.models import builtin_path
from lorq.text.corpus import builtin_text

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
__all__ = ["text_file", "tools"]  # fixtures used here
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "starcoder2"]
MODEL_TYPES.append("llama3-rope")  # Llama 3.1+: RoPE scaled as rope_freqs, active at 256 tokens
VARIANTS = {"llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE})}
# the converter refuses these tiny models' byte-level tokenizer (gemma2 reads only SentencePiece;
# a qwen2 folder's tokenizer loads as transformers' Qwen2Tokenizer, whose own split gives
# SmolLM2's vocabulary a fingerprint the converter does not know): their keys are checked with
# a SentencePiece tokenizer, their llama-quantize files start from lorq's F32 export
NO_CONVERTER = {"gemma2", "qwen2"}
# describe the file or its source folder, not the model: the converter's own choices
FILE_KEYS = ("general.name", "general.size_label", "general.file_type", "tokenizer.ggml.pre")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = builtin_path("smollm2")
    return AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def source_folder(model_type: str, folder: Path):
    """A tiny random model saved as transformers saves it, weights large enough that its
    next-token distribution is far from uniform (a wrong weight shows in perplexity)."""
    tokenizer = smollm2_tokenizer()
    model_type, fields = VARIANTS.get(model_type, (model_type, {}))
    model = tiny_arch(model_type, vocab_size=len(tokenizer), initializer_range=0.1, **fields)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if model_type == "phi3":  # the converter takes phi3's BPE vocabulary from this class only
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "GPT2Tokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return model, tokenizer


def llama_cpp_source() -> Path:
    """The llama.cpp source tree the tools were built from (its CMake cache says)."""
    tools = os.environ.get("LORQ_LLAMA_CPP") or Path.home() / ".cache/lorq-llama.cpp/build/bin"
    cache = Path(tools).parent / "CMakeCache.txt"
    line = next(x for x in cache.read_text().splitlines() if x.startswith("CMAKE_HOME_DIRECTORY"))
    return Path(line.split("=", 1)[1])


def convert(folder: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on ``folder`` (F32), with its own gguf-py."""
    source = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder)]
    command += ["--outfile", str(out), "--outtype", "f32"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def lorq_export(model, tokenizer, out: Path) -> Path:
    params = dict(model.named_parameters())
    return write_gguf(out, {}, params, model.config.to_dict(), tokenizer=tokenizer)


def fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def sentencepiece_folder(model_type: str, folder: Path):
    """A tiny random model with a SentencePiece tokenizer.model (400 pieces, trained here on the
    built-in evaluation text): what the converter reads of a gemma2 or qwen2 folder."""
    import io

    import sentencepiece

    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(builtin_text("evaluation")[:50000].splitlines()),
        model_writer=model_file,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    model = tiny_arch(model_type, vocab_size=400)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lorq_writes_every_key_llama_cpp_converter_writes(model_type, tools, tmp_path):
    """Every key of the converter's file, same value (the tokenizer's keys where lorq writes
    the tokenizer itself: byte-level BPE, not NO_CONVERTER's SentencePiece)."""
    if model_type in NO_CONVERTER:
        model, tokenizer = sentencepiece_folder(model_type, tmp_path / "hf"), None
    else:
        model, tokenizer = source_folder(model_type, tmp_path / "hf")
    theirs = fields(convert(tmp_path / "hf", tmp_path / "theirs.gguf"))
    ours = fields(lorq_export(model, tokenizer, tmp_path / "ours.gguf"))
    for key, value in theirs.items():
        if key in FILE_KEYS or (tokenizer is None and key.startswith("tokenizer.")):
            continue
        assert key in ours, key
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert ours[key] == value, key
    if model_type == "llama3-rope":  # RoPE's divisors: the converter's tensor, value for value
        from gguf import GGUFReader

        def divisors(path):
            tensor = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
            return torch.from_numpy(tensor.data.copy())

        theirs_freqs = divisors(tmp_path / "theirs.gguf")
        torch.testing.assert_close(divisors(tmp_path / "ours.gguf"), theirs_freqs)


def quantize(tools: Path, source: Path, out: Path, kind: str = "Q4_K_M") -> Path:
    done = subprocess.run(
        [str(tools / "llama-quantize"), str(source), str(out), kind], capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lorq_reads_llama_quantize_mixed_files_as_llama_cpp_runs_them(
    model_type, tools, text_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    model, tokenizer = source_folder(model_type, tmp_path / "hf")
    if model_type in NO_CONVERTER:
        source = lorq_export(model, tokenizer, tmp_path / "f32.gguf")
    else:
        source = convert(tmp_path / "hf", tmp_path / "f32.gguf")
    path = quantize(tools, source, tmp_path / "q.gguf")
    packed = read_gguf_quantized(path)
    assert len({q.config.name for q in packed.values()}) >= 2  # a mix of types
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    for module, q in packed.items():
        assert torch.equal(q.dequantize(), dense.get_submodule(module).weight), module
    ours = lorq_perplexity(load_packed(path), tokenizer, text_file)
    theirs = llama_perplexity(tools, path, text_file)
    print(f"{model_type}: lorq {ours:.3f}, llama.cpp {theirs:.3f}")
    assert ours == pytest.approx(theirs, rel=TOLERANCE)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_llama_cpp_runs_lorq_base_and_adapter_of_every_architecture(
    model_type, tools, text_file, tmp_path
):
    model, tokenizer = source_folder(model_type, tmp_path / "hf")
    lorq.compress(model, lorq.CompressConfig(method="loftq", quant="q4_k", rank=8, iters=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a clearly visible adapter: B well away from LoftQ's fit
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    export_gguf(model, tmp_path / "m.gguf", tokenizer, dtype="fp32")
    ours = lorq_perplexity(model, tokenizer, text_file)
    with_adapter = llama_perplexity(tools, tmp_path / "m.gguf", text_file, tmp_path / "m.lora.gguf")
    base_only = llama_perplexity(tools, tmp_path / "m.gguf", text_file)
    print(
        f"{model_type}: lorq {ours:.3f}, llama.cpp + lora {with_adapter:.3f}, base {base_only:.3f}"
    )
    assert with_adapter == pytest.approx(ours, rel=TOLERANCE)
    assert abs(with_adapter - ours) < abs(base_only - ours) / 4
