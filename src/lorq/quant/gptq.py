"""GPTQ: data-aware rounding on any scalar grid (Frantar et al. 2023, arXiv 2210.17323;
docs/algorithms.md §1.3, §5).

Minimises the layer output error on calibration inputs X (N × in) instead of the weight error:

    min_Q ‖X Wᵀ − X Qᵀ‖²_F        H = XᵀX / N,  H_λ = H + λ·mean(diag H)·I   (in × in), λ = 0.01
    U = chol(H_λ⁻¹)ᵀ  (upper)     columns j = 0 … in−1, left to right:
        q_j  = grid(w_j)                                    w_j: column j of W (out,)
        e_j  = (w_j − q_j) / U[j, j]
        w_k −= e_j · U[j, k]   for every k > j              (error feedback to later columns)

Shapes: weight W (out × in) float, hessian H (in × in) float32 (any positive multiple gives the
same result); the result is a QuantizedTensor with exactly the layout of the format's round to
nearest (same packing; stored scales are what codes come from).

The grid is the format's (``QuantFormat.gptq_grid``), one object per matrix:
- affine INT-k / float mins: a group's scale and zero (or min) are chosen when its first column
  is reached, from the *current*, error-updated weights of the group (GPTQ's groups);
- NF-k: the block absmax scales are fixed before the sweep from the weight being rounded, and
  double-quantized first, so the stored (second-level) scale is the one every code is rounded
  with (GPTQ's "static groups"; the second level needs every scale of a super-block at once).
- llama.cpp's types (``ggml.BlockGrid``): when a block starts (a K-quant's whole 256-weight
  super-block, whose sub-block scales are quantized together), llama.cpp's reference encoder
  chooses its head from the current weights; codes are the nearest levels under that head.
With a diagonal H there is no feedback and both are exactly round to nearest.

Details (as the reference GPTQ code, act-order off so groups stay contiguous):
- columns go in blocks of ``block_columns`` (rounded to a multiple of the group, so no group
  straddles a block): feedback inside a block is applied column by column, to later blocks once
  per block (the "lazy batch" update: same result up to float rounding, far fewer memory passes);
- a dead input (diag H = 0: the feature was always 0) gets diag 1; its weights are kept and
  rounded to nearest (its row and column of H are 0, so it neither gives nor gets feedback);
- when the Cholesky factorisation fails, the damping is retried ×10 a few times.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lorq.quant.base import QuantConfig, check_weight, format_of
from lorq.quant.tensor import QuantizedTensor

DAMP = 0.01  # λ of docs/algorithms.md §1.3 (the GPTQ paper's "percdamp")
DAMP_RETRIES = 3  # extra tries with λ ×10 each when H + λ·mean(diag H)·I is not positive definite


class ColumnGrid(Protocol):
    """A format's rounding of one matrix, column by column (built by ``gptq_grid``).

    ``group``: columns whose per-row parameters :meth:`start` chooses (0: none, fixed up front).
    """

    group: int

    def start(self, columns: torch.Tensor, first: int) -> None:
        """The group of columns ``first …`` begins; ``columns`` (out × group) are current."""

    def round(self, column: torch.Tensor, j: int) -> torch.Tensor:
        """Round column ``j`` (out,) to the grid; returns the rounded values, keeps the codes."""

    def result(self) -> QuantizedTensor:
        """The QuantizedTensor of every rounded column."""


def check_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> None:
    size = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (size, size):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian)
        raise ValueError(
            f"hessian must be an (in × in) = ({size}, {size}) tensor for a weight of shape "
            f"{tuple(weight.shape)}, got {shape}; estimate it from the layer's inputs"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf values; re-estimate it from finite inputs")


def damped_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Lower Cholesky factor L of H_λ = H + λ·mean(diag H)·I (dead inputs given diag 1).

    λ starts at ``damp`` (0 allowed: then H itself, which must be positive definite) and is
    multiplied by 10 up to ``DAMP_RETRIES`` times while the factorisation fails; then ValueError.
    """
    if not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp={damp!r} is not supported; allowed: a float ≥ 0 (0.01)")
    h = hessian.detach().float().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(DAMP_RETRIES + 1):
        lam = damp * 10**attempt
        lower, info = torch.linalg.cholesky_ex(h + lam * mean * eye if lam else h)
        if info.item() == 0 and torch.isfinite(lower).all():
            return lower
    raise ValueError(
        f"the Hessian is not positive definite even with damping λ={lam:g}·mean(diag H) "
        f"(mean(diag H)={mean.item():.3g}); check the calibration inputs or pass a larger damp"
    )


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of H_λ⁻¹ (in × in), H_λ as in :func:`damped_cholesky`."""
    return inverse_upper(damped_cholesky(hessian, damp))


def inverse_upper(lower: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of (L·Lᵀ)⁻¹ from the lower factor L of H_λ."""
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        raise ValueError(
            "the inverse of the damped Hessian is not positive definite; check the calibration "
            "inputs or pass a larger damp"
        )
    return upper


def _sweep(block: torch.Tensor, upper: torch.Tensor, grid: ColumnGrid, first: int) -> torch.Tensor:
    """GPTQ on one block of columns (out × b, updated in place); returns the errors e (out × b)."""
    errors = torch.empty_like(block)
    diagonal = upper.diagonal()
    for j in range(block.shape[1]):
        if grid.group and j % grid.group == 0:
            grid.start(block[:, j : j + grid.group], first + j)
        column = block[:, j]
        error = errors[:, j]
        torch.div(column - grid.round(column, first + j), diagonal[j], out=error)
        block[:, j + 1 :].addr_(error, upper[j, j + 1 :], alpha=-1)
    return errors


def gptq_round(
    weight: torch.Tensor, upper: torch.Tensor, config: QuantConfig, block_columns: int = 128
) -> QuantizedTensor:
    """GPTQ rounding of ``weight`` (out × in) with a precomputed U = :func:`inverse_cholesky`."""
    if not isinstance(block_columns, int) or block_columns <= 0:
        raise ValueError(f"block_columns={block_columns!r} is not supported; allowed: > 0")
    w = weight.detach().float().clone()
    grid = format_of(config).gptq_grid(w, config)
    group = grid.group or 1
    step = max(group, block_columns // group * group)
    upper = upper.to(w.device)
    for start in range(0, w.shape[1], step):
        stop = min(start + step, w.shape[1])
        errors = _sweep(w[:, start:stop], upper[start:stop, start:stop], grid, start)
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return grid.result()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    damp: float = DAMP,
    block_columns: int = 128,
) -> QuantizedTensor:
    """GPTQ-rounded quantization of ``weight`` (out × in) in ``config``'s format.

    ``hessian``: H = XᵀX/N of the layer's inputs (in × in, e.g. from ``lorq.hessian``).
    Formats: NF-k (static double-quantized scales), INT-k with integer zeros (GPTQ) or float mins
    (Q4_1), llama.cpp's block types; act-order off.
    """
    check_weight(weight)
    format_of(config).check_shape(config, (weight.shape[0], weight.shape[1]))
    check_hessian(hessian, weight)
    upper = inverse_cholesky(hessian.to(weight.device), damp)
    return gptq_round(weight, upper, config, block_columns)
