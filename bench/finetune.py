"""Fine-tuning after compression on SmolLM2: plain NF (the QLoRA-style baseline), LoftQ,
LQ-LoRA + Fisher and activation-aware LQ-LoRA (lorq's default) at the same bit budget, each
fine-tuned the same steps on the built-in training text, beside full fp32 fine-tuning's memory.

Every stage runs in its own process, so each peak RSS (``ru_maxrss``) is that stage's alone:

    compress  load SmolLM2 → (Fisher) → lorq.compress at --budget bits → lorq.save
    train     lorq.load → lorq.train.trainer.finetune (--steps) → evaluation perplexity
              before / after
    full      the fp32 model, every parameter trained by AdamW: the same batches, a few steps
              (activation checkpointing on in both, unless --no-checkpointing)

    python bench/finetune.py                  # the real run (budget 2.75, 40 steps)
    python bench/finetune.py --quick          # a smoke test (3 steps, 2 evaluation blocks)
    python bench/finetune.py --only "LQ-LoRA + act"   # one method; the other rows are kept

Writes bench/results/finetune.json and bench/results/finetune.png (loss curves).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
METHODS = {
    "plain NF": dict(method="plain"),
    "LoftQ": dict(method="loftq"),
    "LQ-LoRA + Fisher": dict(method="lq", weighting="fisher"),
    "LQ-LoRA + act": dict(method="lq", weighting="activations"),
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def stage_compress(args, work: Path, name: str) -> dict:
    import lorq
    from lorq.config import CompressConfig
    from lorq.evaluation.measure import compressed_bits
    from lorq.io.models import load_model
    from lorq.text.corpus import TextConfig, load_blocks

    loaded = load_model("smollm2")
    settings = METHODS[name]
    config = CompressConfig(
        budget=args.budget, candidates=args.candidates, rank=args.rank, **settings
    )
    calibration = None
    if config.fisher or config.activations:
        text = TextConfig(seq_len=128, max_blocks=args.fisher_blocks)
        calibration = load_blocks(loaded.tokenizer, text, "calibration")
    start = time.perf_counter()
    result = lorq.compress(loaded.model, config, calibration)
    seconds = time.perf_counter() - start
    lorq.save(result.model, work / name, loaded.tokenizer, {"compress": config.to_dict()})
    bits, bits_with_factors = compressed_bits(result.model)
    return {"seconds": seconds, "bits": bits, "bits_with_factors": bits_with_factors}


def stage_train(args, work: Path, name: str) -> dict:
    from transformers import AutoTokenizer

    import lorq
    from lorq.train.trainer import FinetuneConfig, finetune

    model = lorq.load(work / name)
    tokenizer = AutoTokenizer.from_pretrained(work / name)
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_blocks=args.eval_blocks,
        save_every=10**6,
        gradient_checkpointing=args.checkpointing,
    )
    result = finetune(model, tokenizer, config, work / f"{name}-checkpoints", resume=False)
    return {
        **result.to_dict(),
        "before": result.perplexity_before,
        "after": result.perplexity_after,
    }


def stage_full(args, work: Path, name: str) -> dict:
    """Full fp32 fine-tuning memory: every parameter trained by AdamW on the same batches."""
    from lorq.io.models import load_model
    from lorq.text.corpus import TextConfig, load_blocks

    loaded = load_model("smollm2")
    model = loaded.model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    text = TextConfig(seq_len=args.seq_len, max_blocks=args.batch_size * args.full_steps)
    blocks = load_blocks(loaded.tokenizer, text, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for batch in blocks.split(args.batch_size):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": blocks.numel() / seconds, "steps": args.full_steps}


STAGES = {"compress": stage_compress, "train": stage_train, "full": stage_full}


def child(args) -> None:
    from lorq.util.runtime import fixed_mmap_threshold

    if args.low_memory:  # as lorq finetune --low-memory, in every stage (full fine-tuning too)
        fixed_mmap_threshold()
    torch.manual_seed(0)
    result = STAGES[args.stage](args, Path(args.work), args.method)
    result["peak_rss_mb"] = peak_mb()
    Path(args.result).write_text(json.dumps(result))


def run_stage(stage: str, method: str, work: Path, argv: list[str]) -> dict:
    out = work / f"{stage}-{method}.json".replace(" ", "_")
    command = [sys.executable, __file__, *argv, "--stage", stage, "--method", method]
    command += ["--work", str(work), "--result", str(out)]
    print(f"[{stage}] {method} …", flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def table(rows: dict, full: dict) -> str:
    columns = ("method", "bits Q", "bits Q+BA", "ppl before", "ppl after", "tokens/s")
    columns += ("peak RSS MB", "vs full FT")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, row in rows.items():
        c, t = row["compress"], row["train"]
        lines.append(
            f"| {name} | {c['bits']:.3f} | {c['bits_with_factors']:.3f} | {t['before']:.3f} | "
            f"{t['after']:.3f} | {t['tokens_per_second']:.0f} | {t['peak_rss_mb']:.0f} | "
            f"{full['peak_rss_mb'] / t['peak_rss_mb']:.2f}× less |"
        )
    lines.append(
        f"| full fp32 fine-tuning | 32 | – | – | – | {full['tokens_per_second']:.0f} | "
        f"{full['peak_rss_mb']:.0f} | 1× |"
    )
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in rows.items():
        steps, losses = zip(*row["train"]["losses"], strict=True)
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M: LoRA fine-tuning after compression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.75)
    parser.add_argument("--candidates", default="nf2,nf3,nf4")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--fisher-blocks", type=int, default=64)
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="activation checkpointing in both lorq's and the full fine-tuning",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", nargs="+", choices=list(METHODS), help="run these methods, keep the other rows"
    )
    parser.add_argument("--low-memory", action="store_true", help="pin glibc's mmap threshold")
    for hidden in ("--stage", "--method", "--work", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.stage:
        return child(args)
    argv = [a for a in sys.argv[1:]]
    if args.quick:
        argv += ["--steps", "3", "--eval-blocks", "2", "--fisher-blocks", "4", "--full-steps", "1"]
    with tempfile.TemporaryDirectory(prefix="lorq-bench-ft-") as tmp:
        work = Path(tmp)
        rows = {
            name: {stage: run_stage(stage, name, work, argv) for stage in ("compress", "train")}
            for name in args.only or METHODS
        }
        full = None if args.only else run_stage("full", "full", work, argv)
    kept = RESULTS / "finetune.json"
    if args.only and kept.exists():  # the other methods' rows and the full run of a real run
        old = json.loads(kept.read_text())
        rows, full = {**old["rows"], **rows}, old["full"]
    print(table(rows, full))
    RESULTS.mkdir(exist_ok=True)
    settings = {
        k: v for k, v in vars(parse(argv)).items() if k not in ("stage", "method", "work", "result")
    }
    record = {"settings": settings, "machine": platform.platform(), "rows": rows, "full": full}
    (RESULTS / "finetune.json").write_text(json.dumps(record, indent=1))
    plot(rows, RESULTS / "finetune.png")
    print(f"wrote {RESULTS / 'finetune.json'} and {RESULTS / 'finetune.png'}")


if __name__ == "__main__":
    main()
