"""The columns of the cost table: what the ILP may choose for one matrix W (out × in)
(docs/algorithms.md §10).

    fixed rank       column c = format f_c; the rank-r factors are outside the budget:
                     bits[c] = 8 · nbytes(Q under f_c)
    planned adapters column c = (f_c, r_c, b_c) over formats × ranks × factor bits, rank 0
                     (no adapter) allowed; the budget counts the factors:
                     bits[c] = 8 · nbytes(Q under f_c) + adapter_bits(out, in, r_c, b_c)

    adapter_bits = 16 · r · (out + in)                           b = 16 (fp16 / bf16)
                 = 8 · r · (out + in) + 32 · (out + r)           b = 8 (row-wise int8 + fp32
                                                                 scale per row of B and of A)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from lorq.budget.grid import candidate_grid
from lorq.config import CompressConfig
from lorq.quant import QuantConfig

FACTOR_BITS = (16, 8)


def adapter_bits(shape: tuple[int, int], rank: int | None, factor_bits: int | None) -> float:
    """Stored bits of the rank-``rank`` factors B (out × r), A (r × in) of a matrix of
    ``shape`` at ``factor_bits`` (None: 16; lorq.quant.factors for 8); 0 without an adapter
    (rank 0, or None when the rank is not planned)."""
    out, inp = shape
    if not rank:
        return 0.0
    if factor_bits in (16, None):
        return 16.0 * rank * (out + inp)
    if factor_bits == 8:
        return 8.0 * rank * (out + inp) + 32.0 * (out + rank)
    raise ValueError(f"factor_bits={factor_bits!r} is not supported; allowed: {FACTOR_BITS}")


@dataclass(frozen=True)
class Choices:
    """Formats (``quants``), and with ``ranks`` the adapters' ranks × ``factor_bits`` too."""

    quants: tuple[QuantConfig, ...]
    ranks: tuple[int, ...] | None = None
    factor_bits: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        if self.ranks is None:
            return
        bad = [r for r in self.ranks if not isinstance(r, int) or r < 0]
        if bad or not self.ranks:
            raise ValueError(
                f"plan ranks {list(self.ranks)} are not supported; allowed: integers ≥ 0 "
                "(0: no adapter for that matrix)"
            )
        for bits in self.factor_bits:
            adapter_bits((1, 1), 1, bits)

    @property
    def planned(self) -> bool:
        """Whether the plan chooses each matrix's adapter (and the budget counts it)."""
        return self.ranks is not None

    @property
    def columns(self) -> list[tuple[QuantConfig, int | None, int | None]]:
        """(format, rank, factor bits) of every column; rank and bits None when not planned."""
        if self.ranks is None:
            return [(q, None, None) for q in self.quants]
        adapters = [(0, None)] if 0 in self.ranks else []
        adapters += [(r, b) for r, b in itertools.product(self.ranks, self.factor_bits) if r]
        return [(q, r, b) for (r, b), q in itertools.product(adapters, self.quants)]

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        """ValueError when a planned rank is not below min(out, in) of the matrix."""
        largest = max(self.ranks or (0,))
        if largest >= min(shape):
            raise ValueError(
                f"plan rank {largest} must be smaller than min(out, in) = {min(shape)} of {name} "
                f"{tuple(shape)}; drop it from the rank grid"
            )


def as_choices(candidates: Choices | Sequence[QuantConfig]) -> Choices:
    return candidates if isinstance(candidates, Choices) else Choices(tuple(candidates))


def plan_choices(config: CompressConfig) -> Choices:
    """The columns a compress job's plan chooses from: ``candidates`` and, when the config plans
    them, its ranks × factor bits."""
    grid = config.adapter_grid()
    quants = candidate_grid(config.candidates)
    return Choices(quants) if grid is None else Choices(quants, *grid)
