"""Block-wise recovery of the formats' stored scales (``recover_scales``, lorq.nn.scales).

Oracles: the loss the recovery reports is the loss of the block decoded from its buffers the
ordinary way (what is evaluated is what is stored); the codes never change (byte for byte) while
the scales do; scales alone lower the loss of a block with no factors (method plain); a model
saved and loaded again gives the in-memory model's logits exactly; the GGUF file carries the
trained ``d`` (lorq's reader byte for byte, transformers' GGUF loader to the decoded weights).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama
from test_block import first_block_inputs, model, tokens
from test_cli import run, tiny_dir  # noqa: F401  (the module-scoped fixture)

import lorq
from lorq.calibrate.blocks import run_block
from lorq.config import CompressConfig
from lorq.nn import QuantLinear
from lorq.quant import QuantizedTensor
from lorq.recovery.block import block_loss, recover_block

CONFIG = CompressConfig(quant="q4_0", rank=4, iters=1, recover="block", recover_scale_lr=1e-2)


def packed_layers(module) -> dict[str, QuantLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def compressed_first_block(config: CompressConfig):
    m = model()
    inputs = first_block_inputs(m)
    target = run_block(m.model.layers[0], inputs)
    lorq.compress(m, replace(config, recover="none"), tokens())
    return m.model.layers[0], inputs, target


def frozen_bytes(q) -> torch.Tensor:
    """What recovery must not touch: NF's codes, a GGUF block's bytes but its fp16 fields."""
    if q.config.FORMAT == "nf":
        return q.buffers["codes"]
    block = q.config.block_type
    fields = [at + i for _, at in block.fields for i in (0, 1)]
    return q.buffers["blocks"].view(-1, block.nbytes)[
        :, [i for i in range(block.nbytes) if i not in fields]
    ]


@pytest.mark.parametrize("quant", ["q4_0", "nf3", "q5_1"])
def test_trained_scales_are_the_stored_ones_and_the_codes_stay(quant):
    block, inputs, target = compressed_first_block(replace(CONFIG, quant=quant))
    before = {n: m.q for n, m in packed_layers(block).items()}
    before = {n: QuantizedTensor(q.config, q.shape, {k: t.clone() for k, t in q.buffers.items()})
              for n, q in before.items()}  # fmt: skip
    done = recover_block(block, inputs, target, steps=20, lr=1e-3, batch=4, scales=10.0)
    assert done.kept and done.after < done.before
    with torch.no_grad():
        assert float(block_loss(block, inputs, target)) == pytest.approx(done.after, rel=1e-5)
    assert not [n for n, _ in block.named_parameters() if "trained_" in n]  # detached
    for name, layer in packed_layers(block).items():
        assert torch.equal(frozen_bytes(layer.q), frozen_bytes(before[name])), name
        assert not torch.equal(layer.q.block_scales(), before[name].block_scales()), name


def test_scales_alone_recover_a_block_without_factors():
    """A merged QA-LoRA block: packed layers with no factors; the scales are all it can train."""
    from lorq.jobs.merge import merge_qa_lora

    m = model()
    inputs = first_block_inputs(m)
    target = run_block(m.model.layers[0], inputs)
    lorq.compress(m, replace(CONFIG, method="qa-lora", quant="q4_1", recover="none"), tokens())
    merge_qa_lora(m)
    block = m.model.layers[0]
    assert packed_layers(block) and not [n for n, _ in block.named_parameters() if "lora_" in n]
    without = recover_block(block, inputs, target, steps=20, lr=1e-3, batch=4)
    assert without.steps == 0 and not without.kept  # nothing to train without the scales
    done = recover_block(block, inputs, target, steps=20, lr=1e-3, batch=4, scales=10.0)
    assert done.kept and done.after < done.before


def test_a_diverging_rate_keeps_the_decomposed_scales():
    block, inputs, target = compressed_first_block(CONFIG)
    buffers = {n: b.clone() for n, b in block.named_buffers()}
    done = recover_block(block, inputs, target, steps=5, lr=0.9, batch=4, scales=1000.0)
    assert not done.kept
    for name, buffer in block.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_the_saved_model_is_the_trained_one(tmp_path):
    result = lorq.compress(tiny_llama(), CONFIG, tokens())
    lorq.save(result, tmp_path / "m")
    loaded = lorq.load(tmp_path / "m")
    ids = tokens(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_recovered_scales_reach_the_gguf_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorq.exporters.gguf import export_gguf
    from lorq.io.gguf import read_gguf_quantized

    plain = lorq.compress(tiny_llama(), replace(CONFIG, recover="none"), tokens()).model
    model = lorq.compress(tiny_llama(), CONFIG, tokens()).model
    path = export_gguf(model, tmp_path / "m.gguf")
    read = read_gguf_quantized(path)
    layers, untrained = packed_layers(model), packed_layers(plain)
    for name, layer in layers.items():
        assert torch.equal(read[name].buffers["blocks"], layer.q.buffers["blocks"]), name
        assert not torch.equal(layer.q.buffers["blocks"], untrained[name].q.buffers["blocks"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    theirs = dict(loaded.named_modules())
    for name, layer in layers.items():
        torch.testing.assert_close(
            theirs[name].weight.float(), layer.q.dequantize(), rtol=0, atol=0
        )


def test_too_little_memory_for_the_scales_is_announced_before_work(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """The estimate (a float32 basis per scale, the dense Q and its gradient) against the free
    memory: refused by name, nothing written; without the scales the job goes on."""
    from lorq.pipeline import devices

    monkeypatch.setattr(devices, "available_memory", lambda: 1000)
    args = ["compress", "--model", tiny_dir, "--quant", "q4_0", "--rank", "2", "--eval-blocks",
            "0", "--no-baseline", "--recover", "block", "--recover-steps", "1"]  # fmt: skip
    result = run(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "needs about" in result.output and "--no-recover-scales" in result.output
    assert not (tmp_path / "out").exists()
    assert run(*args, "--no-recover-scales", "--out", tmp_path / "out").exit_code == 0


def test_end_to_end_scales_announce_their_memory_too(tmp_path, monkeypatch):
    from lorq.jobs import recover as job

    model = lorq.compress(tiny_llama(), replace(CONFIG, recover="none"), tokens()).model
    monkeypatch.setattr(job, "free_memory", lambda device: 1000)
    config = lorq.RecoverConfig(steps=1, scales=True)
    with pytest.raises(ValueError, match=r"--scales.*needs about"):
        lorq.recover(model, None, config, tmp_path / "r", teacher="unused")
    assert not (tmp_path / "r").exists()
