"""The cost table of the bit budget: bits and error of every matrix under every candidate config.

    bits[i, c] = 8 · nbytes(Q_i under c)                     the real stored size, scalars included
    cost[i, c] = err(W_i − Q_i − s·B_i·A_i)²                 the decomposition under config c

With planned adapters (``lorq.budget.choices``) a column is (format, rank r, factor bits b):
bits adds the factors' stored bits, and the cost is the rank-r decomposition's with B, A on their
b-bit grid (Q rounded from the unrounded factors, as the compress job rounds them afterwards);
rank 0 is Q = round(W) alone.

With a plan weighted by the KL (docs/algorithms.md §10) the costs are the H-norm's, then
:func:`kl_costs` turns them into predicted KL: cost[i, c] = α_i · err[i, c]² / ‖W_i L_i‖².

err is the decomposition's own (``lorq.decomposition.common``): Frobenius, Fisher-weighted, or the
H-norm ‖R·L‖_F, whose square is the matrix's expected output error on the calibration inputs, so
the ILP then minimises the sum of the layers' output MSEs (docs/algorithms.md §5).

Methods: "plain" (plain quantization, no low-rank part), "lq" and "loftq" (docs/algorithms.md §2).
With ``iters=1`` LQ-LoRA's first step, svd_r(W), does not depend on the config: it is computed once
per matrix and reused for every candidate. Rounded to nearest, the NF candidates of a matrix also
share their quantization work (``lorq.budget.shared``: scales once per block size, one level
search for NF2–NF4, no packing): the same Q, bit for bit, as quantizing and decoding each one.
``iters > 1`` (or LoftQ) runs the full decomposition per candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorq.budget.choices import Choices, adapter_bits, as_choices
from lorq.budget.shared import nf_dequantized
from lorq.config import LEGACY_METHODS, DecomposeConfig
from lorq.decomposition import decompose
from lorq.decomposition.common import LowRankStep, Rounding, Weighting, check_rank
from lorq.decomposition.svd import split_factors
from lorq.quant import QuantConfig
from lorq.quant.base import check_weight, fits
from lorq.quant.factors import round_rows
from lorq.quant.tensor import storage_nbytes
from lorq.util.progress import Progress, no_progress

METHODS = ("plain", "lq", "loftq")


@dataclass(frozen=True)
class CostTable:
    """Rows: matrices (``names``, ``numels``); columns: ``candidates``."""

    names: tuple[str, ...]
    numels: np.ndarray  # (n,) int64
    candidates: tuple[QuantConfig, ...]
    bits: np.ndarray  # (n, c) float64, total bits of matrix i under config c
    cost: np.ndarray  # (n, c) float64, squared (weighted) error
    norms: np.ndarray  # (n,) float64, squared (weighted) norm of W: relative errors
    choices: Choices | None = None  # with planned adapters: the columns' ranks and factor bits

    def adapter_of(self, column: int) -> tuple[int | None, int | None]:
        """(rank, factor bits) of ``column``; (None, None) when the rank is fixed."""
        if self.choices is None:
            return None, None
        _, rank, bits = self.choices.columns[column]
        return rank, bits

    @property
    def total_params(self) -> int:
        return int(self.numels.sum())

    def feasible_range(self) -> tuple[float, float]:
        return feasible_range(self.bits, self.numels)


def feasible_range(bits: np.ndarray, numels: np.ndarray) -> tuple[float, float]:
    """The smallest and largest achievable average bits/param; bits: (n, c) totals per matrix,
    +inf where a candidate does not fit the matrix."""
    total = float(numels.sum())
    largest = np.where(np.isfinite(bits), bits, -np.inf).max(1)
    return float(bits.min(1).sum() / total), float(largest.sum() / total)


def fitting(name: str, shape: tuple[int, int], candidates: Sequence[QuantConfig]) -> list[bool]:
    """Which candidates a matrix of ``shape`` can take (a block type must tile its rows: the
    ILP excludes the others for it); ValueError when none can."""
    fit = [fits(c, shape) for c in candidates]
    if not any(fit):
        raise ValueError(
            f"no candidate fits {name} of shape {shape}: rows of {shape[1]} values are not a "
            f"multiple of any candidate's block ({', '.join(c.name for c in candidates)}); add "
            "one that fits (e.g. q8_0 or an NF preset)"
        )
    return fit


def _spread(values: list[float], fit: Sequence[bool]) -> list[float]:
    """Values of the fitting candidates back in grid order, +inf for the others."""
    it = iter(values)
    return [next(it) if ok else np.inf for ok in fit]


def shape_bits(
    name: str, shape: tuple[int, int], candidates: Choices | Sequence[QuantConfig]
) -> list:
    """Stored bits of a matrix of ``shape`` in every column (+inf: its format does not fit);
    with planned adapters the factors' bits included."""
    choices = as_choices(candidates)
    fit = dict(zip(choices.quants, fitting(name, shape, choices.quants), strict=True))
    if choices.planned:
        choices.check_shape(name, shape)
    return [
        8.0 * storage_nbytes(q, shape) + adapter_bits(shape, r, b) if fit[q] else np.inf
        for q, r, b in choices.columns
    ]


