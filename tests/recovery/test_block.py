"""Block-wise recovery (lorq.recovery.block, ``CompressConfig(recover="block")``).

Oracles: the block loss against an independent computation (the block's own forward on each
sequence, a plain mean of squares); a recovery lowers it and a model recovered block by block is
closer to the original on held-out tokens; zero steps gives the bytes of no recovery; the codes and
scales never change (byte for byte); in memory and written block by block give the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import compress_to, tiny_causal
from safetensors.torch import load_file
from test_cli import run, tiny_dir  # noqa: F401  (the module-scoped fixture)

import lorq
from lorq.calibrate.blocks import BlockInputs, capture_inputs, run_block
from lorq.config import CompressConfig
from lorq.recovery.block import block_loss, recover_block

CONFIG = CompressConfig(quant="nf2", rank=4, iters=2, weighting="activations", recover="block")


def tokens(n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def model():
    return tiny_causal("llama", 0, num_hidden_layers=3)


def first_block_inputs(m) -> BlockInputs:
    return capture_inputs(m, m.model.layers[0], tokens(), torch.device("cpu"))


def test_the_block_loss_is_the_mean_squared_output_error():
    m = model()
    inputs = first_block_inputs(m)
    block = m.model.layers[0]
    target = torch.randn_like(inputs.hidden)
    squares, count = 0.0, 0
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(inputs.kwargs):
            y = block(inputs.hidden[i : i + 1], *args, **kwargs)[0]
            squares += float(((y - target[i]) ** 2).sum())
            count += y.numel()
        got = float(block_loss(block, inputs, target))
    assert got == pytest.approx(squares / count, rel=1e-6)


def test_recovery_lowers_the_block_loss_and_leaves_the_codes():
    m = model()
    inputs = first_block_inputs(m)
    target = run_block(m.model.layers[0], inputs)  # the original block's output
    lorq.compress(m, replace(CONFIG, recover="none"), tokens())
    block = m.model.layers[0]
    buffers = {n: b.clone() for n, b in block.named_buffers()}
    done = recover_block(block, inputs, target, steps=30, lr=1e-3, batch=4)
    assert done.kept and done.after < done.before
    assert float(block_loss(block, inputs, target)) == pytest.approx(done.after)
    for name, buffer in block.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_a_diverging_rate_keeps_the_decomposed_factors():
    m = model()
    inputs = first_block_inputs(m)
    target = run_block(m.model.layers[0], inputs)
    lorq.compress(m, replace(CONFIG, recover="none"), tokens())
    block = m.model.layers[0]
    before = [p.clone() for n, p in block.named_parameters() if "lora_" in n]
    done = recover_block(block, inputs, target, steps=5, lr=0.9, batch=4)
    after = [p for n, p in block.named_parameters() if "lora_" in n]
    assert not done.kept
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_zero_steps_is_no_recovery_and_recovery_helps_on_held_out_text():
    plain = model()
    lorq.compress(plain, replace(CONFIG, recover="none"), tokens())
    zero = model()
    lorq.compress(zero, replace(CONFIG, recover_steps=0), tokens())
    zeroed = zero.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, zeroed[name]), name
    recovered = model()
    lorq.compress(recovered, replace(CONFIG, recover_steps=60, recover_lr=1e-3), tokens())
    original, held_out = model(), tokens(4, 16, seed=7)
    with torch.no_grad():
        reference = original(input_ids=held_out).logits

        def error(m):
            return float((m(input_ids=held_out).logits - reference).pow(2).mean())

        assert error(recovered) < error(plain)


@pytest.mark.parametrize("sequential", [True, False])
def test_recovery_in_memory_and_written_block_by_block_give_the_same_bytes(tmp_path, sequential):
    config = replace(CONFIG, sequential=sequential, recover_steps=10)
    model().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    lorq.save(lorq.compress(model(), config, tokens()), tmp_path / "memory")
    compress_to(str(tmp_path / "src"), tmp_path / "written", config, calibration=tokens())
    memory = load_file(tmp_path / "memory" / "model.safetensors")
    written = {}
    for file in sorted((tmp_path / "written").glob("model-*.safetensors")):
        written.update(load_file(file))
    assert sorted(memory) == sorted(written)
    for name, tensor in memory.items():
        assert torch.equal(tensor, written[name]), name


def test_the_cli_recovers_every_block_and_says_so(tiny_dir, tmp_path):  # noqa: F811
    args = ["compress", "--model", tiny_dir, "--rank", "2", "--quant", "nf2", "--eval-blocks",
            "0", "--no-baseline", "--recover", "block", "--recover-steps", "5"]  # fmt: skip
    result = run(*args, "--out", tmp_path / "memory")
    assert result.exit_code == 0, result.output
    assert "block-wise recovery: summed block loss" in result.output
    meta = json.loads((tmp_path / "memory" / "lorq.json").read_text())
    assert sorted(meta["recovery"]) == ["0", "1"]  # tiny_dir has 2 blocks
    for record in meta["recovery"].values():
        assert record["after"] <= record["before"] and record["steps"] == 5
    result = run(*args, "--out", tmp_path / "written", "--stream")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "written" / "lorq.json").read_text())
    assert written["recovery"] == meta["recovery"]


def test_recovery_with_given_hessians_recovers_every_block():
    """Statistics given beforehand: the inputs still flow, for the recovery; the same bytes as
    when the job collects the same H itself (not sequential: H of the original blocks)."""
    from lorq.jobs.statistics import estimate_hessians
    from lorq.model.targets import targets_of

    config = replace(CONFIG, sequential=False, recover_steps=5)
    m = model()
    hessians = estimate_hessians(m, tokens(), targets_of(m, config))
    given = lorq.compress(model(), config, tokens(), hessians=hessians).model
    collected = lorq.compress(model(), config, tokens()).model
    assert sorted(given.lorq_meta["recovery"]) == ["0", "1", "2"]
    mine = collected.state_dict()
    for name, tensor in given.state_dict().items():
        assert torch.allclose(tensor, mine[name], rtol=1e-4, atol=1e-6), name
