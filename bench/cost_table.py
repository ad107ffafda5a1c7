"""The bit budget's cost table on SmolLM2: the shared-work path against the per-candidate path.

One process, the same matrices and configs: ``cost_table(..., shared_work=False)`` (every candidate
quantized, packed, decoded on its own: the table as it was built before) and the default
``shared_work=True`` (``lorq.budget.shared``), alternated ``--repeats`` times; per path the fastest
run is reported. Both tables must be equal float for float, and so must the ILP's plans at the
bench budgets. ``--profile N`` adds a cProfile split (SVD / quantize / decode / shared / error) of
both paths on the first N matrices.

    python bench/cost_table.py                                # none + fisher, 210 matrices
    OMP_NUM_THREADS=1 python bench/cost_table.py --repeats 2  # what bench/README.md quotes
    python bench/cost_table.py --max-matrices 14 --weightings none --out /tmp/c.json  # smoke

The Fisher of the "fisher" rows is synthetic (uniform random, fixed seed): the table's time does
not depend on its values, and estimating the real one takes minutes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from lorq.budget import cost_table, solve
from lorq.budget.grid import candidate_grid
from lorq.config import DecomposeConfig
from lorq.io.models import load_model
from lorq.model.targets import dense_weight, find_targets

ROOT = Path(__file__).resolve().parent
BUDGETS = (2.5, 2.75, 3.0, 3.5, 4.127)
PATHS = {"per candidate (before)": False, "shared work (now)": True}
# cProfile buckets: label → (file suffix, class or "", function), its cumulative time reported
BUCKETS = {
    "low-rank step (SVD)": ("decompose/common.py", "LowRankStep", "__call__"),
    "quantize (per candidate)": ("decompose/common.py", "Rounding", "__call__"),
    "decode (per candidate)": ("quant/tensor.py", "QuantizedTensor", "dequantize"),
    "shared NF work": ("budget/shared.py", "", "nf_dequantized"),
    "error ‖W − Q − L‖": ("budget/cost.py", "", "_error"),
}


def others_running() -> list[str]:
    """Other python / pytest processes that would share the 2 cores."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if "python" in cmd and ("pytest" in cmd or "bench/" in cmd or "lorq" in cmd):
            found.append(cmd[:120])
    return found


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "others_running_before": others_running(),
    }


def statistics(weights: dict, weighting: str) -> dict | None:
    if weighting == "none":
        return None
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(w.shape, generator=g) for name, w in weights.items()}


def timed_tables(weights, grid, config, fisher, repeats: int) -> tuple[dict, dict]:
    """{path: fastest seconds}, {path: table}: the two paths alternated ``repeats`` times, after
    both ran once on two matrices (caches of levels and grids, first-call allocations)."""
    warm = dict(list(weights.items())[:2])
    for shared in PATHS.values():
        subset = None if fisher is None else {n: fisher[n] for n in warm}
        cost_table(warm, grid, "lq", config, subset, shared_work=shared)
    seconds: dict[str, float] = {}
    tables = {}
    for _ in range(repeats):
        for label, shared in PATHS.items():
            start = time.perf_counter()
            tables[label] = cost_table(weights, grid, "lq", config, fisher, shared_work=shared)
            took = time.perf_counter() - start
            seconds[label] = min(seconds.get(label, np.inf), took)
            print(f"  {label}: {took:.2f} s", flush=True)
    return seconds, tables


def compare(tables: dict) -> dict:
    before, now = tables.values()
    scale = np.where(before.cost > 0, before.cost, 1.0)
    plans_equal = {}
    for budget in BUDGETS:
        choices = [solve(t, budget).choice for t in (before, now)]
        plans_equal[str(budget)] = bool(np.array_equal(*choices))
    return {
        "bits_equal": bool(np.array_equal(before.bits, now.bits)),
        "costs_equal": bool(np.array_equal(before.cost, now.cost)),
        "norms_equal": bool(np.array_equal(before.norms, now.norms)),
        "max_relative_cost_difference": float(np.max(np.abs(now.cost - before.cost) / scale)),
        "plans_equal": plans_equal,
    }


