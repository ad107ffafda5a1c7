"""Native save/load. Oracles: bit-identical tensors, layer classes and logits after the round trip
(LoRA, QA-LoRA and merged QA-LoRA models); files from before layer kinds; bad files."""

import json

import pytest
import torch
from conftest import tiny_bert, tiny_causal, train_b

from lorq.config import CompressConfig
from lorq.io import load, save
from lorq.io.native import LORQ_FILE, WEIGHTS_FILE
from lorq.jobs.compress import compress
from lorq.jobs.merge import merge_qa_lora
from lorq.nn import QuantLinear


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


CONFIGS = [
    CompressConfig(method="lq", quant="nf3", rank=4),
    CompressConfig(method="loftq", budget=3.0, rank=4, iters=2),
    CompressConfig(method="plain", quant="int4-g32", rank=4),
]
CASES = [("llama", c) for c in CONFIGS] + [
    (name, CONFIGS[0]) for name in ("gpt2", "bert", "mistral", "qwen2", "opt")
]


@pytest.mark.parametrize(("name", "config"), CASES, ids=lambda x: getattr(x, "method", x))
def test_round_trip_is_bit_exact(name, config, tmp_path, request):
    if name in ("llama", "gpt2"):
        model = request.getfixturevalue(name)
    else:
        model = tiny_bert() if name == "bert" else tiny_causal(name)
    compress(model, config)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(outputs(model, ids), outputs(back, ids))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    compress(model, CompressConfig(quant="nf4", rank=2))
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    assert back.lm_head.weight is back.model.embed_tokens.weight


@pytest.fixture
def saved(llama, tmp_path):
    compress(llama, CompressConfig(quant="nf4", rank=4))
    return save(llama, tmp_path / "m")


def test_refuses_foreign_and_existing_dirs(llama, saved, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a lorq model directory"):
        save(llama, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="exists; pass overwrite"):
        save(llama, saved)
    save(llama, saved, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_save_leaves_nothing(llama, tmp_path, monkeypatch):
    compress(llama, CompressConfig(quant="nf4", rank=4))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lorq.io.native.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(llama, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} has the wrong size for lorq.json"):
        load(saved)


@pytest.mark.parametrize("text", ["{broken", "[]", json.dumps({"format": "other"})])
def test_corrupted_json(saved, text):
    (saved / LORQ_FILE).write_text(text)
    with pytest.raises(ValueError, match=LORQ_FILE):
        load(saved)


def test_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a lorq model directory"):
        load(tmp_path)
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load(saved)


def test_save_needs_a_compressed_model(gpt2, tmp_path):
    with pytest.raises(ValueError, match="compress it before saving"):
        save(gpt2, tmp_path / "m")


def assert_same_model(model, back, ids):
    assert torch.equal(outputs(model, ids), outputs(back, ids))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert kinds == {n: type(m) for n, m in back.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", ["int4-g32", "q4_1"])
def test_qa_lora_round_trip_is_bit_exact(name, preset, tmp_path, request):
    model = request.getfixturevalue(name)
    compress(model, CompressConfig(method="qa-lora", quant=preset, rank=4))
    train_b(model)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_same_model(model, back, ids)
    kinds = {
        s["kind"] for s in json.loads((tmp_path / "m" / LORQ_FILE).read_text())["layers"].values()
    }
    assert kinds == {"qa-lora"}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_qa_lora_round_trip_is_bit_exact(name, tmp_path, request):
    model = request.getfixturevalue(name)
    compress(model, CompressConfig(method="qa-lora", rank=4))
    train_b(model)
    merge_qa_lora(model)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_same_model(model, back, ids)
    assert not any(p.requires_grad for p in back.parameters())


def test_files_without_layer_kind_are_refused(saved):
    """Every layer names its kind; a lorq.json without one is not a file lorq wrote."""
    meta = json.loads((saved / LORQ_FILE).read_text())
    for spec in meta["layers"].values():
        assert spec.pop("kind") == "lora"
    (saved / LORQ_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match lorq\.json"):
        load(saved)


def test_unknown_layer_kind(saved):
    meta = json.loads((saved / LORQ_FILE).read_text())
    next(iter(meta["layers"].values()))["kind"] = "dora"
    (saved / LORQ_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="kind 'dora'"):
        load(saved)
