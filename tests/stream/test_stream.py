"""Compression written as it goes (``lorq.compress_model(..., out)``: a safetensors checkpoint
read part by part into a sharded directory) against the same job in memory.

Oracles: the in-memory ``lorq.compress`` + ``lorq.save`` (every tensor's bytes equal, with and
without block-sequential statistics), a whole-model Hessian estimate on the compressed-so-far
model (block-sequential statistics), and ``lorq.load`` of the sharded directory.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import (
    assert_same_bytes,
    compress_to,
    low_rank_llama,
    saved_tensors,
    tiny_bert,
    tiny_causal,
    tiny_gpt2,
)
from safetensors.torch import load_file

import lorq
from lorq.config import CompressConfig
from lorq.jobs.compress import compress
from lorq.jobs.statistics import estimate_hessians
from lorq.model.targets import targets_of
from lorq.pipeline.writer import MANIFEST_FILE

PLAIN = CompressConfig(method="lq", quant="nf4", rank=4)
GPTQ_ACT = CompressConfig(
    method="lq", quant="nf3", rank=4, weighting="activations", rounding="gptq"
)
MODELS = {
    "llama": lambda: tiny_causal("llama", 0, num_hidden_layers=3),
    "qwen2": lambda: tiny_causal("qwen2", 1),
    "gpt2": lambda: tiny_gpt2(2),
    "bert": lambda: tiny_bert(3),
}


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))


def in_memory(model, config, folder, calibration=None) -> dict[str, torch.Tensor]:
    lorq.save(compress(model, config, calibration), folder)
    return load_file(folder / "model.safetensors")


FISHER = CompressConfig(method="lq", quant="nf3", rank=4, weighting="both", rounding="gptq")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fisher_weighted_streaming_equals_in_memory(tmp_path, family):
    """The block-wise Fisher (forward, then backward block by block) weighs the decomposition
    exactly as the whole-model estimate does: every tensor equal to the in-memory job's."""
    MODELS[family]().save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), tmp_path / "out", FISHER, calibration=tokens(), device="cpu")
    expected = in_memory(MODELS[family](), FISHER, tmp_path / "mem", tokens())
    assert_same_bytes(expected, saved_tensors(tmp_path / "out"))
    assert not (tmp_path / "out" / ".fisher").exists()  # scratch removed when finished


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize(
    "config",
    [PLAIN, GPTQ_ACT, replace(GPTQ_ACT, sequential=False)],
    ids=["nf4", "nf3-gptq-act", "nf3-gptq-act-not-sequential"],
)
def test_streaming_equals_in_memory(tmp_path, family, config):
    """Every tensor of the directory written as it goes has the in-memory job's bytes, from a
    sharded checkpoint, with block-sequential statistics or the original model's."""
    MODELS[family]().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    calibration = tokens() if config.activations else None
    streamed = compress_to(
        str(tmp_path / "src"), tmp_path / "out", config, calibration=calibration, device="cpu"
    )
    expected = in_memory(MODELS[family](), config, tmp_path / "mem", calibration)
    assert_same_bytes(expected, saved_tensors(tmp_path / "out"))
    assert streamed.reused == ()
    loaded = lorq.load(tmp_path / "out")  # the sharded directory loads
    reference = lorq.load(tmp_path / "mem")
    ids = tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids)[0], reference(input_ids=ids)[0])


def test_sequential_hessians_match_the_compressed_so_far_model(tmp_path):
    """Block b's H is what a whole model made of compressed blocks < b and original blocks ≥ b
    gives (estimate_hessians on that model)."""
    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    seen = {}
    compress_to(
        str(tmp_path / "src"), tmp_path / "out", GPTQ_ACT, calibration=tokens(), device="cpu",
        on_statistics=lambda block, h: seen.update({n: h[n].clone() for n in h}),
    )  # fmt: skip
    compressed = lorq.load(tmp_path / "out")
    for block in range(3):
        hybrid = tiny_causal("llama", 0, num_hidden_layers=3)
        for earlier in range(block):
            hybrid.model.layers[earlier] = compressed.model.layers[earlier]
        targets = {
            n: m for n, m in targets_of(hybrid, GPTQ_ACT).items()
            if n.startswith(f"model.layers.{block}.")
        }  # fmt: skip
        reference = estimate_hessians(hybrid, tokens(), targets)
        for name in targets:
            torch.testing.assert_close(seen[name], reference[name], rtol=1e-5, atol=1e-6)
    # the first block sees the original model either way; later ones see compressed outputs
    plain = tiny_causal("llama", 0, num_hidden_layers=3)
    name = "model.layers.2.mlp.down_proj"
    original = estimate_hessians(plain, tokens(), {name: plain.get_submodule(name)})
    assert not torch.allclose(seen[name], original[name], rtol=1e-3, atol=1e-5)


