"""The CLI. Oracles: exit codes, one-line errors, files written or not, library results."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lorq
from lorq.cli import app
from lorq.io.models import builtin_path

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA saved as a Hugging Face folder with a real (MiniLM) tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin_path("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    path = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_compress_eval_generate(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_dir, "--rank", "4", "--eval-blocks", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "plain NF" in result.output and "lorq lq r=4" in result.output
    words = " ".join(result.output.split())  # the caption wraps at the terminal's width
    assert "On disk: source" in words and "MB, output" in words
    meta = json.loads((out / "lorq.json").read_text())
    assert meta["compress"]["quant"] == "nf3" and meta["evaluation"]["kl"] > 0
    result = run("eval", out, "--eval-blocks", "2")
    assert result.exit_code == 0, result.output
    assert f"{meta['evaluation']['perplexity']:.3f}" in result.output  # same model, same text
    result = run("generate", out, "--prompt", "hello", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output


def test_plan_writes_json_and_png(tiny_dir, tmp_path):
    out = tmp_path / "plan.json"
    result = run("plan", "--model", tiny_dir, "--budget", "3", "--rank", "4", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.exists() and out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text())["budget"] == 3.0


def test_activation_weighted_compress_and_plan(tiny_dir, tmp_path):
    """The flags reach the config and the plan; the report names the weighting."""
    common = ("--model", tiny_dir, "--rank", "2", "--budget", "3", "--calibration-tokens", "256")
    aware = ("--weighting", "activations", "--rounding", "gptq")
    result = run("plan", *common, *aware, "--out", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "activations (output MSE), gptq" in " ".join(result.output.split())
    plan = json.loads((tmp_path / "p.json").read_text())
    assert (plan["weighting"], plan["rounding"]) == ("activations", "gptq")
    out = tmp_path / "out"
    args = ("compress", *common, *aware, "--eval-blocks", "1", "--no-baseline", "--out", out)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "lorq lq r=2 +act (3.0 bits, GPTQ)" in result.output
    meta = json.loads((out / "lorq.json").read_text())
    assert meta["compress"]["weighting"] == "activations" and meta["plan"]["rounding"] == "gptq"
    assert meta["calibration"] == {"source": "builtin", "seq_len": 128, "blocks": 2}
    result = run("plan", *common, "--fisher", "--out", tmp_path / "f.json")  # the alias
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f.json").read_text())["weighting"] == "fisher"
    # no weighting given, a causal LM: Fisher costs for the plan, activation decompositions
    out = tmp_path / "default"
    result = run("compress", *common, "--eval-blocks", "1", "--no-baseline", "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "lorq.json").read_text())
    assert meta["compress"]["weighting"] == "activations" and meta["plan"]["weighting"] == "fisher"
    assert "fisher plan" in result.output


def test_kl_plan(tiny_dir, tmp_path):
    """--plan-weighting kl: the plan's costs are α·t², its table says the KL it predicts (the
    sum of its entries' costs), the JSON keeps α; a compress with it records the weighting."""
    common = ("--model", tiny_dir, "--rank", "2", "--budget", "3", "--calibration-tokens", "256",
              "--seq-len", "64")  # fmt: skip
    result = run("plan", *common, "--plan-weighting", "kl", "--out", tmp_path / "kl.json")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "kl.json").read_text())
    predicted = sum(e["error"] for e in plan["entries"])
    assert plan["weighting"] == "kl" and f"{predicted:.4f}" in result.output
    assert "predicted KL" in result.output
    out = tmp_path / "out"
    result = run("compress", *common, "--plan-weighting", "kl", "--eval-blocks", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lorq.json").read_text())["plan"]["weighting"] == "kl"
    result = run("plan", *common, "--plan-weighting", "kld", "--out", tmp_path / "x.json")
    assert result.exit_code == 2 and "kl" in result.output and not (tmp_path / "x.json").exists()
    short = [*common[:-2], "--seq-len", "128"]  # 2 sequences: too few to measure α on
    result = run("plan", *short, "--plan-weighting", "kl", "--out", tmp_path / "y.json")
    assert result.exit_code == 2 and "gives 2" in result.output, result.output
    assert "--plan-weighting fisher" in result.output and not (tmp_path / "y.json").exists()


def test_plan_embeddings(tiny_dir, tmp_path):
    """--plan-embeddings: the plan's JSON names the table and its entry, the summary shows its
    format, compress --plan packs it; without --plan-weighting kl it is refused (exit 2)."""
    common = ("--model", tiny_dir, "--rank", "2", "--budget", "4", "--calibration-tokens", "256",
              "--seq-len", "64", "--plan-weighting", "kl")  # fmt: skip
    plan = tmp_path / "plan.json"
    result = run("plan", *common, "--plan-embeddings", "--out", plan)
    assert result.exit_code == 0, result.output
    saved = json.loads(plan.read_text())
    entry = next(e for e in saved["entries"] if e["name"] == saved["embedding"])
    assert saved["embedding"] == "model.embed_tokens" and "token embedding" in result.output
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_dir, "--plan", plan, "--rank", "2",
                 "--eval-blocks", "0", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = lorq.load(out).get_input_embeddings()
    assert table.quant_config.to_dict() == entry["config"] and 8 * table.q.nbytes == entry["bits"]
    # one job, its baseline (plain rounding in the plan's formats) measured beside it
    both = ("--plan-embeddings", "--plan-ranks", "0,2", "--eval-blocks", "1")
    result = run("compress", *common, *both, "--out", tmp_path / "out2")
    assert result.exit_code == 0, result.output
    assert "plain NF" in result.output and "kl plan" in result.output
    bad = run("plan", *common[:-2], "--plan-embeddings", "--out", tmp_path / "x.json")
    assert bad.exit_code == 2 and "plan_weighting='kl'" in bad.output, bad.output
    assert not (tmp_path / "x.json").exists()


def test_planned_ranks(tiny_dir, tmp_path):
    """--plan-ranks / --plan-factor-bits: the plan's entries carry their rank and factor bits,
    the table counts them; compress --plan builds exactly those layers; a rank grid larger than
    a matrix, or without a budget, is refused before work (exit 2, nothing written)."""
    common = ("--model", tiny_dir, "--budget", "4", "--plan-ranks", "0,2")
    plan = tmp_path / "plan.json"
    result = run("plan", *common, "--plan-factor-bits", "16,8", "--out", plan)
    assert result.exit_code == 0, result.output
    entries = json.loads(plan.read_text())["entries"]
    assert {e["rank"] for e in entries} <= {0, 2} and "ranks chosen" in result.output
    out = tmp_path / "out"
    result = run(
        "compress", "--model", tiny_dir, "--plan", plan, "--eval-blocks", "0", "--out", out
    )
    assert result.exit_code == 0, result.output
    layers = lorq.nn.packed_linears(lorq.load(out))
    for entry in entries:
        assert getattr(layers[entry["name"]], "rank", 0) == entry["rank"], entry["name"]
    bad = run(
        "plan",
        "--model",
        tiny_dir,
        "--budget",
        "4",
        "--plan-ranks",
        "0,1000",
        "--out",
        tmp_path / "x.json",
    )
    assert bad.exit_code == 2 and "plan rank 1000 must be smaller" in bad.output
    assert not (tmp_path / "x.json").exists() and "Traceback" not in bad.output
    bad = run("compress", "--model", tiny_dir, "--plan-ranks", "0,2", "--out", tmp_path / "y")
    assert bad.exit_code == 2 and "give budget=" in bad.output and not (tmp_path / "y").exists()


def test_compress_with_a_plan_file(tiny_dir, tmp_path):
    """Oracle: compress --budget builds the same plan itself."""
    plan = tmp_path / "plan.json"
    assert (
        run("plan", "--model", tiny_dir, "--budget", "3", "--rank", "2", "--out", plan).exit_code
        == 0
    )
    common = ("compress", "--model", tiny_dir, "--rank", "2", "--eval-blocks", "1", "--no-baseline")
    assert run(*common, "--plan", plan, "--out", tmp_path / "a").exit_code == 0
    assert run(*common, "--budget", "3", "--out", tmp_path / "b").exit_code == 0
    a, b = (json.loads((tmp_path / d / "lorq.json").read_text())["plan"] for d in "ab")
    assert a["entries"] == b["entries"] and a["budget"] == 3.0
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in "ab"]
    assert weights[0] == weights[1]
    one_line_error(run(*common, "--rank", "4", "--plan", plan, "--out", tmp_path / "c"), "rank 2")
    one_line_error(
        run(*common, "--plan", tmp_path / "none.json", "--out", tmp_path / "c"), "not found"
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["compress", "--model", "/no/such/model"], "not found"),
        (["compress", "--quant", "nf5"], "unknown quantization preset 'nf5'"),
        (["compress", "--quant", "nf4", "--budget", "3"], "exactly one of"),
        (["compress", "--budget", "3", "--budget-mb", "90"], "budget=3.0 and budget_mb=90.0"),
        (["plan", "--model", "TINY"], "give --budget (bits/param) or --budget-mb"),
        (
            ["compress", "--model", "TINY", "--budget-mb", "1", "--candidates", "gguf"],
            "not supported yet for a 'WordPiece' tokenizer",
        ),
        (["compress", "--method", "qlora"], "method='qlora'"),
        (["compress", "--rank", "0"], "rank=0"),
        (["compress", "--factor-bits", "4"], "factor_bits=4"),
        (["compress", "--embeddings", "q9"], "unknown quantization preset 'q9'"),
        (["plan", "--budget", "1.0", "--model", "TINY"], "outside the feasible range"),
        (["plan", "--budget", "3", "--candidates", "nf9", "--model", "TINY"], "nf9"),
        (["eval", "/no/such/dir"], "not a lorq model directory"),
        (["quantize-report", "--preset", "nf5"], "nf5"),
    ],
)
def test_bad_input_one_line_exit_2(args, text, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*[str(tiny_dir) if a == "TINY" else a for a in args])
    one_line_error(result, text)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_refuses_foreign_out_dir(tiny_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    one_line_error(run("compress", "--model", tiny_dir, "--out", foreign), "not a lorq model")
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_refuses_existing_lorq_dir_without_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "out"
    args = ("compress", "--model", tiny_dir, "--rank", "2", "--eval-blocks", "1", "--no-baseline")
    assert run(*args, "--out", out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    one_line_error(run(*args, "--out", out), "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    assert run(*args, "--out", out, "--overwrite").exit_code == 0


def test_corrupted_model_dir(tiny_dir, tmp_path):
    out = tmp_path / "out"
    run(
        "compress",
        "--model",
        tiny_dir,
        "--rank",
        "2",
        "--eval-blocks",
        "1",
        "--no-baseline",
        "--out",
        out,
    )
    (out / "lorq.json").write_text("{")
    one_line_error(run("eval", out), "lorq.json is corrupted")


def test_hub_id_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    result = run("compress", "--model", "someone/no-such-model")
    one_line_error(result, "not found locally and the Hugging Face hub is unreachable")
    assert not (tmp_path / "lorq-out").exists()


@pytest.fixture(scope="module")
def lorq_dir(tiny_dir, tmp_path_factory):
    """The tiny LLaMA compressed by the CLI (LQ-LoRA, nf3, r=4)."""
    out = tmp_path_factory.mktemp("lorq") / "model"
    args = ("--rank", "4", "--eval-blocks", "1", "--no-baseline", "--out", out)
    result = run("compress", "--model", tiny_dir, *args)
    assert result.exit_code == 0, result.output
    return out


def test_finetune_merge_export(lorq_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorq.io.native import load

    ft = tmp_path / "ft"
    args = ("--steps", "3", "--seq-len", "32", "--batch-size", "2", "--save-every", "2")
    result = run("finetune", lorq_dir, *args, "--out", ft)
    assert result.exit_code == 0, result.output
    assert "evaluation perplexity" in result.output and not (tmp_path / "ft-checkpoints").exists()
    meta = json.loads((ft / "lorq.json").read_text())
    assert meta["finetune"]["result"]["steps"] == 3 and meta["compress"]["rank"] == 4
    model = load(ft)
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert run("merge", ft, "--out", tmp_path / "merged").exit_code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert run("export", ft, "--format", "peft", "--out", tmp_path / "peft").exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    adapted = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    with torch.no_grad():
        for other in (merged, adapted):
            torch.testing.assert_close(other(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["finetune", "/no/such/dir", "--out", "o"], "not a lorq model directory"),
        (["finetune", "LORQ", "--data", "none.jsonl", "--out", "o"], "not found"),
        (["finetune", "LORQ", "--seq-len", "4096", "--out", "o"], "above the model's limit"),
        (["finetune", "LORQ", "--steps", "0", "--out", "o"], "steps=0"),
        (["merge", "LORQ", "--out", "o", "--dtype", "fp8"], "dtype='fp8'"),
        (["merge", "/no/such/dir", "--out", "o"], "not a lorq model directory"),
        (["export", "LORQ", "--out", "o", "--format", "onnx"], "'onnx' is not supported"),
        (["export", "LORQ", "--out", "o", "--format", "bnb"], "needs bitsandbytes 4-bit codes"),
        (["compress", "--model", "LORQ", "--out", "o"], "is a lorq model (already compressed)"),
    ],
)
def test_adapt_bad_input_one_line_exit_2(args, text, lorq_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in lorq_dir.iterdir()}
    result = run(*[str(lorq_dir) if a == "LORQ" else a for a in args])
    one_line_error(result, text)
    assert list(tmp_path.iterdir()) == []  # nothing written, no checkpoint folder either
    assert {p.name: p.read_bytes() for p in lorq_dir.iterdir()} == before  # input untouched


def test_qa_lora_compress_finetune_merge_export(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorq.io.native import load

    qa, ft, merged = tmp_path / "qa", tmp_path / "ft", tmp_path / "merged"
    args = ("--method", "qa-lora", "--quant", "q4_1", "--rank", "4", "--eval-blocks", "1")
    result = run("compress", "--model", tiny_dir, *args, "--out", qa)
    assert result.exit_code == 0, result.output
    assert "qa-lora" in result.output and "plain NF" not in result.output
    train = ("--steps", "2", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2")
    assert run("finetune", qa, *train, "--out", ft).exit_code == 0
    result = run("merge", ft, "--out", merged)
    assert result.exit_code == 0, result.output
    assert "share of the adapter lost" in result.output
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        expected, after_merge = load(ft)(input_ids=ids).logits, load(merged)(input_ids=ids).logits
    torch.testing.assert_close(after_merge, expected, rtol=1e-2, atol=2e-3)  # fp16 mins
    assert run("export", ft, "--format", "peft", "--out", tmp_path / "peft").exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    adapted = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    one_line_error(run("merge", merged, "--out", tmp_path / "again"), "already merged")
    one_line_error(run("merge", ft, "--out", tmp_path / "again", "--mins", "fp8"), "'fp8'")
    exact = tmp_path / "exact"
    assert run("merge", ft, "--out", exact, "--mins", "fp32").exit_code == 0
    with torch.no_grad():  # fp32 mins: the merge is exact to float32 rounding
        torch.testing.assert_close(
            load(exact)(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4
        )
    gguf = ("--format", "gguf", "--out", tmp_path / "m.gguf")
    # unmerged: base + llama.cpp adapter, merged: one file; both need a BPE tokenizer (BERT's here)
    one_line_error(run("export", ft, *gguf), "'WordPiece' tokenizer")
    one_line_error(run("export", merged, *gguf), "'WordPiece' tokenizer")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.lora.gguf").exists()
    assert not (tmp_path / "again").exists()


def test_qa_lora_gptq_export(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    qa, merged = tmp_path / "qa", tmp_path / "merged"
    args = ("--method", "qa-lora", "--quant", "int4-g32", "--gptq", "--rank", "4")
    result = run("compress", "--model", tiny_dir, *args, "--eval-blocks", "1", "--out", qa)
    assert result.exit_code == 0, result.output
    assert "GPTQ" in result.output
    assert run("merge", qa, "--out", merged).exit_code == 0
    result = run("export", merged, "--format", "gptq", "--out", tmp_path / "gptq")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["bits"] == 4
    names = load_file(tmp_path / "gptq" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in names


def test_kl_plan_memory_is_announced_before_work(tiny_dir, tmp_path, monkeypatch):
    """The probes' hidden states (targets × 4 sequences × L × d) and two outputs against the free
    memory: refused by name with what to do instead, exit 2, nothing written."""
    from transformers import AutoConfig

    from lorq.pipeline import devices
    from lorq.pipeline.guards import sensitivity_bytes

    monkeypatch.setattr(devices, "available_memory", lambda: 1000)
    args = ["plan", "--model", tiny_dir, "--rank", "2", "--budget", "3", "--plan-weighting", "kl"]
    result = run(*args, "--calibration-tokens", "256", "--out", tmp_path / "p.json")
    assert result.exit_code == 2, result.output
    assert "sensitivity probes" in result.output and "--plan-weighting fisher" in result.output
    assert not (tmp_path / "p.json").exists()

    class Skeleton:  # the estimate from the config: 14 targets, 2 × 128 tokens, d, V
        config = AutoConfig.from_pretrained(tiny_dir)

    width, vocab = Skeleton.config.hidden_size, Skeleton.config.vocab_size
    tokens = torch.zeros(2, 128, dtype=torch.long)
    assert sensitivity_bytes(Skeleton(), 14, tokens) == 4 * 256 * (14 * width + 2 * vocab)
