"""Codebooks: NormalFloat NF-k levels (docs/algorithms.md §1.1) and nearest-level search.

    δ   = 1 - (1/30 + 1/32) / 2 = 0.9677083
    pos = Φ⁻¹(linspace(δ, 0.5, 2^(k-1) + 1)[:-1])     2^(k-1) positive levels
    neg = -Φ⁻¹(linspace(δ, 0.5, 2^(k-1))[:-1])        2^(k-1) - 1 negative levels
    levels = sort(pos ∪ {0} ∪ neg) / max               2^k values in [-1, 1], 0 exact

NF4 equals the QLoRA / bitsandbytes table; NF2 is [-1, 0, 0.3379, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.stats import norm

# QLoRA's offset 1 - (1/30 + 1/32) / 2, rounded as QLoRA publishes it (Dettmers et al., 2023, §3).
NF_DELTA = 0.9677083


@cache
def _nf_levels(bits: int) -> torch.Tensor:
    # The quantile grid is float32 and the normalisation float32, the quantiles float64: the same
    # arithmetic as QLoRA's table, so NF4 matches bitsandbytes bit for bit.
    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(NF_DELTA, 0.5, half + 1)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(NF_DELTA, 0.5, half)[:-1].numpy())
    levels = torch.tensor(np.concatenate([pos, [0.0], neg]), dtype=torch.float32).sort().values
    return levels / levels.max()


def nf_levels(bits: int) -> torch.Tensor:
    """The 2^bits NF levels, ascending, float32, shape (2^bits,)."""
    return _nf_levels(bits).clone()


def nf_midpoints(bits: int) -> torch.Tensor:
    """Decision boundaries between consecutive NF levels, float32, shape (2^bits - 1,)."""
    levels = _nf_levels(bits)
    return (levels[1:] + levels[:-1]) / 2


@dataclass(frozen=True)
class LevelGrid:
    """Nearest-level search by table lookup instead of a binary search (faster on a CPU:
    bench/quantize.py).

    [-1, 1] is cut into ``cells`` equal cells, each widened by ``eps``; every widened cell holds at
    most one midpoint (checked when built). For a value y in cell c:

        code(y) = #{midpoints < y} = below[c] + (y > boundary[c])

    ``below[c]`` counts midpoints under the widened cell, ``boundary[c]`` is the midpoint inside it
    (+inf if none). Values beyond ±1 fall in the end cells, which extend to ±inf. Ties go to the
    lower level, exactly as ``torch.bucketize(y, midpoints)``.
    """

    below: torch.Tensor  # uint8, (cells,)
    boundary: torch.Tensor  # float32, (cells,)

    @property
    def cells(self) -> int:
        return self.below.numel()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 code of the nearest level for every value of float32 ``x`` (any shape)."""
        half = self.cells / 2
        cell = (x * half + half).clamp_(0, self.cells - 1).to(torch.int32).reshape(-1)
        below, boundary = self.below.to(x.device), self.boundary.to(x.device)
        codes = below.index_select(0, cell)
        codes += x.reshape(-1) > boundary.index_select(0, cell)
        return codes.view(x.shape)


def _build_grid(midpoints: torch.Tensor, cells: int, eps: float = 1e-4) -> LevelGrid | None:
    mids = midpoints.double()
    edges = torch.linspace(-1.0, 1.0, cells + 1, dtype=torch.float64)
    low, high = edges[:-1] - eps, edges[1:] + eps
    low[0], high[-1] = -float("inf"), float("inf")
    inside = (mids[None, :] >= low[:, None]) & (mids[None, :] < high[:, None])
    if int(inside.sum(1).max()) > 1:
        return None
    boundary = torch.where(
        inside, mids[None, :], torch.full_like(inside, float("inf"), dtype=mids.dtype)
    )
    below = (mids[None, :] < low[:, None]).sum(1).to(torch.uint8)
    return LevelGrid(below, boundary.amin(1).float())


@cache
def nf_grid(bits: int) -> LevelGrid:
    """The lookup grid of NF-``bits`` (the finest spacing of NF8 needs 4096 cells)."""
    cells = 256
    while (grid := _build_grid(nf_midpoints(bits), cells)) is None:
        cells *= 2
    return grid


def nearest_level(x: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level by binary search on ``midpoints`` (reference for LevelGrid)."""
    return torch.bucketize(x, midpoints, out_int32=True).to(torch.uint8)
