"""What LoftQ and LQ-LoRA share: the result type, the weighting, the low-rank step, the error.

err = ‖√F ⊙ (W − Q − s·B·A)‖_F        (F = 1 without Fisher information)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorq.config import DecomposeConfig
from lorq.decompose.svd import LowRank, truncated_svd, weighted_svd
from lorq.quant import QuantizedTensor
from lorq.quant.base import check_weight


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
    """√F for the error, two-sided weights ρ (out,), γ (in,) for the SVD; None: unweighted."""

    root: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    @classmethod
    def from_fisher(cls, fisher: torch.Tensor | None, weight: torch.Tensor) -> Weighting:
        if fisher is None:
            return cls()
        check_fisher(fisher, weight)
        fisher = fisher.float()
        return cls(fisher.sqrt(), fisher.mean(1).sqrt(), fisher.mean(0).sqrt())

    def error(self, residual: torch.Tensor) -> float:
        if self.root is not None:
            residual = residual * self.root
        return float(torch.linalg.vector_norm(residual))


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
        if w.rows is not None and w.cols is not None:
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
