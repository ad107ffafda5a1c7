"""End-to-end recovery (``lorq recover``; lorq.jobs.recover, lorq.train.distill).

Oracles: the full KL of the next-token distributions to the original on held-out evaluation
blocks, computed here independently (transformers' own model as the teacher, torch's kl_div),
falls after recovery; the recorded evaluations are the top-k KL of the same blocks; a cache made
for another k is refused by name; the inputs are untouched.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorq
from lorq.io.models import builtin_path
from lorq.text.corpus import TextConfig, load_blocks

TRAIN = ["--steps", "10", "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "2",
         "--lr", "2e-3", "--save-every", "5", "--top-k", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA whose next-token distributions are peaked (large weights), so that
    compressing it moves them measurably; a real (MiniLM) tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(builtin_path("minilm"))
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(vocab_size=len(tokenizer), initializer_range=0.2, **sizes)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def held_out_kl(model, original, blocks: torch.Tensor, k: int | None = None) -> float:
    """Mean KL(original ‖ model) over every position but each block's last; with ``k``, of the
    distributions lumped to the original's top-k and the rest (built here by hand)."""
    with torch.no_grad():
        p = torch.softmax(original(input_ids=blocks).logits[:, :-1].double(), -1)
        q = torch.softmax(model(input_ids=blocks).logits[:, :-1].double(), -1)
    if k is not None:
        ids = p.topk(k, -1).indices
        pk, qk = p.gather(-1, ids), q.gather(-1, ids)
        p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
        q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


@pytest.fixture(scope="module")
def compressed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recover") / "compressed"
    result = run("compress", "--model", tiny_dir, "--rank", "4", "--quant", "nf2",
                 "--eval-blocks", "0", "--no-baseline", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_recovery_lowers_the_kl_on_held_out_text(compressed, tiny_dir, tmp_path):
    files = {p: p.read_bytes() for p in compressed.rglob("*") if p.is_file()}
    result = run("recover", compressed, *TRAIN, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "evaluation KL to the original (before → after)" in result.output
    assert files == {p: p.read_bytes() for p in compressed.rglob("*") if p.is_file()}
    record = json.loads((tmp_path / "r" / "lorq.json").read_text())["recover"]
    assert record["teacher"] == {"teacher": str(tiny_dir)} and record["result"]["metric"] == "kl"
    (_, before), (_, after) = record["result"]["evaluations"]
    assert after < before
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    blocks = load_blocks(tokenizer, TextConfig(seq_len=32, max_blocks=2), "evaluation")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    start = held_out_kl(lorq.load(compressed), original, blocks)
    end = held_out_kl(lorq.load(tmp_path / "r"), original, blocks)
    assert end < start
    compressed_model = lorq.load(compressed)
    assert before == pytest.approx(held_out_kl(compressed_model, original, blocks, 16), rel=1e-3)
    assert before <= start  # the lumped KL never exceeds the full one


def test_a_cache_made_for_another_k_is_refused(compressed, tmp_path):
    out = tmp_path / "r"
    assert run("recover", compressed, *TRAIN, "--out", out, "--keep-checkpoints").exit_code == 0
    again = [*TRAIN[:-1], "8"]
    result = run("recover", compressed, *again, "--out", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "was made for another k" in result.output and "Traceback" not in result.output


def test_a_model_without_a_recorded_original_needs_a_teacher(compressed, tmp_path):
    copy = tmp_path / "copy"
    model = lorq.load(compressed)
    model.__dict__["lorq_meta"] = {}
    lorq.save(model, copy, AutoTokenizer.from_pretrained(compressed))
    result = run("recover", copy, *TRAIN, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--teacher" in result.output, result.output


def test_the_library_refuses_a_finetune_config(compressed, tmp_path):
    model = lorq.load(compressed)
    tokenizer = AutoTokenizer.from_pretrained(compressed)
    with pytest.raises(ValueError, match="takes a RecoverConfig"):
        lorq.recover(model, tokenizer, lorq.FinetuneConfig(steps=1), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def packed(model) -> dict:
    return {n: m.q for n, m in model.named_modules() if hasattr(m, "quant_config")}


def test_scales_recover_too_and_the_saved_model_is_the_evaluated_one(
    compressed, tiny_dir, tmp_path
):
    out = tmp_path / "r"
    result = run("recover", compressed, *TRAIN, "--scales", "--scale-lr", "1e-2", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "lorq.json").read_text())["recover"]
    assert record["config"]["scales"] is True
    (_, before), (_, after) = record["result"]["evaluations"]
    assert after < before
    start, end = packed(lorq.load(compressed)), packed(lorq.load(out))
    for name, q in start.items():
        assert torch.equal(end[name].codes, q.codes), name  # the codes never move
        assert not torch.equal(end[name].block_scales(), q.block_scales()), name
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    blocks = load_blocks(tokenizer, TextConfig(seq_len=32, max_blocks=2), "evaluation")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert after == pytest.approx(held_out_kl(lorq.load(out), original, blocks, 16), rel=1e-3)


def test_a_model_without_factors_recovers_its_scales_only_when_asked(tiny_dir, tmp_path):
    compressed, merged = tmp_path / "qa", tmp_path / "merged"
    args = ["--method", "qa-lora", "--quant", "q4_1", "--rank", "4", "--eval-blocks", "0"]
    result = run("compress", "--model", tiny_dir, *args, "--no-baseline", "--out", compressed)
    assert result.exit_code == 0, result.output
    assert run("merge", compressed, "--out", merged).exit_code == 0
    result = run("recover", merged, *TRAIN, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--scales" in result.output, result.output
    assert not (tmp_path / "r").exists()
    result = run("recover", merged, *TRAIN, "--scales", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r" / "lorq.json").read_text())["recover"]
    (_, before), (_, after) = record["result"]["evaluations"]
    assert after < before
