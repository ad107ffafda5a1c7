"""BudgetPlan: the chosen config of every matrix under a bit budget, saved as JSON.

achieved bits/param = Σ_i bits_i / Σ_i numel_i                       (quantized part)
with low-rank factors = (Σ_i bits_i + Σ_i adapter_bits(r_i, b_i)) / Σ_i numel_i

With ``plan_embeddings`` the token embedding E (vocab × dim) is one more entry i (no adapter), so
both sums count it (``BudgetPlan.embedding`` names it; ``matrices`` are the other entries).

The rank r is the plan's own for every matrix, its factors outside the budget; or, with planned
adapters (``ranks=``), each entry's r_i (0: none) and factor bits b_i, and the budget is the
total's (``lorq.budget.choices``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorq.budget.choices import Choices, adapter_bits
from lorq.budget.cost import CostTable, check_planned, cost_table, kl_costs, shape_bits
from lorq.budget.grid import candidate_grid
from lorq.budget.ilp import check_budget, solve
from lorq.config import LEGACY_METHODS, DecomposeConfig
from lorq.quant import QuantConfig
from lorq.util.atomic import atomic_file
from lorq.util.progress import Progress, no_progress

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, int]
    config: QuantConfig
    bits: float  # total stored bits of the quantized matrix
    error: float  # squared (weighted) error of the planned decomposition
    norm: float  # squared (weighted) norm of W
    rank: int | None = None  # the planned adapter's rank (None: the plan's rank, not budgeted)
    factor_bits: int | None = None  # the planned factors' bits (16 or 8; None at rank 0)

    @property
    def adapter_bits(self) -> float:
        """Stored bits of the planned factors (0 when the rank is not planned or is 0)."""
        return adapter_bits(self.shape, self.rank, self.factor_bits)

    @property
    def adapter_label(self) -> str:
        """ "r8", "r8·8" (8-bit factors), "r0"; "" when the rank is not planned."""
        if self.rank is None:
            return ""
        return f"r{self.rank}" + ("·8" if self.factor_bits == 8 else "")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_param(self) -> float:
        return self.bits / self.numel


@dataclass(frozen=True)
class BudgetPlan:
    budget: float
    method: str
    rank: int
    entries: tuple[PlanEntry, ...]
    status: str
    gap: float
    table_seconds: float
    solve_seconds: float
    weighting: str = "none"  # the costs' error: none | fisher | activations | both | kl
    rounding: str = "nearest"  # how Q was rounded for the costs: nearest | gptq
    embedding: str | None = None  # the entry that is the token embedding (plan_embeddings)

    @property
    def matrices(self) -> tuple[PlanEntry, ...]:
        """The entries of the target matrices (every entry but the token embedding's)."""
        return tuple(e for e in self.entries if e.name != self.embedding)

    @property
    def embedding_entry(self) -> PlanEntry | None:
        """The token embedding's entry (its format, no adapter), or None when not planned."""
        return next((e for e in self.entries if e.name == self.embedding), None)

    @property
    def weighted(self) -> bool:
        return self.weighting != "none"

    @property
    def total_params(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def achieved_bits(self) -> float:
        return sum(e.bits for e in self.entries) / self.total_params

    @property
    def total_error(self) -> float:
        return sum(e.error for e in self.entries)

    @property
    def adapters_planned(self) -> bool:
        """Whether the plan chose every matrix's rank and factor bits (its budget counts them)."""
        return any(e.rank is not None for e in self.entries)

    @property
    def achieved_total_bits(self) -> float:
        """Bits/param the budget constrains: the quantized part, plus planned factors."""
        return self.achieved_bits + sum(e.adapter_bits for e in self.entries) / self.total_params

    def adapter_of(self, name: str) -> tuple[int, int | None]:
        """(rank, factor bits) of matrix ``name``: planned, or (the plan's rank, None)."""
        entry = {e.name: e for e in self.entries}[name]
        return (self.rank, None) if entry.rank is None else (entry.rank, entry.factor_bits)

    @property
    def sensitivities(self) -> dict[str, float] | None:
        """{matrix: α} of a KL plan (kept as its entries' norms), else None."""
        return {e.name: e.norm for e in self.entries} if self.weighting == "kl" else None

    @property
    def predicted_kl(self) -> float | None:
        """Σ α_l t_l²: the KL the plan predicts (docs/algorithms.md §10); None unless its costs
        are the KL's."""
        return self.total_error if self.weighting == "kl" else None

    @property
    def relative_error(self) -> float:
        """sqrt(Σ error / Σ ‖W‖²), weighted like the costs."""
        return (self.total_error / sum(e.norm for e in self.entries)) ** 0.5

    def bits_with_low_rank(self, factor_bits: int = 16) -> float:
        """Average bits/param counting B and A (r·(out + in) values each) at ``factor_bits``."""
        if self.adapters_planned:
            return self.achieved_total_bits
        if self.method == "plain":
            return self.achieved_bits
        extra = sum(self.rank * (e.shape[0] + e.shape[1]) * factor_bits for e in self.matrices)
        return self.achieved_bits + extra / self.total_params

    def config_of(self, name: str) -> QuantConfig:
        return {e.name: e.config for e in self.entries}[name]

    def to_dict(self) -> dict[str, Any]:
        entries = [
            {**dataclasses.asdict(e), "shape": list(e.shape), "config": e.config.to_dict()}
            for e in self.entries
        ]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"version": PLAN_VERSION, **fields, "entries": entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BudgetPlan:
        if not isinstance(data, dict):
            raise ValueError(f"a plan is a JSON object, not {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"unsupported plan version {data.get('version')!r}; expected {PLAN_VERSION}"
            )
        entries = tuple(
            PlanEntry(
                **{**e, "shape": tuple(e["shape"]), "config": QuantConfig.from_dict(e["config"])}
            )
            for e in data["entries"]
        )
        fields = {k: v for k, v in data.items() if k not in ("version", "entries")}
        fields["method"] = LEGACY_METHODS.get(fields["method"], fields["method"])
        if "weighted" in fields:  # lorq 0.1: a flag for the Fisher weighting
            fields["weighting"] = "fisher" if fields.pop("weighted") else "none"
        return cls(entries=entries, **fields)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp file + rename): never a half-written plan."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> BudgetPlan:
        if not Path(path).is_file():
            raise FileNotFoundError(f"plan {path} not found; make one with `lorq plan`")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a valid lorq plan ({err})") from None


def plan_budget(
    matrices: Mapping[str, torch.Tensor], budget_bits: float, *args, **kwargs
) -> BudgetPlan:
    """:func:`plan_budgets` at one budget: a config per matrix minimising total error."""
    (plan,) = plan_budgets(matrices, [budget_bits], *args, **kwargs)
    return plan


def plan_budgets(
    matrices: Mapping[str, torch.Tensor],
    budgets: Sequence[float],
    candidates: str | Sequence[str | QuantConfig] = "default",
    method: str = "lq",
    rank: int = 16,
    fisher: Mapping[str, torch.Tensor] | None = None,
    iters: int = 1,
    time_limit: float = 60.0,
    progress: Progress = no_progress,
    hessians: Mapping[str, torch.Tensor] | None = None,
    weighting: str | None = None,
    rounding: str = "nearest",
    sensitivities: Mapping[str, float] | None = None,
    ranks: Sequence[int] | None = None,
    factor_bits: Sequence[int] = (16,),
) -> list[BudgetPlan]:
    """Choose a quantization config per matrix minimising total error under each budget.

    ``matrices``: {name: weight (out × in)}; ``fisher``: optional {name: F (out × in)};
    ``hessians``: {name: H = XᵀX/N (in × in)} for ``weighting`` "activations" / "both" or
    ``rounding="gptq"``, and with ``sensitivities`` {name: α} for "kl" (costs α·t², the KL the
    plan predicts; α from ``lorq.calibrate.sensitivity``). ``weighting`` defaults to "fisher"
    when ``fisher`` is given, else "none". ``ranks`` (e.g. (0, 8, 16)) with ``factor_bits``
    ⊆ (16, 8): the plan also chooses each matrix's rank and factor bits, and each budget counts
    the factors (``rank`` is then unused). One cost table serves every budget (the table is the
    expensive part; a solve is not).
    """
    if weighting is None:
        weighting = "fisher" if fisher is not None else "none"
    if weighting == "kl" and sensitivities is None:  # before the table: it is the long part
        raise ValueError("weighting='kl' needs sensitivities={matrix name: α} (docs §10)")
    method = LEGACY_METHODS.get(method, method)
    grid = Choices(candidate_grid(candidates), _tuple(ranks), tuple(factor_bits))
    config = table_config(method, rank, iters, weighting, rounding)
    check_planned(grid, method, config)
    # read once: a mapping may decode each matrix on access (lorq.model.targets.DenseWeights)
    shapes = {name: (w.shape[0], w.shape[1]) for name, w in matrices.items()}
    if shapes:  # the feasible range depends on shapes only: fail before the expensive table
        bits = np.array([shape_bits(name, shape, grid) for name, shape in shapes.items()])
        numels = np.array([a * b for a, b in shapes.values()])
        for budget_bits in budgets:
            check_budget(bits, numels, budget_bits)
    start = time.perf_counter()
    table = cost_table(matrices, grid, method, config, fisher, progress, hessians)
    if weighting == "kl":
        assert sensitivities is not None
        table = kl_costs(table, sensitivities)
    seconds = time.perf_counter() - start
    job = (method, rank, (weighting, rounding))
    return plans_of_table(table, shapes, budgets, job, seconds, time_limit)


def _tuple(ranks: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if ranks is None else tuple(dict.fromkeys(ranks))


def table_config(
    method: str, rank: int, iters: int, weighting: str, rounding: str
) -> DecomposeConfig:
    """The decomposition a cost table measures each candidate with (its quant replaced); a KL
    plan's table is the H-norm's (``lorq.budget.cost.kl_costs`` scales it)."""
    return DecomposeConfig(
        method="loftq" if method == "loftq" else "lq",
        rank=rank,
        iters=iters,
        weighting="activations" if weighting == "kl" else weighting,  # type: ignore[arg-type]
        rounding=rounding,  # type: ignore[arg-type]
    )


def plans_of_table(
    table: CostTable,
    shapes: Mapping[str, tuple[int, int]],
    budgets: Sequence[float],
    job: tuple[str, int, tuple[str, str]],
    table_seconds: float,
    time_limit: float = 60.0,
) -> list[BudgetPlan]:
    """The ILP's plan at each budget from a finished cost table (e.g. built block by block);
    ``job``: (method, rank, (weighting, rounding)) the table was made with."""
    method, rank, statistics = job
    return [
        _solve_plan(shapes, table, budget_bits, method, rank, time_limit, table_seconds, statistics)
        for budget_bits in budgets
    ]


def _solve_plan(
    shapes: Mapping[str, tuple[int, int]],
    table: CostTable,
    budget_bits: float,
    method: str,
    rank: int,
    time_limit: float,
    table_seconds: float,
    statistics: tuple[str, str],
) -> BudgetPlan:
    start = time.perf_counter()
    solution = solve(table, budget_bits, time_limit)
    entries = tuple(
        _entry(table, i, c, shapes[name])
        for i, (name, c) in enumerate(zip(table.names, solution.choice, strict=True))
    )
    return BudgetPlan(
        budget_bits,
        method,
        rank,
        entries,
        solution.status,
        solution.gap,
        table_seconds,
        time.perf_counter() - start,
        *statistics,
    )


def _entry(table: CostTable, row: int, column: int, shape: tuple[int, int]) -> PlanEntry:
    """Matrix ``row``'s choice ``column``: its bits are the quantized part's (the planned
    factors' counted by the entry)."""
    rank, factor_bits = table.adapter_of(column)
    extra = adapter_bits(shape, rank, factor_bits)
    return PlanEntry(
        table.names[row],
        shape,
        table.candidates[column],
        float(table.bits[row, column]) - extra,
        float(table.cost[row, column]),
        float(table.norms[row]),
        rank,
        factor_bits,
    )
