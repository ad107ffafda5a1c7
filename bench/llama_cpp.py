"""llama.cpp head-to-head on SmolLM2: llama.cpp's own quantizations against lorq's GGUF base +
LoRA adapter, every number from llama.cpp's ``llama-perplexity --kl-divergence``.

    1. an F16 GGUF of the original (the built-in Q4_1 GGUF, dequantized: the reference model)
    2. llama-perplexity on it over the built-in evaluation text → the base logits (.kld)
    3. llama-imatrix on the F16 file over the built-in calibration text (all of it, same -c)
       → llama.cpp's importance matrix (imatrix.gguf); --no-imatrix skips it and its rows
    4. llama-quantize F16 → each TYPE, once without and once with --imatrix
       (a TYPE llama-quantize refuses is kept as a row with "skipped": its reason)
    5. lorq: compress (method, preset) → lorq export --format gguf → NAME.gguf + NAME.lora.gguf
       (--no-lorq skips them, --only picks some)
    6. llama-perplexity --kl-divergence of every file (with --lora for lorq's) against (2)

Size, twice:
  - bits_per_param: the whole file(s) in bits per parameter of the model, adapter included;
  - linear_bits: the 210 block matrices alone (blk.N.attn_q/k/v/output.weight and
    blk.N.ffn_gate/up/down.weight), 8 · their bytes / their elements, read with GGUFReader.
    Everything a lorq adapter holds (its .lora.gguf's tensor bytes) corrects those matrices,
    so for lorq's rows the adapter's bytes count as linear too: base matrices + adapter.
    linear_types is those matrices' tensor types, counted ({"Q4_K": 150, "Q5_0": 60}):
    SmolLM2's 576-wide rows are not a multiple of the K-quants' 256, so llama.cpp falls
    back to legacy types for some of them.

Rows accumulate: each run merges its rows into --out by label (a row of the same label is
replaced, the others kept), so partial runs add up; the ctx / chunks of the file must match.
The plot (--out's .png: whole-file bits/param against mean KL) is redrawn from the merged file.

    python bench/llama_cpp.py [--types Q4_0,IQ4_NL,...] [--chunks 4] [--no-lorq]  # llama_cpp.json
    python bench/llama_cpp.py --plot-only                                          # llama_cpp.png

(Not bench/gguf.py: a script of that name would shadow the gguf package it imports.)

Needs the llama.cpp tools: LORQ_LLAMA_CPP, or ../shared/tools/build-llama-cpp.sh's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from gguf import GGUFReader

import lorq
from lorq.exporters.gguf import adapter_path, export_gguf
from lorq.exporters.hf import has_adapters
from lorq.exporters.quantized import other_tensors
from lorq.io.gguf_write import write_gguf
from lorq.io.models import load_model
from lorq.io.native import model_meta, set_model_meta
from lorq.text.corpus import builtin_text

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ4_NL", "Q4_0")
REFERENCE = "F16 (reference)"
IMATRIX = " + imatrix"  # the label suffix of llama.cpp's rows quantized with the imatrix
LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")
ACT = {"method": "lq", "weighting": "activations"}  # LQ-LoRA, activation-weighted (§5)
GPTQ = {**ACT, "rounding": "gptq", "iters": 2}  # … GPTQ-rounded on the same H, 2 iterations
# the ILP over llama.cpp's types, a budget in MiB: costs by importance-weighted rounding (one
# encode per candidate), the chosen types then GPTQ-rounded; the costs' error is the layers' output
# error (act) or LQ-LoRA's Fisher (the CLI's default for a causal LM's plan)
GGUF_ILP = {**GPTQ, "candidates": "gguf", "plan_rounding": "weighted"}
# (the Fisher loads the model densely: its embedding table is packed in Q8_0 again)
FISHER_ILP = {**GGUF_ILP, "plan_weighting": "fisher", "embeddings": "q8_0"}
NO_Q4_1 = "q8_0,q4_0,q5_0,q5_1,iq4_nl,q4_k,q5_k,q6_k,q2_k,q3_k"  # the gguf grid without q4_1
PLANNED = {**FISHER_ILP, "candidates": NO_Q4_1, "plan_ranks": (0, 4, 8, 16)}
# the same with the plan's costs in the currency of the KL (ALGORITHMS.md §10)
KL_ILP = {**FISHER_ILP, "plan_weighting": "kl"}
LORQ = (  # label, CompressConfig fields (rank 16 unless given; "adapter": lorq export --dtype)
    ("lorq plain q4_0 (no adapter)", {"method": "plain", "quant": "q4_0"}),
    ("lorq LoftQ q4_0 r16", {"method": "loftq", "quant": "q4_0", "iters": 1, "adapter": "fp32"}),
    ("lorq LQ-LoRA + act q4_0 r16", {**ACT, "quant": "q4_0", "adapter": "fp32"}),
    ("lorq LQ-LoRA + act q4_0 r16, fp16 adapter", {**ACT, "quant": "q4_0", "adapter": "fp16"}),
    ("lorq LQ-LoRA + act iq4_nl r16", {**ACT, "quant": "iq4_nl"}),
    ("lorq LQ-LoRA + act + GPTQ iq4_nl r16", {**GPTQ, "quant": "iq4_nl"}),
    ("lorq LQ-LoRA + act + GPTQ iq4_nl r8", {**GPTQ, "quant": "iq4_nl", "rank": 8}),
    ("lorq ILP gguf + GPTQ, act plan 89.2 MiB r8", {**GGUF_ILP, "budget_mb": 89.2, "rank": 8}),
    ("lorq ILP gguf + GPTQ, Fisher plan 84.1 MiB r4", {**FISHER_ILP, "budget_mb": 84.1, "rank": 4}),
    ("lorq ILP gguf + GPTQ, Fisher plan 87.5 MiB r8", {**FISHER_ILP, "budget_mb": 87.5, "rank": 8}),
    ("lorq ILP gguf + GPTQ, Fisher plan 89.2 MiB r8", {**FISHER_ILP, "budget_mb": 89.2, "rank": 8}),
    ("lorq ILP gguf + GPTQ, Fisher plan 100.6 MiB r16", {**FISHER_ILP, "budget_mb": 100.6}),
    *(
        (
            f"lorq ILP gguf + GPTQ, Fisher plan {mib} MiB r{rank} + block recovery",
            {**FISHER_ILP, "budget_mb": mib, "rank": rank, "recover": "block"},
        )
        for mib, rank in ((84.1, 4), (87.5, 8), (89.2, 8), (100.6, 16))
    ),
    *(
        (
            f"lorq ILP gguf + GPTQ, KL plan {mib} MiB r{rank}{tail}",
            {**KL_ILP, "budget_mb": mib, "rank": rank, "recover": recover},
        )
        for mib, rank in ((84.1, 4), (87.5, 8), (89.2, 8), (100.6, 16))
        for tail, recover in (("", "none"), (" + block recovery", "block"))
    ),
    # the plan chooses every matrix's rank too, the F16 adapter inside the budget (§10.1). Not
    # Q4_1: the built-in model is a Q4_1 GGUF, so at rank 0 Q4_1 gives its own codes back (no
    # error at all), which llama.cpp's quants of the F16 cannot; with it these rows measure that
    *(
        (
            f"lorq ILP gguf (no q4_1) + GPTQ, Fisher plan {mib} MiB, ranks 0,4,8,16 planned{tail}",
            {**PLANNED, "budget_mb": mib, "recover": recover},
        )
        for mib in (84.1, 87.5, 89.2, 100.6)
        for tail, recover in (("", "none"), (" + block recovery", "block"))
    ),
)  # (block recovery: factors and the types' d / dmin, 100 steps a block, ALGORITHMS.md §9)


def tools() -> Path:
    folder = os.environ.get("LORQ_LLAMA_CPP") or Path.home() / ".cache/lorq-llama.cpp/build/bin"
    if not (Path(folder) / "llama-perplexity").is_file():
        raise SystemExit("llama.cpp tools not found: run ../shared/tools/build-llama-cpp.sh")
    return Path(folder)


def run(command: list, timeout: int = 1800) -> str:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr[-2000:]}")
    return done.stdout + done.stderr


def score(bin_dir: Path, model: Path, kld: Path, args, lora: Path | None = None) -> dict:
    command = [bin_dir / "llama-perplexity", "-m", model, "--kl-divergence-base", kld]
    command += ["--kl-divergence", "-c", args.ctx, "--chunks", args.chunks, "-t", "2"]
    command += ["--lora", lora] if lora else []
    out = run(command)
    ppl = float(re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out).group(1))
    kl = float(re.search(r"Mean\s+KLD:\s*(-?[0-9.]+)", out).group(1))
    return {"ppl": ppl, "kl": kl}


def size(files: list[Path], params: int) -> dict:
    nbytes = sum(f.stat().st_size for f in files)
    return {"mb": nbytes / 2**20, "bits_per_param": 8 * nbytes / params}


def linear(model: Path, lora: Path | None = None) -> dict:
    """Bits per parameter of the block matrices alone (the adapter's bytes counted in), and
    their tensor types."""
    matrices = [t for t in GGUFReader(model).tensors if LINEAR.fullmatch(t.name)]
    nbytes = sum(int(t.n_bytes) for t in matrices)
    nbytes += sum(int(t.n_bytes) for t in GGUFReader(lora).tensors) if lora else 0
    elements = sum(int(t.n_elements) for t in matrices)
    types = Counter(t.tensor_type.name for t in matrices)
    return {"linear_bits": 8 * nbytes / elements, "linear_types": dict(sorted(types.items()))}


def reference(loaded, work: Path, bin_dir: Path, args) -> Path:
    """The F16 GGUF of the original and llama-perplexity's base logits on the evaluation text."""
    source = Path(loaded.source.path) / loaded.source.gguf_file
    f16 = work / "f16.gguf"
    config = loaded.model.config.to_dict()
    write_gguf(f16, {}, other_tensors(loaded.model, {}), config, source)
    (work / "eval.txt").write_text(builtin_text("evaluation"))
    command = [bin_dir / "llama-perplexity", "-m", f16, "-f", work / "eval.txt", "-t", "2"]
    run([*command, "-c", args.ctx, "--chunks", args.chunks, "--kl-divergence-base", work / "kld"])
    return f16


def importance(f16: Path, work: Path, bin_dir: Path, args) -> Path:
    """llama.cpp's importance matrix of the F16 model over the whole built-in calibration text
    (in this build's default GGUF format: a .dat name would only draw a warning)."""
    (work / "calib.txt").write_text(builtin_text("calibration"))
    out = work / "imatrix.gguf"
    command = [bin_dir / "llama-imatrix", "-m", f16, "-f", work / "calib.txt", "-o", out]
    run([*command, "-c", args.ctx, "-t", "2", "--no-ppl"])
    return out


def llama_row(
    kind: str, f16: Path, work: Path, bin_dir: Path, args, params: int, imatrix: Path | None
) -> dict:
    """llama-quantize F16 → kind (with the importance matrix if given), scored; a type that
    llama-quantize refuses is a row with "skipped": its reason."""
    out = work / f"{kind}{'-imatrix' if imatrix else ''}.gguf"
    flags = ["--imatrix", imatrix] if imatrix else []
    try:
        run([bin_dir / "llama-quantize", *flags, f16, out, kind, "2"])
    except RuntimeError as refused:
        reason = re.search(r"failed to quantize: (.+)", str(refused))
        return {"skipped": reason.group(1).strip() if reason else str(refused)[-300:]}
    row = {**score(bin_dir, out, work / "kld", args), **size([out], params), **linear(out)}
    out.unlink()
    return row


def lorq_row(fields: dict, work: Path, bin_dir: Path, args, params: int) -> dict:
    fields = dict(fields)
    adapter_dtype = fields.pop("adapter", None)  # lorq export --dtype (None: F16, its default)
    config = lorq.CompressConfig(**{"rank": 16, **fields})
    loaded = load_model("smollm2", packed=not config.fisher)  # the Fisher needs dense weights
    source = Path(loaded.source.path) / loaded.source.gguf_file
    start = time.perf_counter()
    result = lorq.compress_model(loaded, config, eval_blocks=0, baseline=False)
    model = result.model
    record = {"path": str(source.parent), "gguf_file": source.name}
    set_model_meta(model, {**model_meta(model), "source": record})
    out = work / f"lorq-{fields['method']}-{adapter_dtype}.gguf"
    export_gguf(model, out, dtype=adapter_dtype, overwrite=True)
    lora = adapter_path(out) if has_adapters(model) else None  # a plan may give none a rank
    row = {**score(bin_dir, out, work / "kld", args, lora), "seconds": time.perf_counter() - start}
    if result.plan is not None and result.plan.adapters_planned:
        row["ranks"] = dict(sorted(Counter(e.adapter_label for e in result.plan.entries).items()))
    return {**row, **size([out, *([lora] if lora else [])], params), **linear(out, lora)}


def group(label: str) -> int:
    """The plot's series and the table's order: reference, llama.cpp, + imatrix, lorq."""
    if label == REFERENCE:
        return 0
    if label.startswith("llama.cpp"):
        return 2 if label.endswith(IMATRIX) else 1
    return 3


def ordered(rows: dict) -> dict:
    """Grouped; llama.cpp's rows by size within their group, lorq's as they were."""

    def key(item: tuple[str, dict]) -> tuple:
        label, row = item
        bits = row.get("bits_per_param", float("inf")) if group(label) in (1, 2) else 0
        return group(label), bits

    return dict(sorted(rows.items(), key=key))


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def check(results: dict, settings: dict, out: Path) -> None:
    """Rows measured otherwise do not mix: refuse another params / ctx / chunks."""
    for key, value in settings.items():
        if results.get(key, value) != value:
            raise SystemExit(
                f"{out} holds {key}={results[key]}, this run {value}: the same, or another --out"
            )


def merge(results: dict, rows: dict, params: int, args) -> dict:
    """rows into the results already in the file: same label replaced, the others kept."""
    check(results, {"params": params, "ctx": args.ctx, "chunks": args.chunks}, args.out)
    merged = ordered({**results["rows"], **rows})
    return {"params": params, "rows": merged, "ctx": args.ctx, "chunks": args.chunks}


def table(rows: dict) -> str:
    lines = [
        "| file | MB | bits/param (whole file) | bits/param (linear) | ppl | mean KL "
        "| linear types |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {label} | skipped: {r['skipped']} | | | | | |")
            continue
        bits = f"{r['linear_bits']:.3f}" if "linear_bits" in r else "–"
        kinds = ", ".join(f"{k} {n}" for k, n in r.get("linear_types", {}).items()) or "–"
        size_ = f"{r['mb']:.1f} | {r['bits_per_param']:.3f} | {bits}"
        lines.append(f"| {label} | {size_} | {r['ppl']:.3f} | {r['kl']:.4f} | {kinds} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Whole-file bits/param against mean KL (log), one marker series per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {  # group: legend, marker, where its labels go (points)
        1: ("llama.cpp", "o", (5, 4)),
        2: ("llama.cpp + imatrix", "s", (5, 4)),
        3: ("lorq", "^", (5, -11)),  # below: lorq plain q4_0 sits on llama.cpp's Q4_0
    }
    fig, ax = plt.subplots(figsize=(9, 6))
    for number, (name, marker, offset) in series.items():
        labels: dict[tuple[float, float], list[str]] = {}  # one label for coinciding points
        for label, row in results["rows"].items():
            if group(label) == number and "skipped" not in row and row["kl"] > 0:
                short = label.removeprefix("llama.cpp ").removesuffix(IMATRIX)
                labels.setdefault((row["bits_per_param"], row["kl"]), []).append(
                    short.removeprefix("lorq ")
                )
        if not labels:
            continue
        ax.scatter(*zip(*labels, strict=True), marker=marker, s=45, label=name)
        for where, names in labels.items():
            text = " = ".join(names)
            ax.annotate(text, where, textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (whole file, adapter included)")
    ax.set_ylabel("mean KL divergence from F16 (llama-perplexity)")
    ax.set_title(
        f"SmolLM2-135M in llama.cpp: ctx {results['ctx']}, {results['chunks']} chunks "
        "of the evaluation text"
    )
    ax.grid(True, which="both", alpha=0.3)
    if ax.collections:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(args, bin_dir: Path) -> tuple[int, dict]:
    """Every row this run asks for: the reference, llama.cpp's types, lorq's."""
    types = [t for t in args.types.split(",") if t]
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loaded = load_model("smollm2")
        params = sum(p.numel() for p in loaded.model.parameters())
        f16 = reference(loaded, work, bin_dir, args)
        del loaded
        rows[REFERENCE] = {**score(bin_dir, f16, work / "kld", args), **size([f16], params)}
        rows[REFERENCE].update(linear(f16))
        imatrix = importance(f16, work, bin_dir, args) if args.imatrix and types else None
        for kind in types:
            for matrix in (None, imatrix) if imatrix else (None,):
                label = f"llama.cpp {kind}{IMATRIX if matrix else ''}"
                rows[label] = llama_row(kind, f16, work, bin_dir, args, params, matrix)
                print(label, rows[label], flush=True)
        chosen = [] if not args.lorq else [r for r in LORQ if not args.only or r[0] in args.only]
        for label, fields in chosen:
            rows[label] = lorq_row(fields, work, bin_dir, args, params)
            print(label, rows[label], flush=True)
    return params, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="'' for lorq's rows only")
    parser.add_argument("--only", action="append", help="run only this lorq row (repeatable)")
    parser.add_argument("--lorq", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--chunks", default="8", help="must match --out's rows (4 in git)")
    parser.add_argument("--ctx", default="256")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama_cpp.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the .png from --out")
    args = parser.parse_args()
    results = load(args.out)
    if args.plot_only:
        if not results["rows"]:
            raise SystemExit(f"nothing to plot: no rows in {args.out}")
        plot(results, args.out.with_suffix(".png"))
        return
    check(results, {"ctx": args.ctx, "chunks": args.chunks}, args.out)  # before the long run
    params, rows = measure(args, tools())
    results = merge(results, rows, params, args)
    print(table(results["rows"]))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
