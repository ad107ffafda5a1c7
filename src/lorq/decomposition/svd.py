"""Truncated, randomized and two-sided weighted SVD, and the √Σ split into LoRA factors.

    M (m × n) ≈ U_r Σ_r V_rᵀ                         rank r
    lora_B = U_r √Σ_r / √s   (m × r),  lora_A = √Σ_r V_rᵀ / √s   (r × n)   ⇒   s·B·A = U_r Σ_r V_rᵀ

Randomized (Halko, Martinsson & Tropp, 2011, Alg. 4.4): sketch with k = r + oversampling columns,
``power_iters`` QR-stabilised power iterations, SVD of the small k × n projection. The sketch can be
warm-started from the previous iterate's right singular vectors, which turns the alternating loops
of LoftQ / LQ-LoRA into a continued subspace iteration.

Two-sided weighting (LQ-LoRA §3.2 heuristic): with row weights ρ (m,) and column weights γ (n,),
take svd_r(diag(ρ) M diag(γ)) and divide the factors back by ρ and γ (zero weights → zero rows).

Activation-aware (docs/algorithms.md §5): with H_λ = L·Lᵀ (n × n), the rank-r D minimising
‖diag(ρ)(M − D)·L‖_F is exactly diag(ρ)⁻¹·svd_r(diag(ρ)·M·L)·L⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OVERSAMPLING = 10  # docs/algorithms.md §2.1
POWER_ITERS = 2


@dataclass(frozen=True)
class LowRank:
    """U (m × r), S (r,), Vh (r × n), plus the k right vectors of the sketch for warm starts."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    sketch: torch.Tensor | None = None  # (n × k) start for the next randomized call

    def dense(self) -> torch.Tensor:
        return (self.U * self.S) @ self.Vh


def exact_svd(matrix: torch.Tensor, rank: int) -> LowRank:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return LowRank(U[:, :rank], S[:rank], Vh[:rank])


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    oversampling: int = OVERSAMPLING,
    power_iters: int = POWER_ITERS,
) -> LowRank:
    """Rank-``rank`` SVD of ``matrix`` from a sketch; ``start`` (n × k) replaces the random one."""
    m, n = matrix.shape
    k = min(rank + oversampling, m, n)
    if start is None or start.shape != (n, k):
        start = torch.randn(n, k, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = _orthonormal(matrix @ start)
    for _ in range(power_iters):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    small_U, S, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    U = basis @ small_U
    return LowRank(U[:, :rank], S[:rank], Vh[:rank], sketch=Vh.T.contiguous())


def weighted_svd(
    matrix: torch.Tensor,
    rank: int,
    row_weights: torch.Tensor,
    col_weights: torch.Tensor,
    method: str,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> LowRank:
    """svd_r(diag(ρ) M diag(γ)) with U divided by ρ and Vh by γ (not orthonormal any more)."""
    scaled = matrix * row_weights[:, None] * col_weights[None, :]
    low = truncated_svd(scaled, rank, method, generator, start)
    U = low.U * _safe_inverse(row_weights)[:, None]
    Vh = low.Vh * _safe_inverse(col_weights)[None, :]
    return LowRank(U, low.S, Vh, sketch=low.sketch)


def activation_svd(
    matrix: torch.Tensor,
    rank: int,
    chol: torch.Tensor,
    row_weights: torch.Tensor | None,
    method: str,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> LowRank:
    """The best rank-r D in the H-norm: D = diag(ρ)⁻¹·svd_r(diag(ρ)·M·L)·L⁻¹ (H_λ = L·Lᵀ).

    Eckart–Young on M·L, since ‖(M − D)·L‖_F = ‖M·L − D·L‖_F and D·L ranges over every rank-r
    matrix; Vh·L⁻¹ by a triangular solve (never an explicit inverse). ρ = None: no row weights.
    """
    scaled = matrix if row_weights is None else matrix * row_weights[:, None]
    low = truncated_svd(scaled @ chol, rank, method, generator, start)
    U = low.U if row_weights is None else low.U * _safe_inverse(row_weights)[:, None]
    Vh = torch.linalg.solve_triangular(chol, low.Vh, upper=False, left=False)
    return LowRank(U, low.S, Vh, sketch=low.sketch)


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    method: str,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> LowRank:
    """Dispatch on ``method`` ∈ {"exact", "randomized"}."""
    if method == "exact":
        return exact_svd(matrix, rank)
    return randomized_svd(matrix, rank, generator, start)


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x, torch.zeros_like(x))


def split_factors(low: LowRank, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_B, lora_A) with s·B·A = U Σ Vh: the √Σ split divided by √s (docs/algorithms.md §0)."""
    root = torch.sqrt(low.S / scaling)
    return (low.U * root[None, :]).contiguous(), (root[:, None] * low.Vh).contiguous()
