"""lorq.evaluation.logits: log-likelihood and KL over vocabulary slices.

Oracles: float64 log_softmax / kl_div over the whole vocabulary at once, and nn.Linear itself.
"""

import math

import pytest
import torch
from torch import nn

import lorq.evaluation.logits
from lorq.evaluation.logits import Head, token_sums

GEN = torch.Generator().manual_seed(0)


def reference_sums(logits, ids, ref_logits):
    """Σ −log p(next token) and Σ KL(p_ref ‖ p), in float64, the whole vocabulary at once."""
    logp = torch.log_softmax(logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).sum()
    ref = torch.log_softmax(ref_logits.double(), -1)
    kl = torch.nn.functional.kl_div(logp, ref, reduction="sum", log_target=True)
    return float(nll), float(kl)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_sums_equal_whole_vocabulary_computation(chunk, monkeypatch):
    """Logits spread over ±200 make every slice move the running maximum (the rescaling path)."""
    monkeypatch.setattr(lorq.evaluation.logits, "VOCAB_CHUNK", chunk)
    logits = torch.randn(2, 9, 100, generator=GEN) * 80
    ref_logits = logits + torch.randn(2, 9, 100, generator=GEN) * 3
    ids = torch.randint(0, 100, (2, 9), generator=GEN)
    nll, kl = token_sums(logits, Head(), ids, ref_logits)
    expected_nll, expected_kl = reference_sums(logits, ids, ref_logits)
    assert nll == pytest.approx(expected_nll, rel=1e-6)
    assert kl == pytest.approx(expected_kl, rel=1e-5)
    assert token_sums(logits, Head(), ids) == (pytest.approx(expected_nll, rel=1e-6), 0.0)


def test_given_logits_are_left_unchanged(monkeypatch):
    monkeypatch.setattr(lorq.evaluation.logits, "VOCAB_CHUNK", 3)
    logits = torch.randn(1, 4, 10, generator=GEN)
    ref_logits = torch.randn(1, 4, 10, generator=GEN)
    before = logits.clone(), ref_logits.clone()
    token_sums(logits, Head(), torch.zeros(1, 4, dtype=torch.long), ref_logits)
    assert torch.equal(logits, before[0]) and torch.equal(ref_logits, before[1])


def test_masked_columns(monkeypatch):
    """A column at −inf in both models adds nothing (a whole slice of them included); one at −inf
    only in the model, where the reference gives it mass, makes the KL infinite."""
    monkeypatch.setattr(lorq.evaluation.logits, "VOCAB_CHUNK", 4)
    logits = torch.randn(1, 3, 12, generator=GEN)
    ref_logits = torch.randn(1, 3, 12, generator=GEN)
    ids = torch.tensor([[0, 5, 9]])
    masked, ref_masked = logits.clone(), ref_logits.clone()
    for t in (masked, ref_masked):
        t[..., :4] = float("-inf")  # the whole first slice
        t[..., 10] = float("-inf")
    keep = [4, 5, 6, 7, 8, 9, 11]  # the columns left; tokens 5 and 9 are the 2nd and 6th
    nll, kl = token_sums(masked, Head(), ids, ref_masked)
    expected = reference_sums(logits[..., keep], torch.tensor([[0, 1, 5]]), ref_logits[..., keep])
    assert (nll, kl) == (pytest.approx(expected[0], rel=1e-6), pytest.approx(expected[1], rel=1e-5))
    masked[..., 6] = float("-inf")
    assert math.isinf(token_sums(masked, Head(), ids, ref_masked)[1])


@pytest.mark.parametrize("bias", [False, True])
def test_linear_head_slices_equal_the_layer(bias):
    layer = nn.Linear(8, 30, bias=bias)
    hidden = torch.randn(2, 5, 8, generator=GEN)
    with torch.no_grad():
        whole = layer(hidden)
        assert Head(layer).vocab_size(hidden) == 30
        assert torch.allclose(Head(layer).logits(hidden, slice(10, 25)), whole[..., 10:25])
        ids = torch.randint(0, 30, (2, 5), generator=GEN)
        nll, _ = token_sums(hidden, Head(layer), ids)
        assert nll == pytest.approx(reference_sums(whole, ids, whole)[0], rel=1e-6)