def embedding_bits(
    name: str, shape: tuple[int, int], candidates: Choices | Sequence[QuantConfig]
) -> list:
    """:func:`shape_bits` of the token embedding (plan_embeddings): its format's stored bits in
    a column without an adapter, +inf in one with (a table takes none)."""
    choices = as_choices(candidates)
    bits = shape_bits(name, shape, choices)
    return [np.inf if r else b for b, (_, r, _) in zip(bits, choices.columns, strict=True)]


def rows_bits(
    shapes: Mapping[str, tuple[int, int]],
    tables: Mapping[str, tuple[int, int]],
    candidates: Choices | Sequence[QuantConfig],
) -> tuple[np.ndarray, np.ndarray]:
    """(bits (n, c), numels (n,)) of the matrices ``shapes`` (:func:`shape_bits`) and the planned
    token embedding ``tables`` (:func:`embedding_bits`), in that order: what the budget's
    feasible range is taken over."""
    rows = [shape_bits(name, shape, candidates) for name, shape in shapes.items()]
    rows += [embedding_bits(name, shape, candidates) for name, shape in tables.items()]
    numels = [out * inp for out, inp in [*shapes.values(), *tables.values()]]
    return np.array(rows), np.array(numels, dtype=np.int64)


def _error(
    weighting: Weighting, weight: torch.Tensor, q: torch.Tensor, low_rank: torch.Tensor | None
) -> float:
    """err(W − Q − s·B·A)², the residual formed left to right (W − Q first)."""
    residual = weight - q
    if low_rank is not None:
        residual -= low_rank
    return weighting.error(residual) ** 2


def _costs(
    weight: torch.Tensor,
    low_rank: torch.Tensor | None,
    candidates: Sequence[QuantConfig],
    weighting: Weighting,
    rounding: Rounding,
    shared_work: bool,
    finals: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[float], list[list[float]]]:
    """Bits of Q = round(W − s·B·A) (``low_rank`` None: of W) for every candidate, and its cost
    with each of ``finals`` (default: ``low_rank`` itself) as the low-rank part beside it; NF
    candidates rounded to nearest from shared work (``lorq.budget.shared``) when
    ``shared_work``, the others quantized and decoded one by one."""
    target = weight if low_rank is None else weight - low_rank
    finals = [low_rank] if finals is None else list(finals)
    bits, cost = {}, {}
    if shared_work and rounding.nearest:
        shape = (weight.shape[0], weight.shape[1])
        for i, dense in nf_dequantized(target, candidates):
            bits[i] = 8.0 * storage_nbytes(candidates[i], shape)
            cost[i] = [_error(weighting, weight, dense, low) for low in finals]
    for i, candidate in enumerate(candidates):
        if i not in cost:
            q = rounding(target, candidate)
            bits[i] = 8.0 * q.nbytes
            dense = q.dequantize()
            cost[i] = [_error(weighting, weight, dense, low) for low in finals]
    order = range(len(candidates))
    return [bits[i] for i in order], [[cost[i][k] for i in order] for k in range(len(finals))]


def _factor_grids(low, scaling: float, factor_bits: Sequence[int]) -> list[torch.Tensor]:
    """s·B·A with B, A as stored at each of ``factor_bits`` (16: as they are)."""
    lora_B, lora_A = split_factors(low, scaling)
    dense = {16: low.dense()}
    if 8 in factor_bits:
        dense[8] = scaling * (round_rows(lora_B) @ round_rows(lora_A))
    return [dense[b] for b in factor_bits]


