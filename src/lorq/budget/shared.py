"""Dense Q of every NF candidate of one matrix from shared work: no codes packed, none decoded.

    T (out × in) → blocks (nb × B0);   s1'_b = stored absmax scales    one per (B0, scale layout)
    (min, max) of blocks of B0 = 2^i·b from those of b: one pass over T for every B0
    y = T_b · (1 / s1'_b)                                              shared by every bit width k
    j = #{m ∈ M : m < y},   M = ∪_k midpoints_k (sorted, distinct)     one search for several k
    Q_k = level_k[code_k] · s1'_b,   code_k = #{m ∈ midpoints_k : m < y} = table_k[j]

Since midpoints_k ⊂ M, the interval of M that holds y fixes its interval of midpoints_k, so
code_k is a lookup of j, which a LevelGrid over M finds (``lorq.quant.codebook``: ties low, as
bucketize). Bit widths whose merged midpoints one LevelGrid of ≤ MAX_CELLS cells separates share
j: NF2, NF3 and NF4 do. NF8 gets its own: its 255 midpoints fill the grid's uint8 codes (and lie
too close to the others' for its cells).

Every step is the float arithmetic of ``quantize(T, c).dequantize()`` for an NF config c
(``lorq.quant.normal_float``), so Q_k is bit-identical to it; what is skipped is computing the
scales again for every k, a pass over T for every block size, packing the codes and unpacking
them. (Minima and maxima are exact, so a block's from its sub-blocks' is the same float.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cache

import torch

from lorq.quant import NFConfig, QuantConfig
from lorq.quant.base import safe_reciprocal
from lorq.quant.codebook import LevelGrid, _build_grid, nf_levels, nf_midpoints
from lorq.quant.normal_float import absmax_scales

MAX_CELLS = 4096  # NF8 alone needs 512 cells (lorq.quant.codebook.nf_grid)


def _merged_grid(bits: tuple[int, ...]) -> LevelGrid | None:
    """The LevelGrid over the merged midpoints of ``bits``; None when no ≤ MAX_CELLS does or
    its codes would not fit in uint8 (more than 255 midpoints)."""
    merged = torch.unique(torch.cat([nf_midpoints(k) for k in bits]))
    if merged.numel() > 255:
        return None
    cells = 256
    while cells <= MAX_CELLS and (grid := _build_grid(merged, cells)) is None:
        cells *= 2
    return grid if cells <= MAX_CELLS else None


@cache
def merged_levels(bits: tuple[int, ...]) -> tuple[LevelGrid, dict[int, torch.Tensor]]:
    """(grid over M, {k: level_k[table_k]} (|M| + 1,) float32) for bit widths ``bits``."""
    grid = _merged_grid(bits)
    if grid is None:
        raise ValueError(f"NF bit widths {bits} have no common LevelGrid of ≤ {MAX_CELLS} cells")
    merged = torch.unique(torch.cat([nf_midpoints(k) for k in bits]))
    tables = {}
    for k in bits:
        below = torch.searchsorted(nf_midpoints(k), merged, right=True)  # #{m_k ≤ M_j}
        tables[k] = nf_levels(k)[torch.cat([below.new_zeros(1), below])]
    return grid, tables


@cache
def bit_groups(bits: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """``bits`` (distinct) cut greedily, ascending, into groups that share one merged grid."""
    groups: list[tuple[int, ...]] = []
    for k in sorted(bits):
        if groups and _merged_grid((*groups[-1], k)) is not None:
            groups[-1] = (*groups[-1], k)
        else:
            groups.append((k,))
    return tuple(groups)


def _family(config: NFConfig) -> tuple:
    """What the stored scales depend on: every field of an NF config but its bits."""
    return (
        config.block_size,
        config.scale_bits,
        config.scale_block_size,
        config.super_scale_dtype,
        config.scale_dtype,
    )


def block_ranges(target: torch.Tensor, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """{B0: (nb × 2) per-block (min, max) of ``target`` in blocks of B0} for power-of-two
    ``sizes``: one aminmax at the smallest, pairwise minima and maxima above it."""
    size = min(sizes)
    low, high = torch.aminmax(target.reshape(-1, size), dim=1)
    ranges = {size: torch.stack([low, high], 1)}
    while size < max(sizes):
        size, low, high = 2 * size, low.view(-1, 2).amin(1), high.view(-1, 2).amax(1)
        ranges[size] = torch.stack([low, high], 1)
    return ranges


def nf_dequantized(
    target: torch.Tensor, candidates: Sequence[QuantConfig]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(i, Q_i) for every NF candidate i of ``candidates`` (the others are skipped), Q_i the
    float32 (out × in) ``quantize(target, candidates[i]).dequantize()``; ``target`` (out × in)
    float32, finite, tiled by every NF candidate's blocks. Visited family by family."""
    families: dict[tuple, list[int]] = {}
    for i, candidate in enumerate(candidates):
        if isinstance(candidate, NFConfig):
            families.setdefault(_family(candidate), []).append(i)
    sizes = {candidates[m[0]].block_size for m in families.values()}
    ranges = block_ranges(target, sorted(sizes)) if sizes else {}
    for members in families.values():
        first = candidates[members[0]]
        assert isinstance(first, NFConfig)
        blocks = target.reshape(-1, first.block_size)
        # the (min, max) rows stand for the blocks: absmax_scales only takes their extremes
        used, _ = absmax_scales(ranges[first.block_size], first)
        y = blocks * safe_reciprocal(used)[:, None]
        by_bits = {candidates[i].bits: i for i in members}  # distinct configs: distinct bits
        for group in bit_groups(tuple(by_bits)):
            grid, tables = merged_levels(group)
            code = grid.codes(y).reshape(-1).int()
            for k in group:
                values = tables[k].to(code.device).index_select(0, code).view(blocks.shape)
                yield by_bits[k], values.mul_(used[:, None]).view(target.shape)
