"""8-bit storage of the low-rank factors (LQ-LoRA counts them at 8 bits; docs/algorithms.md §1.9).

Per row of a factor X (B: out × r, A: r × in), symmetric absmax int8 with a float32 scale:

    s_i = max_j |X_ij| / 127        (then made a fixed point of s ↦ fl(fl(127·s) / 127))
    c_ij = round(X_ij / s_i) ∈ [−127, 127]          X̂_ij = c_ij · s_i   (float32)

    bits/param = 8 + 32 / cols

The fixed point makes the code of an already-rounded factor reproduce it exactly (its row
maximum is 127·s, and 127·s / 127 gives s back), so storing a rounded factor loses nothing; a
factor off this grid (e.g. after fine-tuning) is never stored this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = 127
FIXED_POINT_STEPS = 3


@dataclass(frozen=True)
class Int8Rows:
    """int8 ``codes`` (rows × cols) and float32 ``scales`` (rows,)."""

    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel()


def _stable_scales(x: torch.Tensor) -> torch.Tensor:
    scales = x.abs().amax(1) / LEVELS
    for _ in range(FIXED_POINT_STEPS):
        scales = (scales * LEVELS) / LEVELS
    return scales


def quantize_rows(x: torch.Tensor) -> Int8Rows:
    """Int8Rows of a 2-D float tensor; ValueError on NaN / Inf."""
    x = x.detach().float()
    if x.dim() != 2 or not torch.isfinite(x).all():
        raise ValueError("a factor must be a finite 2-D tensor to store it in 8 bits")
    scales = _stable_scales(x)
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    codes = torch.round(x * inverse[:, None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return Int8Rows(codes, scales)


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """X̂: ``x`` rounded to its 8-bit grid (float32, same shape)."""
    return quantize_rows(x).dequantize()


def exact_rows(x: torch.Tensor) -> Int8Rows | None:
    """The 8-bit form of ``x`` when it reproduces ``x`` exactly, else None."""
    if x.dtype != torch.float32 or x.dim() != 2 or not torch.isfinite(x).all():
        return None
    rows = quantize_rows(x)
    return rows if torch.equal(rows.dequantize(), x) else None