def _measures(
    weight: torch.Tensor,
    config: DecomposeConfig,
    statistics: tuple[torch.Tensor | None, torch.Tensor | None],
) -> tuple[Weighting, Rounding]:
    """The error and the rounding of the costs of one matrix (fp32), from its (F, H)."""
    fisher, hessian = statistics
    check_weight(weight)
    weighting = Weighting.build(weight, config, fisher, hessian)
    return weighting, Rounding(config, hessian, weight.device, weighting.chol)


def _row(
    weight: torch.Tensor,
    candidates: Sequence[QuantConfig],
    method: str,
    config: DecomposeConfig,
    statistics: tuple[torch.Tensor | None, torch.Tensor | None],
    shared_work: bool,
) -> tuple[list[float], list[float], float]:
    fisher, hessian = statistics
    weight = weight.detach().float()
    if method != "plain":
        check_rank(weight, config.rank)
    weighting, rounding = _measures(weight, config, statistics)
    norm = weighting.error(weight) ** 2
    if method == "plain" or (method == "lq" and config.iterations == 1):
        # LQ-LoRA's first step, svd_r(W), does not depend on the config: one SVD per matrix
        step = None if method == "plain" else LowRankStep(config, weighting, weight)
        low = None if step is None else step(weight).dense()
        bits, (cost,) = _costs(weight, low, candidates, weighting, rounding, shared_work)
        return bits, cost, norm
    bits, cost = [], []
    for candidate in candidates:
        d = decompose(weight, dataclasses.replace(config, quant=candidate), fisher, hessian)
        bits.append(8.0 * d.q.nbytes)
        cost.append(d.error**2)
    return bits, cost, norm


def _planned_row(
    weight: torch.Tensor,
    quants: Sequence[QuantConfig],
    choices: Choices,
    config: DecomposeConfig,
    statistics: tuple[torch.Tensor | None, torch.Tensor | None],
    shared_work: bool,
) -> tuple[dict, dict, float]:
    """({(format, rank, factor bits): bits}, {…: cost}, norm) of one matrix with planned
    adapters (LQ-LoRA's first step, or plain quantization at rank 0), formats ``quants``."""
    weight = weight.detach().float()
    weighting, rounding = _measures(weight, config, statistics)
    shape = (weight.shape[0], weight.shape[1])
    bits, cost = {}, {}
    for rank in choices.ranks or ():
        factor_bits = [None] if rank == 0 else list(choices.factor_bits)
        low, finals = None, None
        if rank:
            ranked = dataclasses.replace(config, rank=rank)
            svd = LowRankStep(ranked, weighting, weight)(weight)
            low = svd.dense()
            finals = _factor_grids(svd, ranked.scaling, factor_bits)
        qbits, costs = _costs(weight, low, quants, weighting, rounding, shared_work, finals)
        for b, row in zip(factor_bits, costs, strict=True):
            extra = adapter_bits(shape, rank, b)
            for q, q_bits, c in zip(quants, qbits, row, strict=True):
                bits[q, rank, b] = q_bits + extra
                cost[q, rank, b] = c
    return bits, cost, weighting.error(weight) ** 2


def cost_table(
    matrices: Mapping[str, torch.Tensor],
    candidates: Choices | Sequence[QuantConfig],
    method: str = "lq",
    config: DecomposeConfig | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = no_progress,
    hessians: Mapping[str, torch.Tensor] | None = None,
    shared_work: bool = True,
) -> CostTable:
    """Bits and squared error of every matrix (out × in) in every column: each candidate config,
    or with planned adapters (``Choices`` with ranks) each (config, rank, factor bits).

    ``config`` gives rank, iterations, SVD, seed, weighting and rounding of the decomposition
    (its ``quant`` is replaced by each candidate); ``fisher``: {matrix name: F}, ``hessians``:
    {matrix name: H (in × in)}, each needed for every matrix when the weighting (or GPTQ
    rounding) uses it. ``shared_work=False`` quantizes and decodes every candidate on its own
    (the reference the shared path equals, bit for bit: bench/cost_table.py).
    """
    method = LEGACY_METHODS.get(method, method)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
    if not matrices:
        raise ValueError("no matrices to plan for (the model has no target linear layers)")
    choices = as_choices(candidates)
    config = config or DecomposeConfig(iters=1)
    if method != "plain":
        config = dataclasses.replace(config, method=method)
    check_planned(choices, method, config)
    ranks = choices.ranks if choices.planned else config.rank
    advance = progress(f"cost table ({method}, r={ranks})", len(matrices))
    rows, numels = [], []
    for name, weight in matrices.items():  # each weight read once (it may be decoded on access)
        statistics = (fisher or {}).get(name), (hessians or {}).get(name)
        rows.append(_table_row(name, weight, choices, method, config, statistics, shared_work))
        numels.append(weight.numel())
        advance(1)
    return CostTable(
        names=tuple(matrices),
        numels=np.array(numels, dtype=np.int64),
        candidates=tuple(q for q, _, _ in choices.columns),
        bits=np.array([r[0] for r in rows], dtype=np.float64),
        cost=np.array([r[1] for r in rows], dtype=np.float64),
        norms=np.array([r[2] for r in rows], dtype=np.float64),
        choices=choices if choices.planned else None,
    )


