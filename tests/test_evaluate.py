"""evaluate_model. Oracles: a direct cross-entropy computation and KL identities."""

import pytest
import torch

import lorq.evaluation.logits
from lorq.evaluation.measure import evaluate_model


def test_perplexity_equals_cross_entropy(llama):
    blocks = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    result = evaluate_model(llama, blocks, batch_size=2)
    with torch.no_grad():
        logits = llama(blocks).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), blocks[:, 1:].reshape(-1))
    assert abs(result.perplexity - float(ce.exp())) < 1e-3 * result.perplexity
    assert result.tokens == 5 * 15 and result.kl is None


def test_kl_to_itself_is_zero_and_positive_otherwise(llama):
    from conftest import tiny_llama

    blocks = torch.randint(0, 128, (3, 16))
    assert abs(evaluate_model(llama, blocks, llama).kl) < 1e-6
    assert evaluate_model(tiny_llama(seed=1), blocks, llama).kl > 0.01


@pytest.mark.parametrize("chunk", [48, 4096], ids=["three-vocab-slices", "one-slice"])
def test_kl_equals_torch_kl_div_across_vocabulary_slices(llama, chunk, monkeypatch):
    """Oracle: torch's log_softmax, kl_div and cross_entropy over the whole vocabulary at once;
    with 48 columns per slice the 128-token vocabulary takes two whole slices and a partial one."""
    from conftest import tiny_llama

    monkeypatch.setattr(lorq.evaluation.logits, "VOCAB_CHUNK", chunk)
    other = tiny_llama(seed=1)
    blocks = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    result = evaluate_model(other, blocks, llama)
    with torch.no_grad():
        logp = torch.log_softmax(other(blocks).logits, -1).reshape(-1, 128)
        ref = torch.log_softmax(llama(blocks).logits, -1).reshape(-1, 128)
    expected = torch.nn.functional.kl_div(logp, ref, reduction="sum", log_target=True) / 300
    assert abs(result.kl - float(expected)) < 1e-5 * float(expected)
    ce = torch.nn.functional.cross_entropy(
        logp.view(2, 150, 128)[:, :-1].reshape(-1, 128), blocks[:, 1:].reshape(-1)
    )
    assert abs(result.perplexity - float(ce.exp())) < 1e-4 * result.perplexity


def test_output_layer_is_restored(llama):
    head = llama.get_output_embeddings()
    blocks = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = llama(blocks).logits
    evaluate_model(llama, blocks, llama)
    assert llama.get_output_embeddings() is head
    with torch.no_grad():
        assert torch.equal(llama(blocks).logits, before)


def test_forward_keeps_no_key_value_cache(llama):
    """Oracle: the model's own call; evaluation runs each block once and needs no cache."""
    from lorq.evaluation.measure import _forward

    blocks = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        out = _forward(llama, blocks)
        assert out.past_key_values is None
        assert llama(blocks).past_key_values is not None  # what the cache-free call avoids
        assert torch.equal(out.logits, llama(blocks).logits)
