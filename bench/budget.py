"""The bit-budget planner (cost table + ILP) on SmolLM2: error vs bits, ILP plan vs uniform configs.

For method "lq" (rank 16, one LQ-LoRA step, the default 16-config grid) the cost table is built
once (it does not depend on the budget) and the ILP is solved for every budget. Each plan is
compared with the best uniform config (one candidate for every matrix) at bits ≤ the budget, and,
for reference, the best uniform config at the smallest bits ≥ the budget. ``plan_budget`` is also
timed end to end at one budget.

    python bench/budget.py                          # the real run (all 210 matrices)
    python bench/budget.py --max-matrices 14 --no-wait   # a smoke test

Writes bench/results/budget.json and bench/results/budget.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from lorq.budget import cost_table, plan_budget
from lorq.budget.grid import candidate_grid
from lorq.budget.ilp import solve
from lorq.config import DecomposeConfig
from lorq.io.models import load_model
from lorq.model.targets import dense_weight, find_targets

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BUDGETS = (2.5, 2.75, 3.0, 3.5, 4.127)
SECONDS_TARGET = 300.0


def others_running() -> list[str]:
    """Other benchmark / test processes (not this one) that would disturb the timings."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    mine = os.getpid()
    found = []
    for line in out.splitlines()[1:]:
        pid, _, cmd = line.strip().partition(" ")
        if int(pid) == mine or "grep" in cmd or "ps -eo" in cmd:
            continue
        if "bench/" in cmd or "pytest" in cmd or "lorq " in cmd:
            found.append(cmd[:120])
    return found


def wait_quiet(max_seconds: float) -> dict:
    start = time.perf_counter()
    while (busy := others_running()) and time.perf_counter() - start < max_seconds:
        print(f"waiting for a quiet machine: {busy}", flush=True)
        time.sleep(30)
    return {
        "waited_seconds": time.perf_counter() - start,
        "quiet": not busy,
        "others_running": busy,
        "load_average": os.getloadavg(),
    }


def uniform_points(table) -> list[dict]:
    total = table.total_params
    points = []
    for c, config in enumerate(table.candidates):
        err = float(table.cost[:, c].sum())
        points.append(
            dict(
                config=config.name,
                bits=float(table.bits[:, c].sum() / total),
                error=err,
                relative_error=float(np.sqrt(err / table.norms.sum())),
            )
        )
    return sorted(points, key=lambda p: (p["bits"], p["error"]))


