"""The KL to a top-k teacher (lorq.recovery.topk).

Oracles: with k = V it is the full KL computed independently (torch.nn.functional.kl_div on
float64); with k < V it is the KL of the lumped (k + 1)-outcome distributions built by hand, and
never above the full KL; its gradient matches the finite difference of its own value.
"""

from __future__ import annotations

import pytest
import torch

from lorq.recovery.topk import TopK, topk_kl


def logits(n: int = 6, v: int = 50, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(teacher.double(), -1)
    q = torch.log_softmax(student.double(), -1)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)


def test_with_every_token_it_is_the_full_kl():
    t, s = logits(), logits(seed=1)
    got = topk_kl(s, TopK.of(t, t.shape[-1]))
    assert torch.allclose(got.double(), full_kl(t, s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_is_the_kl_of_the_lumped_distributions(k):
    t, s = logits(), logits(seed=1)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    lumped_p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    lumped_q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    expected = (lumped_p * (lumped_p.log() - lumped_q.log())).sum(-1)
    got = topk_kl(s, TopK.of(t, k)).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert bool((got <= full_kl(t, s) + 1e-6).all())


def test_it_is_zero_for_the_teacher_itself_and_differentiable():
    t = logits()
    assert float(topk_kl(t, TopK.of(t, 8)).abs().max()) < 1e-5
    s = logits(seed=1).requires_grad_(True)
    teacher = TopK.of(t, 8)
    topk_kl(s, teacher).sum().backward()
    for column in (int(teacher.ids[2, 0]), int(s[2].argmax())):  # a top-k token, the student's
        step = torch.zeros_like(s)
        step[2, column] = 1e-2
        with torch.no_grad():
            change = topk_kl(s + step, teacher).sum() - topk_kl(s - step, teacher).sum()
        assert float(s.grad[2, column]) == pytest.approx(float(change) / 2e-2, rel=2e-2)
