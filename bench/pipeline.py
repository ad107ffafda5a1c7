"""The one compress pipeline against the two it replaced, on the built-in SmolLM2.

``--part default``: the default job (``lorq compress``, what ``make demo`` runs: LQ-LoRA, nf3,
r = 16, activation weighting, 64 × 128 calibration tokens, 16 evaluation blocks) as a
subprocess under ``/usr/bin/time -v``: wall time, peak RSS, and the perplexity / KL it records,
for the code before the merge (``--before SRC``: a checkout's ``src`` folder, e.g. a git
worktree of the last commit with two pipelines) and after it with block-sequential statistics on
and off. One run of each on the same machine, one after the other.

``--part grid``: the budget grid (2.5 … 3.5 bits; Fisher-weighted plan costs with activation-
weighted decompositions, the CLI's default for a causal LM) with ``sequential`` on and off: one
plan per budget from one cost table (the plan does not depend on ``sequential``: its costs are
the original model's), each compressed both ways, KL / perplexity on 8 evaluation blocks.

``--part lines``: source lines of ``src/lorq`` now and at ``--before`` and the pairs of
duplicated code the ``duplicates`` tool finds in each.

    python bench/pipeline.py --part default --before /tmp/before/src
    python bench/pipeline.py --part grid [--budgets 2.75 3.0 3.25]
    python bench/pipeline.py --part lines --before /tmp/before/src

Results: bench/results/pipeline.json (merged by part), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "pipeline.json"
BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5)


def time_v(text: str) -> dict:
    """Peak RSS (MB) and wall time (s) from GNU time's ``-v`` report."""
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return {"peak_rss_mb": rss / 1024, "wall_s": seconds}


def default_job(src: Path, label: str, extra: list[str]) -> dict:
    """The default job of ``src`` in a fresh process, timed; its lorq.json's evaluation."""
    with tempfile.TemporaryDirectory(prefix="lorq-bench-") as work:
        out = Path(work) / "out"
        env = dict(os.environ, PYTHONPATH=str(src), COLUMNS="160")
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "lorq", "compress", "--out",
                   str(out), "--overwrite", *extra]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stdout}\n{done.stderr}")
        evaluation = json.loads((out / "lorq.json").read_text())["evaluation"]
    row = {"run": label, "flags": extra, **time_v(done.stderr)}
    row.update(perplexity=evaluation["perplexity"], kl=evaluation["kl"])
    print(f"{label}: {row}", flush=True)
    return row


def part_default(args) -> list[dict]:
    rows = []
    if args.before:
        rows.append(default_job(args.before, "before (two pipelines)", []))
    rows.append(default_job(REPO / "src", "after, sequential", ["--sequential"]))
    rows.append(default_job(REPO / "src", "after, not sequential", ["--no-sequential"]))
    return rows


def part_grid(args) -> list[dict]:
    """KL at each budget with the same plans, statistics block-sequential or not."""
    import lorq
    from lorq.calibrate.tokens import Calibration
    from lorq.evaluation.measure import measure
    from lorq.jobs.compress import plan_budgets_for
    from lorq.jobs.evaluate import Evaluation
    from lorq.model.targets import shared_copy

    loaded = lorq.io.models.load_model("smollm2", packed=True)
    tokens = Calibration().load(loaded.tokenizer)
    config = lorq.CompressConfig(
        budget=args.budgets[0], weighting="activations", plan_weighting="fisher"
    )
    start = time.perf_counter()
    plans = plan_budgets_for(loaded.model, config, args.budgets, calibration=tokens)
    print(f"plans: {time.perf_counter() - start:.0f} s", flush=True)
    text = Evaluation(loaded.tokenizer, args.eval_blocks)
    rows = []
    for plan in plans:
        for sequential in (True, False):
            budgeted = replace(config, budget=plan.budget, sequential=sequential)
            start = time.perf_counter()
            model = lorq.compress(shared_copy(loaded.model), budgeted, tokens, plan=plan).model
            seconds = time.perf_counter() - start
            result = measure(model, text.blocks, loaded.model, "").result
            del model
            rows.append({"budget": plan.budget, "sequential": sequential, "seconds": seconds,
                         "kl": result.kl, "perplexity": result.perplexity})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def source_lines(src: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (src / "lorq").rglob("*.py"))


def duplicate_pairs(src: Path) -> str:
    done = subprocess.run(["duplicates", "--repo", str(src), "--most", "40"], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip()


def part_lines(args) -> list[dict]:
    rows = [{"tree": "after", "lines": source_lines(REPO / "src"),
             "duplicates": duplicate_pairs(REPO / "src")}]  # fmt: skip
    if args.before:
        rows.insert(0, {"tree": "before", "lines": source_lines(args.before),
                        "duplicates": duplicate_pairs(args.before)})  # fmt: skip
    for row in rows:
        print(row["tree"], row["lines"], row["duplicates"].splitlines()[0], flush=True)
    return rows


def save(part: str, rows: list[dict]) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[part] = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("default", "grid", "lines"), required=True)
    parser.add_argument("--before", type=Path, help="the src folder of the code to compare with")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    args = parser.parse_args()
    rows = {"default": part_default, "grid": part_grid, "lines": part_lines}[args.part](args)
    save(args.part, rows)


if __name__ == "__main__":
    main()