def test_manifest_records_every_shard(tmp_path):
    """The manifest lists each shard with its size and sha256; lorq.json is written."""
    tiny_causal("llama", 0).save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), tmp_path / "out", PLAIN, device="cpu")
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert sorted(manifest["shards"]) == files
    for name, record in manifest["shards"].items():
        assert record["size"] == (tmp_path / "out" / name).stat().st_size
    assert (tmp_path / "out" / "lorq.json").exists()


BUDGET = CompressConfig(
    method="lq", budget=3.0, rank=4, weighting="activations", plan_weighting="fisher"
)


def test_streamed_budget_plan_equals_in_memory(tmp_path):
    """The cost table built block by block (Fisher-weighted costs from the block-wise Fisher)
    gives the in-memory job's plan, and the compressed tensors are the in-memory job's bytes;
    lorq.plan_model(stream=True) returns the same plan."""
    from lorq.budget import BudgetPlan
    from lorq.pipeline.passes import PLAN_FILE

    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), tmp_path / "out", BUDGET, calibration=tokens(), device="cpu")
    memory = compress(tiny_causal("llama", 0, num_hidden_layers=3), BUDGET, tokens())
    streamed = BudgetPlan.load(tmp_path / "out" / PLAN_FILE)
    assert [e.config for e in streamed.entries] == [e.config for e in memory.plan.entries]
    assert [e.error for e in streamed.entries] == [e.error for e in memory.plan.entries]
    assert len({e.config for e in streamed.entries}) > 1  # a mixed plan, not one preset
    lorq.save(memory, tmp_path / "mem")
    assert_same_bytes(
        load_file(tmp_path / "mem" / "model.safetensors"), saved_tensors(tmp_path / "out")
    )
    alone = lorq.plan_model(
        str(tmp_path / "src"), BUDGET, calibration=tokens(), device="cpu", stream=True
    )
    assert alone.to_dict() == streamed.to_dict()


PLANNED = CompressConfig(
    budget=4.2, candidates="nf2,nf3,nf4", plan_ranks=(0, 4), plan_factor_bits=(16, 8),
    weighting="activations", plan_weighting="fisher",
)  # fmt: skip


def test_streamed_planned_ranks_equal_in_memory_and_resume(tmp_path):
    """A plan of ranks and factor bits (§10.1): streamed from a checkpoint it is the in-memory
    job's plan and bytes; killed after its first block, a resumed run completes the same
    bytes."""
    from lorq.budget import BudgetPlan
    from lorq.pipeline.passes import PLAN_FILE

    low_rank_llama(num_hidden_layers=3).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    compress_to(str(tmp_path / "src"), out, PLANNED, calibration=tokens(), device="cpu")
    memory = compress(low_rank_llama(num_hidden_layers=3), PLANNED, tokens())
    streamed = BudgetPlan.load(out / PLAN_FILE)
    assert streamed.entries == memory.plan.entries
    assert len({e.adapter_label for e in streamed.entries}) > 1  # ranks (or bits) mixed
    lorq.save(memory, tmp_path / "mem")
    expected = load_file(tmp_path / "mem" / "model.safetensors")
    assert_same_bytes(expected, saved_tensors(out))
    (out / "lorq.json").unlink()  # as if killed after the first block's shard
    for shard in sorted(out.glob("model-*.safetensors"))[1:]:
        shard.unlink()
    resumed = compress_to(str(tmp_path / "src"), out, PLANNED, calibration=tokens(), resume=True)
    assert resumed.reused and resumed.computed
    assert_same_bytes(expected, saved_tensors(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_checkpoints_stream_to_the_in_memory_bytes(tmp_path, dtype):
    """A bf16 / fp16 checkpoint: the pass-through tensors are stored as lorq.save stores the
    fp32 model loaded from it (narrowed to the first exact 16-bit dtype), without fp32 copies."""
    model = tiny_causal("llama", 0).to(dtype)
    model.save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), tmp_path / "out", PLAIN, device="cpu")
    reference = tiny_causal("llama", 0)  # what from_pretrained(dtype=fp32) loads from the file
    for param in reference.parameters():
        param.data = param.data.to(dtype).float()
    expected = in_memory(reference, PLAIN, tmp_path / "mem")
    assert_same_bytes(expected, saved_tensors(tmp_path / "out"))
    stored = saved_tensors(tmp_path / "out")["model.embed_tokens.weight"].dtype
    assert stored in (torch.bfloat16, torch.float16)