def plan_point(table, budget: float) -> dict:
    start = time.perf_counter()
    solution = solve(table, budget)
    seconds = time.perf_counter() - start
    rows = np.arange(table.bits.shape[0])
    err = float(table.cost[rows, solution.choice].sum())
    configs = [table.candidates[c].name for c in solution.choice]
    return dict(
        budget=budget,
        bits=float(table.bits[rows, solution.choice].sum() / table.total_params),
        error=err,
        relative_error=float(np.sqrt(err / table.norms.sum())),
        status=solution.status,
        gap=solution.gap,
        solve_seconds=seconds,
        configs={name: configs.count(name) for name in sorted(set(configs))},
    )


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = sorted((p["bits"], p["relative_error"]) for p in data["curve"])
    ax.plot(*zip(*curve, strict=True), "-", color="C0", lw=1.5, label="ILP plan (budget sweep)")
    marked = [(r["plan"]["bits"], r["plan"]["relative_error"]) for r in data["budgets"]]
    ax.plot(*zip(*marked, strict=True), "o", color="C0", ms=7, label="ILP at the bench budgets")
    uni = data["uniform"]
    ax.plot(
        [u["bits"] for u in uni],
        [u["relative_error"] for u in uni],
        "s",
        color="C1",
        ms=5,
        label="uniform configs",
    )
    ax.set_yscale("log")
    ax.set_xlabel("bits/param (quantized part)")
    ax.set_ylabel("relative error sqrt(Σ err / Σ ‖W‖²)")
    ax.set_title(f"SmolLM2, {data['matrices']} matrices, LQ-LoRA r={data['rank']} (1 step)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-matrices", type=int, default=None, help="first N (smoke test)")
    parser.add_argument("--wait", type=float, default=600.0, help="max seconds to wait for quiet")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--end-to-end-budget", type=float, default=2.75)
    parser.add_argument("--no-end-to-end", action="store_true", help="skip timing plan_budget")
    parser.add_argument(
        "--sweep", type=int, default=0, help="extra evenly spaced budgets for the ILP curve"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "budget.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    loaded = load_model("smollm2", with_tokenizer=False)
    weights = {name: dense_weight(m) for name, m in find_targets(loaded.model).items()}
    if args.max_matrices:
        weights = dict(list(weights.items())[: args.max_matrices])
    grid = candidate_grid("default")
    config = DecomposeConfig(method="lq", rank=args.rank, iters=1)
    quiet = {"skipped": True} if args.no_wait else wait_quiet(args.wait)
    print(f"machine: {quiet}", flush=True)

    start = time.perf_counter()
    table = cost_table(weights, grid, "lq", config)
    table_seconds = time.perf_counter() - start
    print(f"cost table: {len(weights)} × {len(grid)} in {table_seconds:.1f} s", flush=True)

    uniform = uniform_points(table)
    rows = []
    for budget in args.budgets:
        plan = plan_point(table, budget)
        below = [u for u in uniform if u["bits"] <= budget + 1e-12]
        above = [u for u in uniform if u["bits"] >= budget - 1e-12]
        best_below = min(below, key=lambda u: u["error"]) if below else None
        best_above = None
        if above:
            lowest = min(u["bits"] for u in above)
            best_above = min((u for u in above if u["bits"] == lowest), key=lambda u: u["error"])
        row = dict(
            budget=budget,
            plan=plan,
            uniform_at_or_below=best_below,
            uniform_at_or_above=best_above,
            ratio_vs_below=plan["error"] / best_below["error"] if best_below else None,
            ratio_vs_above=plan["error"] / best_above["error"] if best_above else None,
        )
        rows.append(row)
        print(
            f"budget {budget:.3f}: ILP {plan['bits']:.3f} b rel {plan['relative_error']:.4f} "
            f"({plan['solve_seconds']:.2f} s, {plan['status']}, gap {plan['gap']:.1e}) | "
            f"uniform ≤: {best_below and best_below['config']} "
            f"{best_below and round(best_below['relative_error'], 4)} "
            f"ratio {row['ratio_vs_below'] and round(row['ratio_vs_below'], 3)} | "
            f"uniform ≥: {best_above and best_above['config']} "
            f"ratio {row['ratio_vs_above'] and round(row['ratio_vs_above'], 3)}",
            flush=True,
        )

    low, high = table.feasible_range()
    extra = np.linspace(low, min(high, 8.6), args.sweep).tolist() if args.sweep else []
    sweep = sorted({*extra, *[u["bits"] for u in uniform]})
    curve = [plan_point(table, b) for b in sweep]
    # at every uniform config's own bits the plan must not lose to it
    vs_uniform = [
        dict(
            config=u["config"],
            bits=u["bits"],
            ratio=next(p for p in curve if p["budget"] == u["bits"])["error"] / u["error"],
        )
        for u in uniform
    ]

    data = dict(
        model="smollm2",
        matrices=len(weights),
        params=table.total_params,
        rank=args.rank,
        method="lq",
        plan_iters=1,
        candidates=[c.name for c in grid],
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} "
        "threads",
        machine_before=quiet,
        feasible_range=[low, high],
        table_seconds=table_seconds,
        seconds_target=SECONDS_TARGET,
        budgets=rows,
        uniform=uniform,
        curve=curve,
        ilp_vs_uniform_at_uniform_bits=vs_uniform,
    )
    args.out.write_text(json.dumps(data, indent=1))
    plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", flush=True)
    if args.no_end_to_end:
        return

    start = time.perf_counter()
    plan = plan_budget(weights, args.end_to_end_budget, "default", "lq", args.rank)
    end_to_end = dict(
        budget=args.end_to_end_budget,
        seconds=time.perf_counter() - start,
        table_seconds=plan.table_seconds,
        solve_seconds=plan.solve_seconds,
        achieved_bits=plan.achieved_bits,
        relative_error=plan.relative_error,
        bits_with_low_rank_bf16=plan.bits_with_low_rank(16),
    )
    print(f"plan_budget end to end at {args.end_to_end_budget}: {end_to_end}", flush=True)
    data["end_to_end"] = end_to_end
    data["machine_after"] = {"others_running": others_running(), "load_average": os.getloadavg()}
    args.out.write_text(json.dumps(data, indent=1))
    plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
