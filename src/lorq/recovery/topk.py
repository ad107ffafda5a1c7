"""The KL divergence to a teacher kept as its top-k (ALGORITHMS.md §9, end-to-end recovery).

For one position, teacher distribution p and student p̂ over V tokens, T the teacher's k most
likely tokens (k ≤ V) and the rest R = V \\ T lumped into one outcome:

    r  = 1 − Σ_{i∈T} p_i          r̂ = 1 − Σ_{i∈T} p̂_i
    KL_k(p ‖ p̂) = Σ_{i∈T} p_i (log p_i − log p̂_i) + r (log r − log r̂)

KL_k ≤ KL (the chain rule: what is lost is r · KL(p_R/r ‖ p̂_R/r̂) ≥ 0) and KL_k = KL when k = V
(r = 0, the last term vanishes). The teacher is stored per position as log p_T (k, float32), the
token ids T (k, int32) and log r; log r̂ is the log-sum-exp of the student's logits outside T minus
the one over all of V, which stays exact where r̂ is tiny. Shapes: logits (N, V); the teacher's
(N, k) and (N,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_MASS = float("-inf")  # log r when the top-k hold all of the teacher's mass


@dataclass(frozen=True)
class TopK:
    """A teacher's next-token distributions at N positions, as their top-k and the rest."""

    logp: torch.Tensor  # (N, k) float32: log p_i of the k most likely tokens
    ids: torch.Tensor  # (N, k) int32: their token ids
    log_rest: torch.Tensor  # (N,) float32: log of the remaining mass (−inf when none)

    @staticmethod
    def of(logits: torch.Tensor, k: int) -> TopK:
        """The top-k of the distributions softmax(``logits``) (N, V)."""
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        top, ids = logp.topk(min(k, logits.shape[-1]), dim=-1)
        return TopK(top, ids.to(torch.int32), _log_outside(logits, ids))


def _log_outside(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{i∉ids} softmax(logits)_i per row: −inf when ids cover the vocabulary."""
    if ids.shape[-1] == logits.shape[-1]:
        return torch.full(logits.shape[:-1], NO_MASS, device=logits.device)
    masked = logits.scatter(-1, ids.long(), NO_MASS)
    return torch.logsumexp(masked, dim=-1) - torch.logsumexp(logits, dim=-1)


def topk_kl(logits: torch.Tensor, teacher: TopK) -> torch.Tensor:
    """KL_k(p ‖ p̂) per position (N,) of the student's ``logits`` (N, V) against ``teacher``;
    differentiable in ``logits``."""
    logits = logits.float()
    student = torch.log_softmax(logits, dim=-1).gather(-1, teacher.ids.long())
    p = teacher.logp.exp()
    kl = (p * (teacher.logp - student)).sum(-1)
    rest = teacher.log_rest
    has_rest = torch.isfinite(rest)
    if bool(has_rest.any()):
        student_rest = _log_outside(logits, teacher.ids)
        term = rest.exp() * (rest - student_rest)
        kl = kl + torch.where(has_rest, term, torch.zeros_like(term))
    return kl
