"""QA-LoRA on SmolLM2: an INT-k base (RTN or GPTQ, G = 32, float mins), a short fine-tune of the
pooled adapter on the built-in training text, the merge into the mins, and the GGUF round trip.

For every base: perplexity and KL to the original on the evaluation text (8 blocks of 256
tokens) after compression (B = 0), after fine-tuning, after the merge, and, for Q4_1, after
writing the merged model as GGUF and loading it back with transformers' GGUF loader. The 4-bit
rows include a base made of the GGUF file's own Q4_1 codes (no requantization).

    python bench/qalora.py               # the real run (20 steps per base)
    python bench/qalora.py --quick       # a smoke test (2 steps, 2 blocks, q4_1 only)

Writes bench/results/qalora.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import lorq
from lorq.evaluation.measure import compressed_bits, evaluate_model
from lorq.exporters.gguf import export_gguf
from lorq.io.gguf import read_gguf_quantized
from lorq.io.models import load_model
from lorq.io.native import model_meta, set_model_meta
from lorq.jobs.merge import merge_qa_lora
from lorq.model.targets import find_targets, shared_copy
from lorq.text.corpus import TextConfig, load_blocks
from lorq.train.trainer import FinetuneConfig, finetune

RESULTS = Path(__file__).resolve().parent / "results"
BASES = [  # (label, preset, gptq, GGUF codes)
    ("Q4_1 from the GGUF file", "q4_1", False, True),
    ("INT4 RTN", "q4_1", False, False),
    ("INT4 GPTQ", "q4_1", True, False),
    ("INT3 RTN", "int3-g32-fmin", False, False),
    ("INT3 GPTQ", "int3-g32-fmin", True, False),
    ("INT2 RTN", "int2-g32-fmin", False, False),
    ("INT2 GPTQ", "int2-g32-fmin", True, False),
]


def measure(model, blocks, original) -> dict:
    result = evaluate_model(model, blocks, original)
    return {"perplexity": result.perplexity, "kl": result.kl}


def gguf_round_trip(model, loaded, blocks, original, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    source = {"path": loaded.source.path, "gguf_file": loaded.source.gguf_file}
    set_model_meta(model, {**model_meta(model), "source": source})
    export_gguf(model, work / "merged.gguf", overwrite=True)
    back = AutoModelForCausalLM.from_pretrained(work, gguf_file="merged.gguf").eval()
    with torch.no_grad():
        diff = (back(input_ids=blocks[:1]).logits - model(input_ids=blocks[:1]).logits).abs()
    return {**measure(back, blocks, original), "max_logit_diff": float(diff.max())}


def run_base(label, quant, gptq, gguf_codes, loaded, blocks, args, work: Path) -> dict:
    original, tokenizer = loaded.model, loaded.tokenizer
    model = shared_copy(original)
    config = lorq.CompressConfig(
        method="qa-lora", quant=quant, rounding="gptq" if gptq else "nearest", rank=args.rank
    )
    calibration = base = None
    if gptq:
        text = TextConfig(seq_len=128, max_blocks=args.calibration_blocks)
        calibration = load_blocks(tokenizer, text, "calibration")
    if gguf_codes:
        codes = read_gguf_quantized(Path(loaded.source.path) / loaded.source.gguf_file)
        base = {name: q for name, q in codes.items() if name in find_targets(original)}
    start = time.perf_counter()
    lorq.compress(model, config, calibration, base=base)
    row = {"compress_seconds": time.perf_counter() - start, "bits": compressed_bits(model)[0]}
    row["base"] = measure(model, blocks, original)
    train = FinetuneConfig(
        steps=args.steps, lr=args.lr, batch_size=4, seq_len=128, eval_blocks=2, save_every=10**6
    )
    finetune(model, tokenizer, train, work / "checkpoints", resume=False)
    row["tuned"] = measure(model, blocks, original)
    exact = shared_copy(model)  # merging replaces modules, never changes the tuned layers
    errors = merge_qa_lora(exact, min_dtype="fp32")
    row["merge_lost_fp32_mins"] = max(e.delta_relative for e in errors.values())
    row["merged_fp32_mins"] = measure(exact, blocks, original)
    del exact
    errors = merge_qa_lora(model)
    row["merge_lost"] = max(e.delta_relative for e in errors.values())
    row["merged"] = measure(model, blocks, original)
    if quant == "q4_1":
        row["gguf"] = gguf_round_trip(model, loaded, blocks, original, work)
    print(label, json.dumps(row), flush=True)
    return row


def fmt(row: dict, key: str) -> str:
    return f"{row[key]['perplexity']:.3f} / {row[key]['kl']:.4f}" if key in row else "–"


def table(rows: dict) -> str:
    columns = ("base", "bits Q", "base ppl / KL", "tuned", "merged", "merge Δppl", "fp32 mins")
    columns += ("GGUF",)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, row in rows.items():
        tuned, merged = row["tuned"]["perplexity"], row["merged"]["perplexity"]
        lines.append(
            f"| {label} | {row['bits']:.3f} | {fmt(row, 'base')} | {fmt(row, 'tuned')} | "
            f"{fmt(row, 'merged')} | {100 * (merged - tuned) / tuned:+.4f} % | "
            f"{fmt(row, 'merged_fp32_mins')} | {fmt(row, 'gguf')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", help="run only this base (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "qalora.json")
    args = parser.parse_args()
    bases = [b for b in BASES if not args.only or b[0] in args.only]
    if args.quick:
        args.steps, args.eval_blocks, args.calibration_blocks, bases = 2, 2, 4, BASES[:3]
    torch.manual_seed(0)
    loaded = load_model("smollm2")
    text = TextConfig(seq_len=256, max_blocks=args.eval_blocks)
    blocks = load_blocks(loaded.tokenizer, text, "evaluation")
    original = measure(loaded.model, blocks, None)
    rows = {}
    for label, quant, gptq, codes in bases:
        with tempfile.TemporaryDirectory(prefix="lorq-bench-qa-") as tmp:
            rows[label] = run_base(label, quant, gptq, codes, loaded, blocks, args, Path(tmp))
    print(f"original: perplexity {original['perplexity']:.3f}")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": platform.platform(),
        "original": original,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
