"""The closed-form low-rank step for a group-pooled adapter (QA-LoRA init; docs/algorithms.md §5).

QA-LoRA's adapter is constant within each group of G inputs: its dense form is Z·P with
Z = s·B·A (out × g, g = in/G) and the pooling P (g × in), P[k, j] = 1/G for j in group k. Given
Q, the best Z of rank r in the H-norm (H_λ = L·Lᵀ, in × in) solves

    min_Z ‖(R − Z·P)·L‖²_F = tr((R − Z·P) H_λ (R − Z·P)ᵀ)          R = W − Q (out × in)

which is a problem in the pooled space: with H_p = P H_λ Pᵀ = L_p·L_pᵀ (g × g) and C = R H_λ Pᵀ,

    ‖(R − Z·P)·L‖² = const + ‖(Z − Z*)·L_p‖²,     Z* = C·H_p⁻¹
    Z = svd_r(Z*·L_p)·L_p⁻¹ = svd_r(C·L_p⁻ᵀ)·L_p⁻¹                (Eckart–Young, exactly)

H_λ Pᵀ and P H_λ Pᵀ are group means of H's columns and rows: P is never formed.
"""

from __future__ import annotations

import torch

from lorq.decomposition.svd import LowRank, split_factors, truncated_svd

SMALLEST = 1e-6  # components below this fraction of the largest singular value are not returned


def pooled_low_rank(
    residual: torch.Tensor,
    chol: torch.Tensor,
    group: int,
    rank: int,
    scaling: float,
    method: str = "exact",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_B (out × k), lora_A (k × in/G)) with s·B·A·P the best rank-k group-pooled D for
    ``residual`` R (out × in) in the norm of H_λ = chol·cholᵀ; k ≤ min(rank, out, in/G), fewer
    when R has fewer components (none for R = 0: the caller keeps LoRA's own init there)."""
    size = residual.shape[1]
    groups = size // group
    hessian = chol @ chol.T
    h_pooled_right = hessian.view(size, groups, group).mean(-1)  # H_λ Pᵀ (in × g)
    h_pooled = h_pooled_right.view(groups, group, groups).mean(1)  # P H_λ Pᵀ (g × g)
    lower = torch.linalg.cholesky(h_pooled)
    c = residual @ h_pooled_right  # (out × g)
    m = torch.linalg.solve_triangular(lower.T, c, upper=True, left=False)  # C·L_p⁻ᵀ
    k = min(rank, *m.shape)
    low = truncated_svd(m, k, method if 4 * (k + 10) <= min(m.shape) else "exact", generator)
    k = int((low.S[:1] * SMALLEST < low.S).sum())  # a zero residual has no component to fit
    vh = torch.linalg.solve_triangular(lower, low.Vh[:k], upper=False, left=False)
    return split_factors(LowRank(low.U[:, :k], low.S[:k], vh), scaling)
