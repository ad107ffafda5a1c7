"""Mixed precision under a bit budget: cost table + multiple-choice knapsack
(docs/algorithms.md §3)."""

from lorq.budget.cost import CostTable, cost_table
from lorq.budget.grid import candidate_grid
from lorq.budget.ilp import solve
from lorq.budget.plan import BudgetPlan, PlanEntry, plan_budget, plan_budgets

__all__ = [
    "BudgetPlan",
    "CostTable",
    "PlanEntry",
    "candidate_grid",
    "cost_table",
    "plan_budget",
    "plan_budgets",
    "solve",
]
