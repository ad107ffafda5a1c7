"""Plans calibrated to the KL (``--plan-weighting kl``, ALGORITHMS.md §10) on the built-in SmolLM2.

The same decomposition for every plan (LQ-LoRA, r = 16, activation-weighted, block-sequential,
64 × 128 calibration tokens, the default NF grid); only the plan's costs differ:

    kl           α_l · t²_{l,c}: the measured KL sensitivity × relative output error (H-norm)
    fisher       the Fisher-weighted weight error (the default for causal LMs until now)
    activations  the summed output errors ‖(W − Ŵ) L‖² (t² × ‖W L‖², no α)

Each plan at each ``--budgets`` is compressed and measured: KL and perplexity against the
original on ``--eval-blocks`` blocks of the built-in evaluation text (neither the calibration
text the plans and α were measured on, nor training text). The KL each plan predicts (Σ α·t²
of its choices, from one H-norm cost table and the measured α) is reported beside the KL
measured, for these plans and for ``--random`` more: ILP plans of costs jittered at random
(log-normal, σ = 1) at random budgets in [2.5, 3.5], for a rank correlation over varied plans.
With ``--embeddings`` (the default) α of the token embedding is measured too, and at each budget
a KL plan with the table as one more row (``plan_embeddings``) is compressed at the same total
bytes as the linears at that budget beside the table the built-in GGUF holds (Q8_0).

    python bench/kl_plan.py                          # 2.75 and 3.0 bits, 4 random plans
    python bench/kl_plan.py --budgets 2.5 3.25 3.5 --random 0 --weightings kl fisher
    python bench/kl_plan.py --budgets 3.0 --weightings kl --random 10   # + the table planned
    python bench/kl_plan.py --model minilm --budgets 2.75 3.25 --random 10   # 1 − cos

Results: bench/results/kl_plan.json (rows merged by label), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "kl_plan.json"
WEIGHTINGS = ("kl", "fisher", "activations")


def predicted(plan, table, alphas: dict[str, float]) -> float:
    """Σ α_l t_l² of the plan's choices, t² from the H-norm ``table``."""
    index = {c: j for j, c in enumerate(table.candidates)}
    total = 0.0
    for i, entry in enumerate(plan.entries):
        assert table.names[i] == entry.name
        total += alphas[entry.name] * table.cost[i, index[entry.config]] / table.norms[i]
    return total


def random_plans(table, shapes, job, count: int, seed: int = 0) -> list:
    """``count`` ILP plans of the H-norm ``table`` with each cost jittered (log-normal, σ = 1),
    at budgets drawn from [2.5, 3.5]."""
    from lorq.budget.plan import plans_of_table

    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(count):
        jittered = replace(table, cost=table.cost * rng.lognormal(0.0, 1.0, table.cost.shape))
        budget = float(np.round(rng.uniform(2.5, 3.5), 3))
        (plan,) = plans_of_table(jittered, shapes, [budget], job, 0.0)
        plans.append(plan)
    return plans


