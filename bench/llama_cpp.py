"""llama.cpp head-to-head on SmolLM2: llama.cpp's own quantizations against lorq's GGUF base +
LoRA adapter, every number from llama.cpp's ``llama-perplexity --kl-divergence``.

    1. an F16 GGUF of the original (the built-in Q4_1 GGUF, dequantized: the reference model)
    2. llama-perplexity on it over the built-in evaluation text → the base logits (.kld)
    3. llama-quantize F16 → each TYPE (without an importance matrix)
    4. lorq: compress (method, preset) → lorq export --format gguf → NAME.gguf + NAME.lora.gguf
    5. llama-perplexity --kl-divergence of every file (with --lora for lorq's) against (2)

Size is the whole file(s) in bits per parameter of the model, adapter included.

    python bench/llama_cpp.py [--types Q4_0,IQ4_NL,...] [--chunks 8]    # results/llama_cpp.json

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
from pathlib import Path

import torch

import lorq
from lorq.data import builtin_text
from lorq.export.gguf import adapter_path, export_gguf
from lorq.export.quantized import other_tensors
from lorq.io.gguf_write import write_gguf
from lorq.io.native import model_meta, set_model_meta
from lorq.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M", "Q2_K")
LORQ = (  # label, CompressConfig fields
    ("lorq plain q4_0 (no adapter)", {"method": "plain", "quant": "q4_0"}),
    ("lorq LoftQ q4_0 r16", {"method": "loftq", "quant": "q4_0", "iters": 1}),
    ("lorq LQ-LoRA + act q4_0 r16", {"method": "lq", "quant": "q4_0", "weighting": "activations"}),
    (
        "lorq LQ-LoRA + act q4_0 r16, fp16 adapter",
        {"method": "lq", "quant": "q4_0", "weighting": "activations", "adapter": "fp16"},
    ),
)


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


def reference(loaded, work: Path, bin_dir: Path, args) -> Path:
    """The F16 GGUF of the original and llama-perplexity's base logits on the evaluation text."""
    source = Path(loaded.source.path) / loaded.source.gguf_file
    f16 = work / "f16.gguf"
    config = loaded.model.config.to_dict()
    write_gguf(f16, {}, other_tensors(loaded.model, {}), config, source)
    (work / "eval.txt").write_text(builtin_text("evaluation"))
    command = [bin_dir / "llama-perplexity", "-m", f16, "-f", work / "eval.txt"]
    run([*command, "-c", args.ctx, "--chunks", args.chunks, "--kl-divergence-base", work / "kld"])
    return f16


def lorq_row(fields: dict, work: Path, bin_dir: Path, args, params: int) -> dict:
    fields = dict(fields)
    adapter_dtype = fields.pop("adapter", "fp32")  # lorq export --dtype: the adapter's tensors
    loaded = load_model("smollm2", packed=True)
    source = Path(loaded.source.path) / loaded.source.gguf_file
    start = time.perf_counter()
    config = lorq.CompressConfig(rank=16, **fields)
    result = lorq.compress_model(loaded, config, eval_blocks=0, baseline=False)
    model = result.model
    record = {"path": str(source.parent), "gguf_file": source.name}
    set_model_meta(model, {**model_meta(model), "source": record})
    out = work / f"lorq-{fields['method']}-{adapter_dtype}.gguf"
    export_gguf(model, out, dtype=adapter_dtype)
    lora = adapter_path(out) if fields["method"] != "plain" else None
    row = {**score(bin_dir, out, work / "kld", args, lora), "seconds": time.perf_counter() - start}
    return {**row, **size([out, *([lora] if lora else [])], params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="'' for lorq's rows only")
    parser.add_argument("--only", action="append", help="run only this lorq row (repeatable)")
    parser.add_argument("--chunks", default="8")
    parser.add_argument("--ctx", default="256")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama_cpp.json")
    args = parser.parse_args()
    bin_dir = tools()
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loaded = load_model("smollm2")
        params = sum(p.numel() for p in loaded.model.parameters())
        f16 = reference(loaded, work, bin_dir, args)
        del loaded
        rows["F16 (reference)"] = {**score(bin_dir, f16, work / "kld", args), **size([f16], params)}
        for kind in [t for t in args.types.split(",") if t]:
            out = work / f"{kind}.gguf"
            run([bin_dir / "llama-quantize", f16, out, kind])
            rows[f"llama.cpp {kind}"] = {
                **score(bin_dir, out, work / "kld", args),
                **size([out], params),
            }
            print(kind, rows[f"llama.cpp {kind}"], flush=True)
        for label, fields in [row for row in LORQ if not args.only or row[0] in args.only]:
            rows[label] = lorq_row(fields, work, bin_dir, args, params)
            print(label, rows[label], flush=True)
    print("| file | MB | bits/param (whole file) | ppl | mean KL |\n|---|---|---|---|---|")
    for label, r in rows.items():
        bits = f"{r['mb']:.1f} | {r['bits_per_param']:.3f}"
        print(f"| {label} | {bits} | {r['ppl']:.3f} | {r['kl']:.4f} |")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"params": params, "rows": rows, "ctx": args.ctx, "chunks": args.chunks}, indent=1
        )
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
