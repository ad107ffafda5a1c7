"""One pipeline: the same settings give the same bytes from every source, into every sink.

Sources: a model in memory (``lorq.compress``), a sharded safetensors checkpoint loaded whole
(``lorq.compress_model(path)``) or read part by part into a directory written as it goes
(``lorq.compress_model(path, config, out)``), a GGUF file loaded packed or read part by part.
Oracle: every tensor of ``lorq.save``'s single file equals, in dtype and value, the same tensor
of the sharded directory (torch.equal), for every method, weighting, rounding, plan and option.
Two processes (torchrun) are in tests/stream/test_stream_faults.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import (
    assert_same_bytes,
    compress_to,
    saved_tensors,
    tied_llama,
    tiny_bert,
    tiny_causal,
    tiny_gpt2,
)
from torch import nn

import lorq
from lorq.config import CompressConfig
from lorq.io.gguf_write import write_gguf

MODELS = {
    "llama": lambda: tiny_causal("llama", 0, num_hidden_layers=3),
    "qwen2": lambda: tiny_causal("qwen2", 1),
    "gpt2": lambda: tiny_gpt2(2),
    "bert": lambda: tiny_bert(3),
}
ALL_LINEARS = (r"\.",)  # every linear layer, the LM head too
CONFIGS = {
    "plain": CompressConfig(method="plain", quant="nf4", rank=4),
    "loftq": CompressConfig(method="loftq", quant="nf3", rank=4, iters=2),
    "lq-act": CompressConfig(method="lq", quant="nf3", rank=4, weighting="activations"),
    "lq-act-original": CompressConfig(
        method="lq", quant="nf3", rank=4, weighting="activations", sequential=False
    ),
    "lq-fisher": CompressConfig(method="lq", quant="nf3", rank=4, weighting="fisher", iters=2),
    "lq-both-gptq": CompressConfig(
        method="lq", quant="nf3", rank=4, weighting="both", rounding="gptq", iters=2
    ),
    "qa-lora": CompressConfig(method="qa-lora", quant="q4_1", rank=4, weighting="activations"),
    "budget": CompressConfig(
        budget=3.0, rank=4, weighting="activations", plan_weighting="fisher", iters=2
    ),
    "embeddings-int8-factors": CompressConfig(
        quant="nf4", rank=4, embeddings="q8_0", factor_bits=8, iters=2
    ),
    "lm-head": CompressConfig(
        quant="nf4", rank=4, weighting="activations", iters=2, include=ALL_LINEARS, exclude=()
    ),
}
CAUSAL_ONLY = ("lq-fisher", "lq-both-gptq", "budget", "lm-head")


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))


def calibration_of(config: CompressConfig):
    return tokens() if config.activations or config.fisher else None


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_source_and_sink_gives_the_same_bytes(tmp_path, family, name):
    config = CONFIGS[name]
    if family == "bert" and name in CAUSAL_ONLY:
        pytest.skip("an encoder has no next-token loss (Fisher) and no LM head")
    MODELS[family]().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    text = calibration_of(config)
    lorq.save(lorq.compress(MODELS[family](), config, text), tmp_path / "memory")
    expected = saved_tensors(tmp_path / "memory")
    compress_to(str(tmp_path / "src"), tmp_path / "written", config, calibration=text)
    assert_same_bytes(expected, saved_tensors(tmp_path / "written"))
    if name in ("plain", "lq-act"):  # the checkpoint loaded whole by the job, then saved
        loaded = lorq.compress_model(
            str(tmp_path / "src"), config, calibration=text, eval_blocks=0, baseline=False
        )
        lorq.save(loaded, tmp_path / "loaded")
        assert_same_bytes(expected, saved_tensors(tmp_path / "loaded"))


def gguf_file(tmp_path, tied: bool = True):
    """A tiny LLaMA as a GGUF file of mixed types: Q4_1 and Q4_0 linears, a Q8_0 embedding."""
    model = tied_llama() if tied else tiny_causal("llama", 4, num_hidden_layers=3)
    layers = {}
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            layers[name] = lorq.quantize(module.weight, "q4_1" if i % 2 else "q4_0")
    layers["model.embed_tokens"] = lorq.quantize(model.model.embed_tokens.weight, "q8_0")
    if not tied:
        layers["lm_head"] = lorq.quantize(model.lm_head.weight, "q8_0")
    dense = {
        n: p
        for n, p in model.named_parameters()
        if n.removesuffix(".weight") not in layers and not n.startswith("lm_head")
    }
    return write_gguf(tmp_path / "m.gguf", layers, dense, model.config.to_dict())


GGUF_CONFIGS = {
    "lq-act": CONFIGS["lq-act"],
    "qa-lora-own-codes": CompressConfig(method="qa-lora", quant="q4_1", rank=4),
    "budget-mb": CompressConfig(
        budget_mb=0.2, candidates="gguf", rank=4, weighting="activations", iters=2
    ),
    "lq-fisher": CONFIGS["lq-fisher"],
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", sorted(GGUF_CONFIGS))
def test_a_gguf_source_read_part_by_part_gives_the_bytes_of_its_packed_load(tmp_path, name, tied):
    """The GGUF file loaded packed and compressed in memory, and read block by block into a
    directory: the same tensors (the file's own codes where QA-LoRA keeps them)."""
    path = gguf_file(tmp_path, tied)
    config = GGUF_CONFIGS[name]
    text = calibration_of(config)
    options = {"calibration": text, "eval_blocks": 0, "baseline": False}
    memory = lorq.compress_model(str(path), config, **options)
    lorq.save(memory, tmp_path / "memory")
    written = lorq.compress_model(str(path), config, tmp_path / "written", **options)
    assert written.model is None and written.path == tmp_path / "written"
    assert_same_bytes(saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "written"))
    assert written.metadata["plan"] == memory.metadata["plan"]
    if name == "qa-lora-own-codes":
        stored = lorq.load(tmp_path / "written")
        source = lorq.io.gguf_model.load_packed(path)
        q = stored.model.layers[0].self_attn.k_proj.q  # a Q4_1 layer of the file
        assert torch.equal(q.codes, source.model.layers[0].self_attn.k_proj.q.codes)


def test_the_sequential_option_changes_only_the_statistics(tmp_path):
    """sequential=True and False differ (block 2's statistics come from compressed or original
    outputs) but each is the same in memory and written as it goes (above); block 1, whose
    inputs are the embeddings either way, is the same under both."""
    config = CONFIGS["lq-act"]
    results = {}
    for sequential in (True, False):
        model = MODELS["llama"]()
        lorq.compress(model, replace(config, sequential=sequential), tokens())
        results[sequential] = model
    first = "model.layers.0.self_attn.q_proj"
    last = "model.layers.2.mlp.down_proj"
    a, b = (results[s].get_submodule(first).lora_B for s in (True, False))
    assert torch.equal(a, b)
    a, b = (results[s].get_submodule(last).lora_B for s in (True, False))
    assert not torch.equal(a, b)
