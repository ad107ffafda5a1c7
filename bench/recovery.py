"""Block-wise recovery (``--recover block``, ALGORITHMS.md §9) on the built-in SmolLM2.

The default job's configuration (LQ-LoRA, nf3, r = 16, activation weighting, block-sequential,
64 × 128 calibration tokens) and, with ``--budget``, Fisher-planned mixed precision at that
budget, each compressed without recovery and with it at every ``--lr`` (same calibration tokens,
same plan): seconds of the compression, and KL / perplexity against the original on
``--eval-blocks`` blocks of the built-in evaluation split (text neither calibration saw nor
recovery trained on). One process, one run after the other.

    python bench/recovery.py                               # the default job, lr 1e-4 and 1e-3
    python bench/recovery.py --budget 2.75 --lr 1e-3       # a budget plan
    python bench/recovery.py --end-to-end --steps 40       # lorq recover after the default job
    python bench/recovery.py --end-to-end --after-block --budget 3.25   # block, then end to end

``--end-to-end``: the configuration's model (the default job, or the ``--budget`` plan; with
``--after-block`` recovered block-wise at the defaults first) saved, then ``lorq.recover`` (the
KL to the original on its cached top-64, ``--steps`` AdamW steps of 4 × 128 tokens of the
built-in training text at each ``--lr``), each result measured the same way as above; seconds
of the recovery (teacher cache included).

Results: bench/results/recovery.json (merged by configuration), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "recovery.json"
NF4 = "bnb NF4-DQ, 4.127 bits (reference; B = 0)"


def peak_mb() -> int:
    """The process's peak resident memory so far, MB (runs go one after the other, so a row's is
    an upper bound of its own; a row above the ones before it is its own peak)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def block_runs(config, lrs: list[float], scale_lrs: list[float], steps: int) -> list:
    """(label, config): no recovery, then block-wise at each factor and scale learning rate
    (scale lr 0: the factors only)."""
    runs = [("none", replace(config, recover="none"))]
    for lr in lrs:
        for scale_lr in scale_lrs:
            label = f"block, lr {lr:g}" + (f", scales {scale_lr:g}" if scale_lr else "")
            scales = {"recover_scales": bool(scale_lr), "recover_scale_lr": scale_lr or 1e-3}
            run = replace(config, recover="block", recover_steps=steps, recover_lr=lr, **scales)
            runs.append((label, run))
    return runs


def loaded_inputs(config, eval_blocks: int):
    """The built-in SmolLM2 (packed), its calibration tokens, the Fisher plan of ``config``'s
    budget (None without one) and the evaluation text."""
    import lorq
    from lorq.calibrate.tokens import Calibration
    from lorq.jobs.compress import plan_budgets_for
    from lorq.jobs.evaluate import Evaluation

    loaded = lorq.io.models.load_model("smollm2", packed=True)
    tokens = Calibration().load(loaded.tokenizer)
    plan = None
    if config.budget is not None:
        plan = plan_budgets_for(loaded.model, config, [config.budget], calibration=tokens)[0]
    return loaded, tokens, plan, Evaluation(loaded.tokenizer, eval_blocks)


def row(label: str, steps: int, seconds: float, model, text, original) -> dict:
    """One measured row (KL and perplexity of ``model`` against ``original`` on ``text``)."""
    from lorq.evaluation.measure import measure

    result = measure(model, text.blocks, original, "").result
    out = {"recover": label, "steps": steps, "seconds": round(seconds, 1), "peak_mb": peak_mb(),
           "kl": result.kl, "perplexity": result.perplexity}  # fmt: skip
    print(out, flush=True)
    return out


def rows_for(config, runs: list, eval_blocks: int) -> list[dict]:
    """The compression of each of ``runs`` (label, config), measured."""
    import lorq
    from lorq.model.targets import shared_copy

    loaded, tokens, plan, text = loaded_inputs(config, eval_blocks)
    rows = []
    for label, run in runs:
        start = time.perf_counter()
        planned = plan if run.budget is not None else None
        model = lorq.compress(shared_copy(loaded.model), run, tokens, plan=planned).model
        steps = run.recover_steps if run.recover == "block" else 0
        rows.append(row(label, steps, time.perf_counter() - start, model, text, loaded.model))
        del model
    return rows