def table_plan(model, table, shapes, alphas, budget: float, job) -> tuple:
    """(label, plan, its table): the KL plan with the token embedding a row of it (--plan-
    embeddings), at the total bits of the linears at ``budget`` beside the table as the built-in
    GGUF holds it (Q8_0, 8.5 bits/param, decoded exactly): the same bytes, spent by the ILP."""
    from lorq.budget.cost import embedding_row, kl_costs
    from lorq.budget.grid import candidate_grid
    from lorq.budget.plan import plans_of_table
    from lorq.model.packing import input_embedding, table_weight
    from lorq.pipeline.passes import join_tables

    name, module = input_embedding(model)
    weight = table_weight(module)
    row = embedding_row(name, weight, candidate_grid("default"))
    joined = join_tables([table, row])  # relative errors: H-norm rows, the table's Frobenius
    linear = float(table.numels.sum())
    total = (budget * linear + 8.5 * weight.numel()) / (linear + weight.numel())
    every = {**shapes, name: tuple(weight.shape)}
    (plan,) = plans_of_table(kl_costs(joined, alphas), every, [total], job, 0.0)
    plan = replace(plan, embedding=name, weighting="kl")
    label = f"kl plan + token embedding, {total:.3f} bits (= {budget:g} + Q8_0 table)"
    return label, plan, joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.75, 3.0])
    parser.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
    parser.add_argument("--random", type=int, default=4, help="random plans (predicted vs KL)")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument(
        "--embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a KL plan with the token embedding in it (α_E measured)",
    )
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    args = parser.parse_args()
    if args.model == "minilm":  # an encoder: α of 1 − cos, no Fisher; its table is fp32
        args.weightings = [w for w in args.weightings if w != "fisher"]
        args.embeddings = False

    import lorq
    from lorq.budget.cost import cost_table, kl_costs
    from lorq.budget.grid import candidate_grid
    from lorq.budget.plan import plans_of_table, table_config
    from lorq.calibrate.tokens import Calibration
    from lorq.evaluation.measure import measure
    from lorq.jobs.compress import plan_budgets_for
    from lorq.jobs.evaluate import Evaluation
    from lorq.jobs.statistics import estimate_hessians
    from lorq.model.targets import dense_weight, shared_copy, targets_of

    loaded = lorq.io.models.load_model(args.model)
    model, tokens = loaded.model, Calibration().load(loaded.tokenizer)
    text = Evaluation(loaded.tokenizer, args.eval_blocks)
    base = lorq.CompressConfig(weighting="activations", quant=None, budget=args.budgets[0])
    names = list(targets_of(model, base))
    targets = {name: model.get_submodule(name) for name in names}
    start = time.perf_counter()
    hessians = estimate_hessians(model, tokens, targets)
    print(f"H of {len(names)} targets: {time.perf_counter() - start:.0f} s", flush=True)

    plans, seconds = {}, {}
    start = time.perf_counter()  # α alone: a KL plan over two candidates (a cheap table)
    probe = replace(base, plan_weighting="kl", candidates="nf3,nf4", budget=3.5,
                    plan_embeddings=args.embeddings)  # fmt: skip
    (measured,) = plan_budgets_for(model, probe, [3.5], hessians=hessians, calibration=tokens)
    alphas = measured.sensitivities
    assert alphas is not None
    seconds["kl sensitivities"] = round(time.perf_counter() - start, 1)
    print(f"sensitivities: {seconds['kl sensitivities']} s", flush=True)

    start = time.perf_counter()
    weights = {name: dense_weight(m).float() for name, m in targets.items()}
    decomposition = table_config("lq", base.rank, base.plan_iters, "activations", "nearest")
    table = cost_table(weights, candidate_grid(base.candidates), "lq", decomposition,
                       hessians=hessians)  # fmt: skip
    seconds["H-norm cost table"] = round(time.perf_counter() - start, 1)
    print(f"H-norm table: {seconds['H-norm cost table']} s", flush=True)
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    tables = {"kl": kl_costs(table, alphas), "activations": table}
    for weighting in args.weightings:
        job = ("lq", base.rank, (weighting, "nearest"))
        if weighting == "fisher":  # the Fisher's own pass and table, as the job makes them
            start = time.perf_counter()
            config = replace(base, plan_weighting="fisher")
            made = plan_budgets_for(model, config, args.budgets, calibration=tokens)
            seconds["fisher plans"] = round(time.perf_counter() - start, 1)
        else:
            made = plans_of_table(tables[weighting], shapes, args.budgets, job, 0.0)
        for budget, plan in zip(args.budgets, made, strict=True):
            plans[f"{weighting} plan, {budget:g} bits"] = plan
    job = ("lq", base.rank, ("activations", "nearest"))
    for i, plan in enumerate(random_plans(table, shapes, job, args.random)):
        plans[f"random plan {i + 1}, {plan.budget:g} bits"] = plan
    tables = {id(plan): table for plan in plans.values()}
    if args.embeddings:
        for budget in args.budgets:
            label, plan, joined = table_plan(model, table, shapes, alphas, budget, job)
            plans[label], tables[id(plan)] = plan, joined

    rows = []
    for label, plan in plans.items():
        start = time.perf_counter()
        config = replace(base, budget=plan.budget)
        compressed = lorq.compress(shared_copy(model), config, tokens, plan=plan).model
        result = measure(compressed, text.blocks, model, "").result
        del compressed
        rows.append({
            "plan": label, "weighting": plan.weighting, "budget": plan.budget,
            "bits": plan.achieved_bits,
            "predicted_kl": predicted(plan, tables[id(plan)], alphas),
            "kl": divergence(result), "perplexity": result.perplexity,
            "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip
        print(rows[-1], flush=True)
    report(rows, seconds, alphas, results_file(args.model))


def divergence(result) -> float:
    """The KL of a causal LM's next-token distributions; 1 − cos of an encoder's embeddings."""
    return result.kl if result.kl is not None else 1.0 - result.cosine


def results_file(model: str) -> Path:
    return RESULTS if model == "smollm2" else RESULTS.with_name(f"kl_plan-{model}.json")


def report(rows: list[dict], seconds: dict, alphas: dict, path: Path = RESULTS) -> None:
    """Rows into the results file (merged by label), the table and Spearman's ρ on stdout."""
    from scipy.stats import spearmanr

    data = json.loads(path.read_text()) if path.exists() else {}
    merged = {row["plan"]: row for row in data.get("rows", [])}
    merged.update({row["plan"]: row for row in rows})
    rows = list(merged.values())
    rho = float(spearmanr([r["predicted_kl"] for r in rows], [r["kl"] for r in rows]).statistic)
    data.update({"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
                 "plan_seconds": {**data.get("plan_seconds", {}), **seconds},
                 "spearman": rho, "alphas": alphas})  # fmt: skip
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print("| plan | bits Q | predicted KL (1 − cos) | KL (1 − cos) | perplexity | seconds |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["plan"].startswith("random"), r["plan"])):
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        print(f"| {r['plan']} | {r['bits']:.3f} | {r['predicted_kl']:.4f} | {r['kl']:.4f} | "
              f"{ppl} | {r['seconds']} |")  # fmt: skip
    print(f"Spearman ρ (predicted, measured) over {len(rows)} plans: {rho:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
