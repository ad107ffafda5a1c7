"""Block inputs captured once and run block by block (lorq.calibrate.blocks). Oracles: the whole
model's own forward (the last block's output equals its hidden state), and the storage's file."""

from __future__ import annotations

import torch
from conftest import tiny_causal

from lorq.calibrate.blocks import activation_buffer, capture_inputs, run_block
from lorq.model.skeleton import decoder_blocks


def test_blocks_run_one_by_one_give_the_model_hidden_states(tmp_path):
    """X_0 captured, every block run in turn (X in disk files): the model's own last hidden
    state before the final norm, bit for bit."""
    model = tiny_causal("llama", 0, num_hidden_layers=3)
    tokens = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    blocks = decoder_blocks(model)
    inputs = capture_inputs(model, blocks.modules[0], tokens, torch.device("cpu"), tmp_path)
    assert inputs.hidden.untyped_storage().filename is not None  # a disk-backed buffer
    assert inputs.empty().untyped_storage().filename is not None
    for block in blocks.modules:
        inputs.hidden = run_block(block, inputs, inputs.empty())
    seen = []
    model.model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for i, row in enumerate(tokens):
            model(input_ids=row[None])
            assert torch.equal(inputs.hidden[i], seen[-1][0])
    assert list(tmp_path.iterdir()) == []  # the files are unlinked at once: nothing left behind


def test_an_in_memory_buffer_has_no_file():
    buffer = activation_buffer((2, 3, 4), torch.float32, torch.device("cpu"), None)
    assert buffer.untyped_storage().filename is None