def profile_split(weights, grid, config, fisher, count: int) -> dict:
    """cProfile's cumulative seconds per bucket for both paths on the first ``count`` matrices."""
    subset = dict(list(weights.items())[:count])
    fisher = None if fisher is None else {name: fisher[name] for name in subset}
    split = {}
    for label, shared in PATHS.items():
        profiler = cProfile.Profile()
        profiler.runcall(cost_table, subset, grid, "lq", config, fisher, shared_work=shared)
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        total = max(v[3] for v in stats.values())
        row = {"total": total}
        for name, where in BUCKETS.items():
            row[name] = sum(v[3] for key, v in stats.items() if _where(*key) == where)
        split[label] = row
    return split


def _where(path: str, line: int, function: str) -> tuple[str, str, str]:
    """(file suffix, enclosing class or "", function) of a profiled function."""
    suffix = "/".join(Path(path).parts[-2:])
    try:
        source = Path(path).read_text().splitlines()
    except OSError:  # a builtin ("~") or a file gone
        return suffix, "", function
    if line < 1 or not source[line - 1].startswith(" "):  # a module-level function
        return suffix, "", function
    top = next((s for s in reversed(source[: line - 1]) if s[:1].isalpha()), "")
    cls = top.split()[1].split("(")[0].rstrip(":") if top.startswith("class ") else ""
    return suffix, cls, function


def markdown(rows: list[dict], matrices: int, entries: int) -> str:
    lines = [
        "| weighting | path | seconds | ms / entry | speedup | costs equal | plans equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row["seconds"]["per candidate (before)"]
        for label, seconds in row["seconds"].items():
            lines.append(
                f"| {row['weighting']} | {label} | {seconds:.2f} | {1000 * seconds / entries:.2f} "
                f"| {base / seconds:.2f}× | {row['equal']['costs_equal']} | "
                f"{all(row['equal']['plans_equal'].values())} |"
            )
    return f"{matrices} matrices × {entries // matrices} candidates\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weightings", default="none,fisher", help="comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="alternations of the two paths")
    parser.add_argument("--max-matrices", type=int, default=None, help="first N (smoke test)")
    parser.add_argument("--profile", type=int, default=14, help="matrices profiled (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cost_table.json")
    args = parser.parse_args()

    env = environment()
    loaded = load_model("smollm2", with_tokenizer=False)
    weights = {n: dense_weight(m).float() for n, m in find_targets(loaded.model).items()}
    weights = dict(list(weights.items())[: args.max_matrices])
    grid = candidate_grid("default")
    entries = len(weights) * len(grid)
    rows = []
    for weighting in args.weightings.split(","):
        config = DecomposeConfig(method="lq", rank=args.rank, iters=1, weighting=weighting)
        fisher = statistics(weights, weighting)
        print(f"weighting {weighting}: {len(weights)} × {len(grid)}", flush=True)
        seconds, tables = timed_tables(weights, grid, config, fisher, args.repeats)
        row = {"weighting": weighting, "seconds": seconds, "equal": compare(tables)}
        if args.profile:
            row["profile"] = profile_split(weights, grid, config, fisher, args.profile)
        rows.append(row)
    env["load_average_after"] = os.getloadavg()
    env["others_running_after"] = others_running()
    print(markdown(rows, len(weights), entries))
    for row in rows:
        for label, split in row.get("profile", {}).items():
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in split.items())
            print(f"{row['weighting']}, {label}: {parts}")
    result = {
        "benchmark": "bench/cost_table.py",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "model": "smollm2",
        "matrices": len(weights),
        "candidates": [c.name for c in grid],
        "rank": args.rank,
        "budgets": BUDGETS,
        "timing": "fastest of --repeats alternated runs per path, time.perf_counter",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
