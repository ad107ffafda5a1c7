"""Quality of the main job: perplexity and KL (SmolLM2) or embedding cosine (MiniLM) to the
original, per method and bit budget, beside bitsandbytes NF4, in one run.

Methods at every bit budget (bits/param of the quantized part, chosen per matrix by the ILP):
plain NF, LoftQ (r=16), LQ-LoRA (r=16), LQ-LoRA + Fisher (r=16; causal LMs only, the Fisher needs
a next-token loss), and the activation-aware ones (docs/algorithms.md §2.6: output-error costs and
decomposition): LoftQ + act, LQ-LoRA + act, LQ-LoRA + act + Fisher (Fisher row weights), and the
GPTQ-rounded ones: plain GPTQ (output-error plan), LQ-LoRA + act, GPTQ; and LQ-LoRA + act, Fisher
plan (Fisher costs in the ILP, output-error decompositions). One cost table per method
serves every budget (``plan_budgets_for``); ``--iters`` sets the iterations of the GPTQ-rounded
decompositions.
References: bitsandbytes NF4 (fp32 absmax, 4.5 bits) and NF4 with double quantization (QLoRA's
4.127 bits), applied by quantize_4bit / dequantize_4bit to every target weight of a copy.

    python bench/quality.py                       # SmolLM2, budgets 2.5 … 4.127, + CLI peak memory
    python bench/quality.py --model minilm        # MiniLM (cosine) → results/quality-minilm.json
    python bench/quality.py --resume              # keep the rows already in --out, run the rest
    python bench/quality.py --quick               # a smoke test: 2 eval blocks, 4 Fisher blocks
    python bench/quality.py --peak-only           # only the CLI peak-memory measurement

Writes the JSON after every row (partial runs keep their rows) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.evaluation.measure import compressed_bits, evaluate_model
from lorq.io.models import load_model
from lorq.jobs.compress import compress, plan_budgets_for
from lorq.jobs.statistics import estimate_fisher, estimate_hessians
from lorq.model.targets import find_targets, set_module, shared_copy
from lorq.text.corpus import TextConfig, load_blocks

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ACT = dict(weighting="activations")  # output-error decomposition and costs (algorithms.md §2.6)
GPTQ = dict(weighting="activations", rounding="gptq")
METHODS = {
    "plain NF": dict(method="plain"),
    "LoftQ": dict(method="loftq", rank=16),
    "LQ-LoRA": dict(method="lq", rank=16),
    "LQ-LoRA + Fisher": dict(method="lq", rank=16, weighting="fisher"),
    "plain GPTQ": dict(method="plain", **GPTQ),
    "LoftQ + act": dict(method="loftq", rank=16, **ACT),
    "LQ-LoRA + act": dict(method="lq", rank=16, **ACT),
    "LQ-LoRA + act + Fisher": dict(method="lq", rank=16, weighting="both"),
    "LQ-LoRA + act, GPTQ": dict(method="lq", rank=16, **GPTQ),
    "LQ-LoRA + act, Fisher plan": dict(method="lq", rank=16, plan_weighting="fisher", **ACT),
}
# most important first
ORDER = (
    "LQ-LoRA + act, Fisher plan",
    "LQ-LoRA + act",
    "LQ-LoRA + act + Fisher",
    "plain GPTQ",
    "LoftQ + act",
    "LQ-LoRA + act, GPTQ",
    "LQ-LoRA + Fisher",
    "LQ-LoRA",
    "plain NF",
    "LoftQ",
)
BUDGETS = [2.5, 2.75, 3.0, 3.25, 3.5, 4.127]


def bnb_copy(original: nn.Module, double_quant: bool) -> tuple[nn.Module, float]:
    """A copy of ``original`` whose target weights went through bnb NF4 (blocksize 64)."""
    import bitsandbytes.functional as bnbf

    model = shared_copy(original)
    nbytes = numel = 0
    for name, module in find_targets(model).items():
        weight = module.weight.detach().float()
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        deq = bnbf.dequantize_4bit(packed, state)
        size = packed.numel() * packed.element_size()
        if state.nested:
            size += state.absmax.numel() * state.absmax.element_size()  # uint8 codes
            size += state.state2.absmax.numel() * state.state2.absmax.element_size()
            size += 4  # the fp32 offset (code tables are shared, not counted)
        else:
            size += state.absmax.numel() * state.absmax.element_size()
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.weight = nn.Parameter(deq.reshape(weight.shape).to(module.weight.dtype), False)
        if module.bias is not None:
            new.bias = module.bias
        set_module(model, name, new)
        nbytes += size
        numel += weight.numel()
    return model, 8 * nbytes / numel


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_memory(original_bytes: int) -> dict:
    """Run the README's main job (``lorq compress``, defaults) under /usr/bin/time -v."""
    lorq = Path(sys.executable).parent / "lorq"
    cmd = ["/usr/bin/time", "-v", str(lorq), "compress", "--out", "/tmp/bench-peak", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"peak run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = int(match.group(1)) * 1024
    return {
        "command": " ".join(cmd[2:]).replace(str(lorq), ".venv/bin/lorq"),
        "max_rss_bytes": peak,
        "original_fp32_param_bytes": original_bytes,
        "ratio": peak / original_bytes,
        "target_ratio": 2.0,
        "met": peak < 2 * original_bytes,
        "seconds": seconds,
    }


def metric(rows: list[dict]) -> tuple[str, str]:
    """The quality key of these rows and its label: KL (causal LMs) or 1 − cosine (encoders)."""
    if rows and rows[0].get("kl") is None:
        return "one_minus_cos", "1 − embedding cosine to the original"
    return "kl", "mean KL to the original"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    key, label = metric(rows)
    panels = [(key, label)] + ([("ppl", "ppl")] if key == "kl" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (column, ylabel) in zip(axes[0], panels, strict=True):
        for method in METHODS:
            pts = sorted((r["bits_q"], r[column]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        for r in rows:
            if r["method"].startswith("bnb"):  # lorq's own nf4 rows equal these (see README)
                ax.scatter(
                    [r["bits_q"]],
                    [r[column]],
                    marker="*",
                    color="black" if "double" in r["method"] else "gray",
                    s=120,
                    zorder=3,
                    label=r["method"],
                )
        if column == "ppl":
            ax.axhline(data["original_ppl"], color="gray", ls="--", lw=1, label="original")
        ax.set_yscale("log")
        ax.set_xlabel("bits/param (quantized part)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: quality vs bits (before fine-tuning, r=16 where low-rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(data: dict, out: Path, merge: list[Path]) -> None:
    """Merge ``peak_memory`` / extra ``rows`` of other runs into ``out``, plot, print tables."""
    data.update(json.loads(out.read_text()))
    for path in merge:
        other = json.loads(path.read_text())
        if "peak_memory" in other:
            data["peak_memory"] = other["peak_memory"]
        known = {(r["method"], r["budget"]) for r in data["rows"]}
        data["rows"] += [
            r for r in other.get("rows", []) if (r["method"], r["budget"]) not in known
        ]
    out.write_text(json.dumps(data, indent=1))
    plot(data, out.with_suffix(".png"))
    key, _ = metric(data["rows"])
    ref = next((r for r in data["rows"] if r["method"] == "bnb NF4 double-quant"), None)
    if data.get("original_ppl") is not None:
        print(f"original ppl {data['original_ppl']:.3f}")
    name = "KL" if key == "kl" else "1 − cos"
    print(f"| method | budget | bits Q | bits Q+BA (bf16) | ppl | {name} | / bnb NF4-DQ | time s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = sorted(data["rows"], key=lambda r: (r["budget"] is not None, r["method"], r["budget"]))
    for r in rows:
        ratio = f"{r[key] / ref[key]:.3f}" if ref else "-"
        budget = "-" if r["budget"] is None else r["budget"]
        ppl = "-" if r.get("ppl") is None else f"{r['ppl']:.3f}"
        print(
            f"| {r['method']} | {budget} | {r['bits_q']:.3f} | {r['bits_total']:.3f} | "
            f"{ppl} | {r[key]:.4g} | {ratio} | {r['seconds']:.0f} |"
        )
    if "peak_memory" in data:
        print(json.dumps(data["peak_memory"], indent=1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--methods", nargs="+", default=list(ORDER), choices=list(METHODS))
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--fisher-blocks", type=int, default=64, help="calibration sequences")
    parser.add_argument(
        "--iters", type=int, default=None, help="iterations of the GPTQ-rounded decompositions"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 eval/4 Fisher blocks, layer 0 only"
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--no-peak", action="store_true", help="skip the CLI peak-memory run")
    parser.add_argument("--peak-only", action="store_true")
    parser.add_argument(
        "--report", action="store_true", help="only re-plot and print tables from --out"
    )
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="with --report: JSONs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = "" if args.model == "smollm2" else f"-{args.model}"
    args.out = args.out or RESULTS / f"quality{suffix}.json"
    if args.quick:
        args.eval_blocks, args.fisher_blocks = 2, 4
    if args.model != "smollm2":  # an encoder: no next-token loss for the Fisher, no CLI job
        args.methods = [
            m for m in args.methods if not CompressConfig(budget=3.0, **METHODS[m]).fisher
        ]
        args.no_peak = True
    return args


def main() -> None:
    args = parse_args()
    include = (r"^(model\.layers|encoder\.layer)\.0\.",) if args.quick else ()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keep = (args.peak_only or args.resume) and args.out.exists()
    data = json.loads(args.out.read_text()) if keep else {}

    def save() -> None:
        args.out.write_text(json.dumps(data, indent=1))

    if args.report:
        report({}, args.out, args.merge)
        return

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    original, tokenizer = loaded.model, loaded.tokenizer
    original_bytes = param_bytes(original)
    if args.peak_only:
        data["peak_memory"] = peak_memory(original_bytes)
        save()
        print(json.dumps(data["peak_memory"], indent=1))
        return

    blocks = load_blocks(
        tokenizer, TextConfig(seq_len=256, max_blocks=args.eval_blocks), "evaluation"
    )
    base = evaluate_model(original, blocks)
    rows = data.get("rows", [])
    data.update(
        model=args.model,
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        eval_blocks=int(blocks.shape[0]),
        eval_tokens=int(blocks.numel()),
        original_ppl=base.perplexity,
        original_fp32_param_bytes=original_bytes,
        rows=rows,
    )
    done = {(r["method"], r["budget"]) for r in rows}
    print(f"{args.model}: {blocks.shape[0]} blocks of 256, original ppl {base.perplexity}")

    def record(method, budget, model, bits_q, bits_total, seconds, extra=None):
        result = evaluate_model(model, blocks, original)
        row = dict(
            method=method,
            budget=budget,
            bits_q=bits_q,
            bits_total=bits_total,
            ppl=result.perplexity,
            kl=result.kl,
            one_minus_cos=None if result.cosine is None else 1.0 - result.cosine,
            seconds=seconds,
            **(extra or {}),
        )
        rows.append(row)
        done.add((method, budget))
        save()
        key, _ = metric(rows)
        print(
            f"{method:18s} budget={budget!s:6s} bits Q={bits_q:.3f} Q+BA={bits_total:.3f} "
            f"ppl={row['ppl']} {key}={row[key]:.5g} ({seconds:.0f} s)",
            flush=True,
        )

    for double_quant, name in ((True, "bnb NF4 double-quant"), (False, "bnb NF4 fp32 absmax")):
        if (name, None) not in done:
            start = time.perf_counter()
            model, bits = bnb_copy(original, double_quant)
            record(name, None, model, bits, bits, time.perf_counter() - start)
            del model

    scores = hessians = None
    todo = {m: [b for b in args.budgets if (m, b) not in done] for m in args.methods}
    configs = {m: CompressConfig(budget=3.0, **METHODS[m]) for m in todo if todo[m]}
    calibration = load_blocks(
        tokenizer, TextConfig(seq_len=128, max_blocks=args.fisher_blocks), "calibration"
    )

    def statistic(name: str, estimate):
        """One estimate on the calibration blocks, timed into ``data[name]``."""
        begin = time.perf_counter()
        value = estimate(original, calibration, find_targets(original))
        seconds = time.perf_counter() - begin
        data[name] = {"blocks": int(calibration.shape[0]), "seconds": seconds}
        print(f"{name}: {calibration.shape[0]} blocks, {seconds:.0f} s", flush=True)
        return value

    if any(c.activations for c in configs.values()):
        hessians = statistic("hessians", estimate_hessians)
    if any(c.fisher for c in configs.values()):
        scores = statistic("fisher", estimate_fisher)

    for method in args.methods:
        if not todo[method]:
            continue
        iters = args.iters if METHODS[method].get("rounding") == "gptq" else None
        settings = dict(include=include, iters=iters, **METHODS[method])
        config = CompressConfig(budget=todo[method][0], **settings)
        plans = plan_budgets_for(original, config, todo[method], scores, hessians=hessians)
        print(f"{method}: cost table {plans[0].table_seconds:.0f} s", flush=True)
        for budget, plan in zip(todo[method], plans, strict=True):
            config = CompressConfig(budget=budget, **settings)
            start = time.perf_counter()
            result = compress(
                shared_copy(original),
                config,
                fisher=scores if config.fisher else None,
                plan=plan,
                hessians=hessians if config.activations else None,
            )
            seconds = time.perf_counter() - start
            bits_q, bits_total = compressed_bits(result.model)
            extra = dict(
                plan_bits=plan.achieved_bits,
                plan_relative_error=plan.relative_error,
                plan_table_seconds=plan.table_seconds,
                plan_configs={
                    c: sum(e.config.name == c for e in plan.entries)
                    for c in sorted({e.config.name for e in plan.entries})
                },
                mean_matrix_relative_error=sum(result.errors.values()) / len(result.errors),
                iters=iters,
            )
            record(method, budget, result.model, bits_q, bits_total, seconds, extra)
            del result

    # a lorq cross-check of the bnb reference: uniform nf4-fp32-scales and nf4 (4.127)
    for preset in ("nf4-fp32-scales", "nf4"):
        if (f"lorq plain {preset}", None) in done:
            continue
        start = time.perf_counter()
        result = compress(
            shared_copy(original), CompressConfig(method="plain", quant=preset, include=include)
        )
        bits_q, bits_total = compressed_bits(result.model)
        record(
            f"lorq plain {preset}", None, result.model, bits_q, bits_q, time.perf_counter() - start
        )
        del result

    data["seconds"] = time.perf_counter() - t0
    save()
    plot(data, args.out.with_suffix(".png"))
    if not args.no_peak:
        del original, scores
        data["peak_memory"] = peak_memory(original_bytes)
        save()
        print(json.dumps(data["peak_memory"], indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