def end_to_end_rows(config, lrs: list[float], scale_lrs, steps: int, eval_blocks: int) -> list:
    """``config``'s model (compressed once, saved), then recovered end to end at each learning
    rate (and scale rate; 0: the factors only)."""
    import tempfile

    import lorq
    from lorq.model.targets import shared_copy

    loaded, tokens, plan, text = loaded_inputs(config, eval_blocks)
    first = "none" if config.recover == "none" else "block"
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorq-recovery-") as work:
        start = time.perf_counter()
        model = lorq.compress(shared_copy(loaded.model), config, tokens, plan=plan).model
        lorq.save(model, Path(work) / "c", loaded.tokenizer)
        seconds = time.perf_counter() - start
        for lr, scale_lr in [(None, 0), *((a, b) for a in lrs for b in scale_lrs)]:
            model = lorq.load(Path(work) / "c")
            label = first if lr is None else f"{first} + end-to-end, lr {lr:g}"
            if lr is not None:
                start = time.perf_counter()
                scales = {"scales": bool(scale_lr), "scale_lr": scale_lr or 1e-3}
                run = lorq.RecoverConfig(steps=steps, lr=lr, seq_len=128, save_every=steps,
                                         **scales)  # fmt: skip
                out = Path(work) / f"r{lr:g}-{scale_lr:g}"
                lorq.recover(model, loaded.tokenizer, run, out, teacher="smollm2")
                seconds = time.perf_counter() - start
                label += f", scales {scale_lr:g}" if scale_lr else ""
            rows.append(row(label, steps if lr else 0, seconds, model, text, loaded.model))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, help="bits/parameter of a Fisher plan")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--scale-lr", type=float, nargs="+", default=[0.0, 1e-3],
                        help="the scales' rates (0: factors only)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--end-to-end", action="store_true", help="lorq recover (module doc)")
    parser.add_argument("--after-block", action="store_true",
                        help="--end-to-end after block-wise recovery at its defaults")  # fmt: skip
    args = parser.parse_args()
    import lorq

    config = lorq.CompressConfig(weighting="activations")
    if args.budget is not None:
        config = replace(config, quant=None, budget=args.budget, plan_weighting="fisher")
    key = "default job" if args.budget is None else f"budget {args.budget:g}"
    if args.end_to_end:
        config = replace(config, recover="block" if args.after_block else "none")
        rows = end_to_end_rows(config, args.lr, args.scale_lr, args.steps, args.eval_blocks)
        return report(f"end to end, {key}", rows)
    runs = block_runs(config, args.lr, args.scale_lr, args.steps)
    if args.budget is not None:  # the reference: bitsandbytes NF4 with double quantization
        runs.insert(0, (NF4, lorq.CompressConfig(method="plain", quant="bnb-nf4")))
    report(key, rows_for(config, runs, args.eval_blocks))


def report(key: str, rows: list[dict]) -> None:
    """``rows`` into the results file under ``key`` (a row of the same recovery label replaced,
    the others kept), and the merged table on stdout."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept = {row["recover"]: row for row in data.get(key, {}).get("rows", [])}
    rows = list({**kept, **{row["recover"]: row for row in rows}}.values())
    data[key] = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"| {key} | recovery | steps | seconds | peak MB | KL | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| | {row['recover']} | {row['steps']} | {row['seconds']} | {row.get('peak_mb')} | "
              f"{row['kl']:.4f} | {row['perplexity']:.3f} |")  # fmt: skip
    plot(data, RESULTS.with_suffix(".png"))
    print(f"wrote {RESULTS} and its plot")


def series(label: str) -> str | None:
    """The plotted line a row belongs to (None: a learning-rate variant left off the plot)."""
    if label == "none":
        return "no recovery"
    if "end-to-end" in label:
        return "block-wise + end to end" if label.startswith("block") else "end to end"
    if label.startswith("block"):
        return "block-wise (factors + scales)" if "scales" in label else None
    return None


def plot(data: dict, path: Path) -> None:
    """KL against the quantized part's bits (nf3 = 3.127 for the default job), one line per
    recovery, bnb NF4-DQ as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, entry in data.items():
        bits = 3.127 if key.endswith("default job") else float(key.split()[-1])
        for row in entry["rows"]:
            if row["recover"] == NF4:
                label = None if NF4 in ax.get_legend_handles_labels()[1] else NF4
                ax.scatter([4.127], [row["kl"]], marker="*", s=150, color="black", label=label)
            elif (name := series(row["recover"])) is not None:
                plan = "uniform nf3" if key.endswith("default job") else "Fisher plan"
                lines.setdefault(f"{plan}, {name}", []).append((bits, row["kl"]))
    for name, points in sorted(lines.items()):
        style = {"marker": "s", "ls": ""} if name.startswith("uniform") else {"marker": "o"}
        ax.plot(*zip(*sorted(set(points)), strict=True), **style, label=name)
    ax.set_xlabel("bits/param (quantized part)")
    ax.set_ylabel("mean KL to the original (held-out text)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M: recovery (LQ-LoRA r16, activations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
