"""The block-wise Fisher (lorq.calibrate.fisher) against the whole-model estimate
(lorq.fisher.estimate_fisher): the same numbers, here bit for bit, on three architectures."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal, tiny_gpt2

from lorq.calibrate.blocks import capture_inputs
from lorq.calibrate.fisher import blockwise_fisher
from lorq.fisher import estimate_fisher
from lorq.stream.skeleton import decoder_blocks
from lorq.surgery import find_targets

MODELS = {
    "llama": lambda: tiny_causal("llama", 0, num_hidden_layers=3),
    "qwen2": lambda: tiny_causal("qwen2", 2),
    "gpt2": lambda: tiny_gpt2(1),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_blockwise_fisher_equals_the_whole_model_fisher(family):
    model = MODELS[family]()
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model)
    expected = estimate_fisher(model, tokens, targets)
    blocks = decoder_blocks(model)
    inputs = capture_inputs(model, blocks.modules[0], tokens, torch.device("cpu"))
    got: dict[str, torch.Tensor] = {}
    order: list[int] = []

    def of_block(b: int):
        return {n: m for n, m in targets.items() if blocks.index_of(n) == b}

    def store(b: int, fisher: dict[str, torch.Tensor]) -> None:
        order.append(b)
        got.update(fisher)

    steps = (lambda b: None, lambda b: None, lambda: None)
    blockwise_fisher(model, blocks.modules, of_block, inputs, tokens, steps, store)
    assert order == list(reversed(range(len(blocks))))  # the backward pass runs top down
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0)
    assert all(m.weight.grad is None for m in targets.values())  # no gradient left behind