def test_activations_offloaded_to_disk_give_the_same_bytes(tmp_path):
    """X (and the Fisher pass's stored X_b) in disk files: the same directory as in memory."""
    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    for offload in (False, True):
        compress_to(
            str(tmp_path / "src"), tmp_path / f"out{offload}", FISHER, calibration=tokens(),
            device="cpu", offload_activations=offload,
        )  # fmt: skip
    assert_same_bytes(saved_tensors(tmp_path / "outFalse"), saved_tensors(tmp_path / "outTrue"))
    assert not (tmp_path / "outTrue" / ".activations").exists()  # scratch removed at the end


KL_BUDGET = CompressConfig(
    method="lq", budget=3.0, rank=4, weighting="activations", plan_weighting="kl"
)


def test_streamed_plan_of_the_table_equals_in_memory(tmp_path):
    """plan_embeddings (§10): the token embedding's α (its probe started at X_0) and row, the
    plan and the packed table streamed from a checkpoint equal the in-memory job's, byte for
    byte; the saved plan names the table."""
    from lorq.budget import BudgetPlan
    from lorq.pipeline.passes import PLAN_FILE

    config = replace(KL_BUDGET, plan_embeddings=True, budget=3.5)
    out = tmp_path / "out"
    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), out, config, calibration=tokens(), device="cpu")
    memory = compress(tiny_causal("llama", 0, num_hidden_layers=3), config, tokens())
    streamed = BudgetPlan.load(out / PLAN_FILE)
    assert streamed.embedding == memory.plan.embedding == "model.embed_tokens"
    assert streamed.sensitivities == memory.plan.sensitivities and len(streamed.entries) == 22
    assert streamed.entries == memory.plan.entries
    lorq.save(memory, tmp_path / "memory")
    assert_same_bytes(saved_tensors(out), saved_tensors(tmp_path / "memory"))
    assert any(k.startswith("model.embed_tokens.q_") for k in saved_tensors(out))


def test_streamed_kl_plan_equals_in_memory_and_resumes_its_sensitivities(tmp_path):
    """A KL plan (§10): the sensitivities measured while streaming (probes carried block by block
    through the checkpoint read part by part) and the plan equal the in-memory job's; they are
    kept beside the plan, and a resumed run that finds them reads them (measures none again)."""
    from lorq.budget import BudgetPlan
    from lorq.pipeline.passes import PLAN_FILE
    from lorq.pipeline.sensitivity import SENSITIVITY_FILE

    out = tmp_path / "out"
    tiny_causal("llama", 0, num_hidden_layers=3).save_pretrained(tmp_path / "src")
    compress_to(str(tmp_path / "src"), out, KL_BUDGET, calibration=tokens(), device="cpu")
    memory = compress(tiny_causal("llama", 0, num_hidden_layers=3), KL_BUDGET, tokens())
    streamed = BudgetPlan.load(out / PLAN_FILE)
    assert streamed.sensitivities == memory.plan.sensitivities
    assert [e.config for e in streamed.entries] == [e.config for e in memory.plan.entries]
    kept = json.loads((out / SENSITIVITY_FILE).read_text())
    assert kept == streamed.sensitivities and len(kept) == 21
    assert len({e.config for e in streamed.entries}) > 1  # a mixed plan
    (out / "lorq.json").unlink()  # as if killed after the sensitivities, before the plan
    (out / PLAN_FILE).unlink()
    for shard in out.glob("model-*.safetensors"):
        shard.unlink()
    doubled = {name: 2 * alpha for name, alpha in kept.items()}
    (out / SENSITIVITY_FILE).write_text(json.dumps(doubled))
    compress_to(str(tmp_path / "src"), out, KL_BUDGET, calibration=tokens(), resume=True)
    assert BudgetPlan.load(out / PLAN_FILE).sensitivities == pytest.approx(doubled)