def check_planned(choices: Choices, method: str, config: DecomposeConfig) -> None:
    """Planned adapters are costed by LQ-LoRA's first step: method lq, one iteration."""
    if choices.planned and (method != "lq" or config.iterations != 1):
        raise ValueError(
            f"a plan of ranks costs LQ-LoRA's first step (method 'lq', plan_iters=1), not "
            f"method {method!r} with {config.iterations} iterations; plan the formats alone "
            "(no rank grid) for it"
        )


def _table_row(name, weight, choices, method, config, statistics, shared_work) -> tuple:
    """(bits, cost) of every column of one matrix (+inf where its format does not fit), norm;
    ``statistics``: its (F, H) or Nones."""
    shape = (weight.shape[0], weight.shape[1])
    fit = fitting(name, shape, choices.quants)
    usable = [c for c, ok in zip(choices.quants, fit, strict=True) if ok]
    if not choices.planned:
        bits, cost, norm = _row(weight, usable, method, config, statistics, shared_work)
        return _spread(bits, fit), _spread(cost, fit), norm
    choices.check_shape(name, shape)
    bits, cost, norm = _planned_row(weight, usable, choices, config, statistics, shared_work)
    columns = choices.columns
    return (
        [bits.get(column, np.inf) for column in columns],
        [cost.get(column, np.inf) for column in columns],
        norm,
    )


def embedding_row(name: str, weight: torch.Tensor, candidates: Choices) -> CostTable:
    """The token embedding E (vocab × dim) as one row of the table (plan_embeddings, §10): in
    every column its format's stored bits and ‖E − Q‖²_F (Q = round(E) to nearest; norm ‖E‖²_F),
    no adapter: a column with a rank > 0 gets +inf bits (the ILP never chooses it)."""
    weight = weight.detach().float()
    shape = (weight.shape[0], weight.shape[1])
    choices = as_choices(candidates)
    fit = fitting(name, shape, choices.quants)
    fitting_quants = [q for q, ok in zip(choices.quants, fit, strict=True) if ok]
    weighting, rounding = _measures(weight, DecomposeConfig(), (None, None))
    _, (cost,) = _costs(weight, None, fitting_quants, weighting, rounding, True)
    by_quant = dict(zip(fitting_quants, cost, strict=True))
    return CostTable(
        names=(name,),
        numels=np.array([weight.numel()], dtype=np.int64),
        candidates=tuple(q for q, _, _ in choices.columns),
        bits=np.array([embedding_bits(name, shape, choices)], dtype=np.float64),
        cost=np.array([[by_quant.get(q, np.inf) for q, _, _ in choices.columns]]),
        norms=np.array([weighting.error(weight) ** 2], dtype=np.float64),
        choices=choices if choices.planned else None,
    )


def kl_costs(table: CostTable, alphas: Mapping[str, float]) -> CostTable:
    """The H-norm ``table`` in the currency of the KL (docs/algorithms.md §10): cost[i, c] =
    α_i t²_{i,c} with t² = err² / ‖W L‖², and norms = α (so cost / norm stays t²)."""
    missing = [name for name in table.names if name not in alphas]
    if missing:
        raise ValueError(f"no KL sensitivity for {missing[0]} (and {len(missing) - 1} more)")
    alpha = np.maximum([alphas[name] for name in table.names], 0.0).astype(np.float64)
    relative = table.cost / np.where(table.norms > 0, table.norms, 1.0)[:, None]
    with np.errstate(invalid="ignore"):  # α = 0 beside a candidate that does not fit
        cost = np.where(np.isfinite(table.cost), alpha[:, None] * relative, np.inf)
    return dataclasses.replace(table, cost=cost, norms=alpha)
