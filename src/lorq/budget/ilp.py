"""The bit budget as a multiple-choice knapsack, solved by scipy's MILP (HiGHS);
docs/algorithms.md §3.

    minimise    Σ_i Σ_c cost[i, c] · x[i, c]
    subject to  Σ_i Σ_c bits[i, c] · x[i, c] ≤ budget · Σ_i numel_i
                Σ_c x[i, c] = 1  for every matrix i,       x ∈ {0, 1}

Candidates that are dominated for a matrix (another has no more bits and no more error) are
removed before solving; they can never be needed in an optimum, and the problem shrinks. A
candidate whose blocks do not tile a matrix's rows has bits = cost = +inf there: dominated.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from lorq.budget.cost import CostTable, feasible_range


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # (n,) index of the chosen candidate of every matrix
    status: str  # "optimal" or "time limit" (then the best feasible point found)
    gap: float  # relative optimality gap reported by the solver (0 when proven optimal)


def undominated(bits: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Boolean mask (n, c): candidates on each matrix's bits/error Pareto front."""
    keep = np.ones(bits.shape, dtype=bool)
    for i in range(bits.shape[0]):
        order = np.lexsort((cost[i], bits[i]))  # by bits, then error
        best = np.inf
        for c in order:
            if cost[i, c] < best:
                best = cost[i, c]
            else:
                keep[i, c] = False
    return keep


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence HiGHS' C-level debug prints on file descriptor 1 (Python's sys.stdout untouched)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_budget(bits: np.ndarray, numels: np.ndarray, budget: float) -> None:
    """ValueError naming the feasible range unless ``budget`` lies in it; bits: (n, c) totals."""
    low, high = feasible_range(bits, numels)
    if not low - 1e-12 <= budget <= high + 1e-12:
        raise ValueError(
            f"budget={budget} bits/param is outside the feasible range [{low:.4f}, {high:.4f}] "
            "for these matrices and candidates; choose a budget inside it"
        )


def solve(table: CostTable, budget: float, time_limit: float = 60.0) -> Solution:
    """Choose one candidate per matrix minimising total cost under ``budget`` bits/param."""
    check_budget(table.bits, table.numels, budget)
    n, c = table.bits.shape
    keep = undominated(table.bits, table.cost).ravel()
    columns = np.flatnonzero(keep)
    rows = columns // c
    objective = table.cost.ravel()[columns]  # kept candidates fit: their costs are finite
    scale = float(objective.max()) or 1.0  # keeps HiGHS' tolerances meaningful
    objective = objective / scale
    one_each = csr_matrix(
        (np.ones(columns.size), (rows, np.arange(columns.size))), shape=(n, columns.size)
    )
    capacity = budget * table.total_params
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(table.bits.ravel()[columns][None, :] / capacity, -np.inf, 1.0),
    ]
    with _quiet_stdout():
        result = milp(
            objective,
            constraints=constraints,
            integrality=np.ones(columns.size),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
        )
    if result.x is None:
        raise ValueError(f"the budget problem could not be solved: {result.message}")
    chosen = columns[np.round(result.x).astype(bool)] % c
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return Solution(chosen, "optimal" if result.status == 0 else "time limit", gap)
