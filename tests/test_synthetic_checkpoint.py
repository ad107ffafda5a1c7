"""bench/synthetic.py: the tiny synthetic LLaMA checkpoint is what transformers' loader reads."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[1] / "bench" / "synthetic.py"


@pytest.fixture(scope="module")
def synthetic():
    spec = importlib.util.spec_from_file_location("bench_synthetic", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return tensors


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_loads_in_transformers_with_the_shards_tensors(synthetic, tmp_path):
    from transformers import AutoModelForCausalLM

    written = synthetic.write_llama_checkpoint(tmp_path, "tiny", shard_bytes=3 * 1024**2)
    assert len(written["files"]) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = model.state_dict()
    tensors = shard_tensors(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    names = [name for name, _ in synthetic.tensor_shapes(synthetic.SHAPES["tiny"])]
    assert list(state) == names
    assert set(tensors) == set(names)
    assert model.dtype == torch.bfloat16
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(state[name], tensor), name
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()


def test_index_names_every_tensor_and_its_bytes(synthetic, tmp_path):
    written = synthetic.write_llama_checkpoint(tmp_path, "tiny", shard_bytes=3 * 1024**2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = shard_tensors(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert sorted(set(index["weight_map"].values())) == written["files"]
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert name in f.keys()  # noqa: SIM118
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False


def test_same_seed_same_bytes_other_seed_other_weights(synthetic, tmp_path):
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.write_llama_checkpoint(tmp_path / folder, "tiny", seed=seed)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    a, c = shard_tensors(tmp_path / "a"), shard_tensors(tmp_path / "c")
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"]
    )


def test_weights_have_the_documented_scales(synthetic):
    size = (512, 1024)
    weight = synthetic.synthetic_tensor("model.layers.0.mlp.up_proj.weight", size, 0, torch.float32)
    norm = synthetic.synthetic_tensor("model.norm.weight", (1024,), 0, torch.float32)
    columns = weight.pow(2).mean(0).sqrt()
    outliers = synthetic._outlier_columns(0, "model.layers.0.mlp.up_proj.weight", 1024)
    assert len(outliers) == 2
    assert columns[outliers].min() > 3 * columns.median()
    assert 0.015 < columns.median() < 0.03
    assert (norm - 1).abs().max() < 0.3
    shared = synthetic._outlier_columns(0, "model.layers.5.self_attn.q_proj.weight", 1024)
    assert torch.equal(outliers, shared)


def test_a_tokenizer_bigger_than_the_vocabulary_is_refused(synthetic, tmp_path):
    class Big:
        def __len__(self):
            return 49152

    with pytest.raises(ValueError, match="49152 tokens"):
        synthetic.write_llama_checkpoint(tmp_path, "tiny", tokenizer=Big())
