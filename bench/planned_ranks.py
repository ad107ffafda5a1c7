"""Plans that choose ranks and factor precision (``plan_ranks``, docs/algorithms.md §10.1)
against today's fixed rank, at the same total bits, on the built-in SmolLM2.

The configuration is bench/recovery.py's budget plan (LQ-LoRA, activation-weighted
decompositions, Fisher-weighted plan costs, 16 NF candidates, 64 × 128 calibration tokens). For
each ``--budget`` B (bits/param of the quantized part at rank ``--rank``): the fixed-rank plan at
B, whose total with its fp16 factors is T; then a plan over formats × ``--ranks`` ×
``--factor-bits`` at that same total T (the budget counts the factors); both compressed with the
same calibration tokens and measured (KL, perplexity against the original) on ``--eval-blocks``
blocks of the built-in evaluation split. Each row: total and quantized bits, the ranks chosen,
table and solve seconds, compress seconds, KL. One process, one run after the other.

    python bench/planned_ranks.py                         # B = 2.75, ranks 0,8,16,32 × 16,8
    python bench/planned_ranks.py --budget 2.75 3.25 --ranks 0 8 16 32 64
    python bench/planned_ranks.py --solve-only            # the ILP's seconds on the larger grid

``--solve-only``: the unweighted cost table of SmolLM2's 210 matrices over the grid, then HiGHS'
seconds to solve it at 2.5 … 4.5 bits/param against the 16-column (fixed-rank) table's.

Results: bench/results/planned_ranks.json (merged by budget), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "planned_ranks.json"


def measured(label, config, plan, inputs, table_seconds) -> dict:
    """``config`` compressed with ``plan``, its KL and perplexity on the evaluation text."""
    import lorq
    from lorq.evaluation.measure import measure
    from lorq.model.targets import shared_copy

    loaded, tokens, text = inputs
    start = time.perf_counter()
    model = lorq.compress(shared_copy(loaded.model), config, tokens, plan=plan).model
    seconds = time.perf_counter() - start
    result = measure(model, text.blocks, loaded.model, "").result
    ranks = Counter(e.adapter_label or f"r{plan.rank}" for e in plan.entries)
    row = {
        "plan": label,
        "total_bits": round(plan.bits_with_low_rank(16), 4),
        "quantized_bits": round(plan.achieved_bits, 4),
        "ranks": dict(sorted(ranks.items())),
        "table_seconds": round(table_seconds, 1),
        "solve_seconds": round(plan.solve_seconds, 2),
        "compress_seconds": round(seconds, 1),
        "kl": result.kl,
        "perplexity": result.perplexity,
    }
    print(row, flush=True)
    return row


def plans(config, budgets: list[float], inputs) -> tuple[list, float]:
    """The plans of ``config`` at ``budgets`` from one cost table, and the table's seconds."""
    from lorq.jobs.compress import plan_budgets_for

    loaded, tokens, _ = inputs
    start = time.perf_counter()
    out = plan_budgets_for(loaded.model, config, budgets, calibration=tokens)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, nargs="+", default=[2.75])
    parser.add_argument("--rank", type=int, default=16, help="the fixed-rank plan's rank")
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 16, 32])
    parser.add_argument("--factor-bits", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--solve-only", action="store_true", help="the ILP's seconds alone")
    args = parser.parse_args()
    if args.solve_only:
        return solve_seconds(args.ranks, args.factor_bits)
    import lorq
    from lorq.calibrate.tokens import Calibration
    from lorq.jobs.evaluate import Evaluation

    loaded = lorq.io.models.load_model("smollm2", packed=True)
    inputs = (
        loaded,
        Calibration().load(loaded.tokenizer),
        Evaluation(loaded.tokenizer, args.eval_blocks),
    )
    base = lorq.CompressConfig(
        weighting="activations", budget=args.budget[0], plan_weighting="fisher", rank=args.rank
    )
    fixed, fixed_seconds = plans(base, args.budget, inputs)
    totals = [plan.bits_with_low_rank(16) for plan in fixed]
    planned_config = replace(
        base,
        budget=totals[0],
        plan_ranks=tuple(args.ranks),
        plan_factor_bits=tuple(args.factor_bits),
    )
    planned, planned_seconds = plans(planned_config, totals, inputs)
    ranks, factor_bits = (",".join(map(str, v)) for v in (args.ranks, args.factor_bits))
    grid = f"ranks {ranks} × factor bits {factor_bits}"
    for budget, total, a, b in zip(args.budget, totals, fixed, planned, strict=True):
        rows = [
            measured(f"fixed r{args.rank}", replace(base, budget=budget), a, inputs, fixed_seconds),
            measured(
                f"planned: {grid}",
                replace(planned_config, budget=total),
                b,
                inputs,
                planned_seconds,
            ),
        ]
        report(f"budget {budget:g} (total {total:.4f})", rows)


def solve_seconds(ranks: list[int], factor_bits: list[int]) -> None:
    """HiGHS' seconds on the fixed-rank and the planned grid of SmolLM2's matrices."""
    import lorq
    from lorq.budget import candidate_grid, cost_table, solve
    from lorq.budget.choices import Choices
    from lorq.config import DecomposeConfig
    from lorq.model.targets import dense_weight, targets_of

    model = lorq.io.models.load_model("smollm2", packed=True).model
    targets = targets_of(model, lorq.CompressConfig())
    weights = {name: dense_weight(m).float() for name, m in targets.items()}
    grid = candidate_grid("default")
    for label, choices in (
        ("fixed r16", Choices(grid)),
        ("planned", Choices(grid, tuple(ranks), tuple(factor_bits))),
    ):
        table = cost_table(weights, choices, "lq", DecomposeConfig(rank=16, iters=1))
        low, high = table.feasible_range()
        for budget in (2.5, 3.0, 3.5, 4.0, 4.5):
            if low <= budget <= high:
                start = time.perf_counter()
                solution = solve(table, budget)
                seconds = time.perf_counter() - start
                print(f"| {label} | {table.bits.shape[0]} × {table.bits.shape[1]} | {budget} | "
                      f"{solution.status} | {seconds:.2f} |")  # fmt: skip


def report(key: str, rows: list[dict]) -> None:
    """``rows`` into the results file under ``key`` (rows of the same label replaced), and a
    table on stdout."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept = {row["plan"]: row for row in data.get(key, {}).get("rows", [])}
    rows = list({**kept, **{row["plan"]: row for row in rows}}.values())
    data[key] = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"| {key} | plan | total bits | quantized bits | ranks | table s | compress s | KL | ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ranks = ", ".join(f"{k}: {n}" for k, n in row["ranks"].items())
        print(f"| | {row['plan']} | {row['total_bits']:.4f} | {row['quantized_bits']:.4f} | "
              f"{ranks} | {row['table_seconds']} | {row['compress_seconds']} | {row['kl']:.4f} | "
              f"{row['perplexity']:.3f} |")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
