"""What LoftQ and LQ-LoRA share: the result type, the weighting, the low-rank step, the rounding
and the error (docs/algorithms.md §2.3, §5). With R = W − Q − s·B·A:

    none          err = ‖R‖_F
    fisher        err = ‖√F ⊙ R‖_F              low-rank step: two-sided weighted SVD
    activations   err = ‖R·L‖_F                 H_λ = L·Lᵀ (in × in); low-rank step: closed form
    both          err = ‖diag(ρ)·R·L‖_F         ρ_i = sqrt(mean_j F_ij) (out,)

err² in the H-norm is the layer's expected output error on the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorq.config import DecomposeConfig, uses_activations, uses_fisher
from lorq.decomposition.svd import LowRank, activation_svd, truncated_svd, weighted_svd
from lorq.quant import QuantConfig, QuantizedTensor, format_of, quantize
from lorq.quant.base import check_weight
from lorq.quant.gptq import (
    check_hessian,
    damped_cholesky,
    gptq_round,
    inverse_cholesky,
    inverse_upper,
)


@dataclass(frozen=True, eq=False)
class Decomposition:
    """W ≈ Q + s·B·A: ``q`` (QuantizedTensor), ``lora_B`` (out × r), ``lora_A`` (r × in), s.

    ``errors[t]`` is the (Fisher-weighted) Frobenius error after iteration t; the returned factors
    are those of iteration ``best_iter``, whose error is ``error`` = min(errors).
    """

    q: QuantizedTensor
    lora_B: torch.Tensor
    lora_A: torch.Tensor
    scaling: float
    errors: tuple[float, ...]
    best_iter: int
    config: DecomposeConfig

    @property
    def error(self) -> float:
        return self.errors[self.best_iter]

    def low_rank(self) -> torch.Tensor:
        """s·B·A, float32 (out × in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def reconstruct(self) -> torch.Tensor:
        """Q + s·B·A, float32 (out × in)."""
        return self.q.dequantize() + self.low_rank()


@dataclass
class Weighting:
    """√F for the error, two-sided weights ρ (out,), γ (in,) for the SVD, or the H-norm's
    L (in × in, lower) with optional row weights ρ; all None: unweighted."""

    root: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    chol: torch.Tensor | None = None

    @classmethod
    def from_fisher(cls, fisher: torch.Tensor | None, weight: torch.Tensor) -> Weighting:
        if fisher is None:
            return cls()
        check_fisher(fisher, weight)
        fisher = fisher.float()
        return cls(fisher.sqrt(), fisher.mean(1).sqrt(), fisher.mean(0).sqrt())

    @classmethod
    def build(
        cls,
        weight: torch.Tensor,
        config: DecomposeConfig,
        fisher: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> Weighting:
        """The weighting ``config.weighting`` names, from the statistics it needs."""
        check_statistics(weight, config, fisher, hessian)
        if not uses_activations(config.weighting):
            return cls.from_fisher(fisher, weight)  # checks the Fisher
        assert hessian is not None
        chol = damped_cholesky(hessian.to(weight.device), config.damp)
        rows = None
        if fisher is not None:
            check_fisher(fisher, weight)
            rows = fisher.float().mean(1).sqrt().to(weight.device)
        return cls(rows=rows, chol=chol)

    def error(self, residual: torch.Tensor) -> float:
        if self.chol is not None:
            if self.rows is not None:
                residual = residual * self.rows[:, None]
            return float(torch.linalg.vector_norm(residual @ self.chol))
        if self.root is not None:
            residual = residual * self.root
        return float(torch.linalg.vector_norm(residual))


class Rounding:
    """Q of a target: round to nearest (with the importance diag H: "weighted"), or GPTQ with
    U = chol(H_λ⁻¹) computed once per matrix."""

    def __init__(
        self,
        config: DecomposeConfig,
        hessian: torch.Tensor | None,
        device,
        lower: torch.Tensor | None = None,
    ) -> None:
        """``lower``: L of H_λ when the weighting has it already (one factorisation, not two)."""
        self.upper = None
        self.importance = None
        if config.rounding == "weighted":
            assert hessian is not None
            self.importance = hessian.diagonal().to(device)
        if config.rounding == "gptq" and lower is not None:
            self.upper = inverse_upper(lower)
        elif config.rounding == "gptq":
            assert hessian is not None
            self.upper = inverse_cholesky(hessian.to(device), config.damp)

    @property
    def nearest(self) -> bool:
        """Plain round to nearest: Q = ``quantize(target, quant)``."""
        return self.upper is None and self.importance is None

    def __call__(self, target: torch.Tensor, quant: QuantConfig) -> QuantizedTensor:
        if self.importance is not None:
            return format_of(quant).quantize_weighted(target, quant, self.importance)
        if self.upper is None:
            return quantize(target, quant)
        return gptq_round(target, self.upper, quant)


def check_statistics(
    weight: torch.Tensor,
    config: DecomposeConfig,
    fisher: torch.Tensor | None,
    hessian: torch.Tensor | None,
) -> None:
    """The Fisher iff the weighting uses it; H iff the weighting or the rounding uses it (and its
    shape; the Fisher's values are checked where it is used)."""
    needs_h = uses_activations(config.weighting) or config.rounding != "nearest"
    for name, given, needed in (
        ("fisher", fisher, uses_fisher(config.weighting)),
        ("hessian", hessian, needs_h),
    ):
        if needed and given is None:
            raise ValueError(
                f"weighting={config.weighting!r}, rounding={config.rounding!r} needs {name}= "
                f"({'the Fisher, out × in' if name == 'fisher' else 'H = XᵀX/N, in × in'})"
            )
        if given is not None and not needed:
            raise ValueError(
                f"{name}= was given but weighting={config.weighting!r}, "
                f"rounding={config.rounding!r} does not use it; set weighting (or rounding)"
            )
    if hessian is not None:
        check_hessian(hessian, weight)


def check_fisher(fisher: torch.Tensor, weight: torch.Tensor) -> None:
    if tuple(fisher.shape) != tuple(weight.shape):
        raise ValueError(
            f"fisher has shape {tuple(fisher.shape)} but the weight has shape "
            f"{tuple(weight.shape)}; pass one Fisher entry per weight entry"
        )
    if not torch.isfinite(fisher).all():
        raise ValueError("fisher contains NaN or Inf entries; re-estimate it on finite losses")
    if (fisher < 0).any():
        raise ValueError(
            f"fisher has negative entries (min {float(fisher.min()):.3g}); it must be ≥ 0"
        )


def check_rank(weight: torch.Tensor, rank: int) -> None:
    check_weight(weight)
    if rank >= min(weight.shape):
        raise ValueError(
            f"rank={rank} must be smaller than min(out, in) = {min(weight.shape)} of the matrix of "
            f"shape {tuple(weight.shape)}"
        )


class LowRankStep:
    """svd_r of a residual with the config's method, weighting, seed and warm starts."""

    def __init__(self, config: DecomposeConfig, weighting: Weighting, weight: torch.Tensor):
        self.config, self.weighting = config, weighting
        self.method = config.svd_method(weight.shape)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sketch: torch.Tensor | None = None

    def __call__(self, residual: torch.Tensor) -> LowRank:
        w, rank = self.weighting, self.config.rank
        if w.chol is not None:
            low = activation_svd(
                residual, rank, w.chol, w.rows, self.method, self.generator, self.sketch
            )
        elif w.rows is not None and w.cols is not None:
            low = weighted_svd(
                residual, rank, w.rows, w.cols, self.method, self.generator, self.sketch
            )
        else:
            low = truncated_svd(residual, rank, self.method, self.generator, self.sketch)
        self.sketch = low.sketch
        return low


@dataclass
class Iterate:
    q: QuantizedTensor
    lora_B: torch.Tensor
    lora_A: torch.Tensor


def finish(config: DecomposeConfig, best: Iterate, errors: list[float]) -> Decomposition:
    best_iter = min(range(len(errors)), key=errors.__getitem__)
    return Decomposition(
        best.q, best.lora_B, best.lora_A, config.scaling, tuple(errors), best_iter, config
    )
