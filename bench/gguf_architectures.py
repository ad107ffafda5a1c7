"""GGUF in and out for every architecture lorq holds (``lorq.io.gguf_arch``), judged by the real
llama.cpp, on tests/test_llamacpp_architectures.py's tiny random models (256 wide, 2 blocks,
SmolLM2's 49152-token vocabulary, so the embedding is most of the file, as in small real models).

Per architecture:
    1. the source: llama.cpp's convert_hf_to_gguf.py (F32; lorq's own export where the converter
       refuses the tiny model's tokenizer: gemma2, qwen2), then llama-quantize to Q4_K_M
    2. import: lorq's packed load (``load_packed``) against transformers' GGUF loader (dense
       float32): seconds and the model's bytes in memory (parameters and buffers)
    3. perplexity of that file, lorq's computation of llama-perplexity's score against
       llama-perplexity's own (4 chunks of 256 tokens of the built-in evaluation text)
    4. round trip: LoftQ (q4_k, r = 8, B perturbed so the adapter matters) → lorq export
       (base + adapter) → llama-perplexity --lora against lorq's perplexity of the model

    LORQ_LLAMA_CPP=~/.cache/lorq-llama.cpp/build/bin python bench/gguf_architectures.py

Results: bench/results/gguf_architectures.json, a table on stdout.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
RESULTS = HERE / "results" / "gguf_architectures.json"


def timed(make):
    start = time.perf_counter()
    value = make()
    return value, time.perf_counter() - start


def perplexity(model, ids) -> float:
    """llama-perplexity's score computed by lorq, on the tests' chunks."""
    from test_llamacpp import CHUNKS, N_CTX

    from lorq.evaluation.measure import llama_cpp_perplexity

    return llama_cpp_perplexity(model, ids, N_CTX, CHUNKS)


def llama_ppl(bin_dir: Path, model: Path, text: Path, lora: Path | None = None) -> float:
    from test_llamacpp import llama_perplexity

    return llama_perplexity(bin_dir, model, text, lora)


def source_file(model_type: str, work: Path, bin_dir: Path):
    """(model, tokenizer, Q4_K_M file) of the model type: steps 1."""
    from llama_cpp import run
    from test_llamacpp_architectures import NO_CONVERTER, convert, lorq_export, source_folder

    model, tokenizer = source_folder(model_type, work / "hf")
    if model_type in NO_CONVERTER:
        f32 = lorq_export(model, tokenizer, work / "f32.gguf")
    else:
        f32 = convert(work / "hf", work / "f32.gguf")
    run([bin_dir / "llama-quantize", f32, work / "q.gguf", "Q4_K_M"])
    return model, tokenizer, work / "q.gguf"


def imported(path: Path) -> dict:
    """Step 2: lorq's packed load against transformers' dense one."""
    from transformers import AutoModelForCausalLM

    from lorq.evaluation.measure import model_nbytes
    from lorq.io.gguf_model import load_packed

    ours, ours_s = timed(lambda: load_packed(path))
    theirs, theirs_s = timed(
        lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    )
    return {
        "model": ours,
        "lorq_s": ours_s,
        "transformers_s": theirs_s,
        "lorq_mb": model_nbytes(ours) / 1e6,
        "transformers_mb": model_nbytes(theirs) / 1e6,
    }


def round_trip(model, tokenizer, ids, work: Path, bin_dir: Path, text: Path) -> dict:
    """Step 4: compress, export base + adapter, llama.cpp with the adapter."""
    import torch

    import lorq
    from lorq.exporters.gguf import export_gguf

    lorq.compress(model, lorq.CompressConfig(method="loftq", quant="q4_k", rank=8, iters=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    export_gguf(model, work / "m.gguf", tokenizer, dtype="fp32")
    ours = perplexity(model, ids)
    theirs = llama_ppl(bin_dir, work / "m.gguf", text, work / "m.lora.gguf")
    base = llama_ppl(bin_dir, work / "m.gguf", text)
    return {"lorq_ppl": ours, "llama_cpp_ppl": theirs, "llama_cpp_base_ppl": base}


def measure(model_type: str, bin_dir: Path, text: Path) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, tokenizer, path = source_file(model_type, work, bin_dir)
        ids = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
        row = imported(path)
        row["file_mb"] = path.stat().st_size / 1e6
        row["import_lorq_ppl"] = perplexity(row.pop("model"), ids)
        row["import_llama_cpp_ppl"] = llama_ppl(bin_dir, path, text)
        row["export"] = round_trip(model, tokenizer, ids, work, bin_dir, text)
    return row


def table(rows: dict) -> str:
    lines = [
        "| architecture | Q4_K_M MB | import s lorq / transformers | memory MB lorq / "
        "transformers | import ppl lorq / llama.cpp (diff) | export+adapter ppl lorq / llama.cpp "
        "(diff; base alone) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        e = r["export"]
        d_in = r["import_llama_cpp_ppl"] / r["import_lorq_ppl"] - 1
        d_out = e["llama_cpp_ppl"] / e["lorq_ppl"] - 1
        d_base = e["llama_cpp_base_ppl"] / e["lorq_ppl"] - 1
        lines.append(
            f"| {name} | {r['file_mb']:.1f} | {r['lorq_s']:.2f} / {r['transformers_s']:.2f} | "
            f"{r['lorq_mb']:.1f} / {r['transformers_mb']:.1f} | {r['import_lorq_ppl']:.0f} / "
            f"{r['import_llama_cpp_ppl']:.0f} ({d_in:+.2%}) | {e['lorq_ppl']:.0f} / "
            f"{e['llama_cpp_ppl']:.0f} ({d_out:+.2%}; {d_base:+.1%}) |"
        )
    return "\n".join(lines)


def main() -> None:
    from llama_cpp import tools
    from test_llamacpp_architectures import MODEL_TYPES

    from lorq.text.corpus import builtin_text

    bin_dir = tools()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "eval.txt"
        text.write_text(builtin_text("evaluation")[:12000])
        for model_type in sys.argv[1:] or MODEL_TYPES:
            rows[model_type] = measure(model_type, bin_dir, text)
            print(model_type, json.dumps(rows[model_type]), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
