"""The Fisher, block by block (lorq.calibrate.fisher, through lorq.estimate_fisher), against a
whole-model autograd estimate (tests/oracles.py): the same numbers, bit for bit, on three
architectures, with an LM head among the targets, and on a packed GGUF model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_causal, tiny_gpt2
from oracles import fisher_whole_model

from lorq.jobs.statistics import estimate_fisher
from lorq.model.targets import find_targets

MODELS = {
    "llama": lambda: tiny_causal("llama", 0, num_hidden_layers=3),
    "qwen2": lambda: tiny_causal("qwen2", 2),
    "gpt2": lambda: tiny_gpt2(1),
}


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_blockwise_fisher_equals_the_whole_model_fisher(family):
    model = MODELS[family]()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # an untied LM head too: its F comes from the top (a tied one's would mix in the embedding's)
    targets = find_targets(model, exclude=(r"lm_head",) if tied else ())
    assert tied or any(name.endswith("lm_head") for name in targets)
    expected = fisher_whole_model(model, tokens(), targets)
    got = estimate_fisher(model, tokens(), targets)
    assert list(got) == list(targets)
    for name in targets:
        assert torch.equal(got[name], expected[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_a_packed_model_is_differentiated_through_its_decoded_weights():
    """QuantLinear layers (a GGUF's codes) are decoded for the Fisher: F equals the one of the
    same model with those weights dense, and the packed layers are back afterwards."""
    import lorq
    from lorq.nn import QuantLinear

    dense = MODELS["llama"]()
    packed = MODELS["llama"]()
    for name, module in find_targets(packed).items():
        q = lorq.quantize(module.weight.detach(), "q4_1")
        parent, _, leaf = name.rpartition(".")
        setattr(packed.get_submodule(parent), leaf, QuantLinear(q))
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(q.dequantize())
    got = estimate_fisher(packed, tokens())
    expected = fisher_whole_model(dense, tokens(), find_targets(dense))
    for name, f in expected.items():
        assert torch.equal(got[name], f), name
    assert all(isinstance(m, QuantLinear) for m in find_targets(packed).values())
