"""Hand-offs that stay compressed, on SmolLM2: what leaves lorq, how big it is, and whether the
tools that read it compute lorq's logits.

Two models: LoftQ on bitsandbytes' NF4 (``bnb-nf4``: QLoRA's storage) and LQ-LoRA on INT4-g64
(GPTQ's layout; g64, since SmolLM2's 576 columns are not a multiple of 128), rank 16, one
alternation. Each is exported three ways:

    dense PEFT     --format peft   the dequantized base (fp32) + the PEFT adapter (lorq 0.1's way)
    bitsandbytes   --format bnb    the bitsandbytes 4-bit base + the PEFT adapter
    GPTQ           --format gptq   the GPTQ base + the PEFT adapter

and loaded in a fresh process each (transformers' ``from_pretrained`` + PEFT; the lorq directory
itself also through ``from_pretrained``, lorq's registered quantization method; the GPTQ base,
which needs a GPTQ kernel package that cannot be installed here, is decoded by lorq's GPTQ
reader into the architecture's dense linears). The child runs one forward pass on two 128-token
evaluation blocks and reports its peak RSS; the parent compares the logits with lorq's own model
(``lorq.load`` of the saved directory, in a child of its own, for the same memory measure).

    python bench/handoff.py            # writes bench/results/handoff.json
    python bench/handoff.py --quick    # LoftQ NF4 only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorq
from lorq.evaluation.measure import compressed_bits
from lorq.io.models import load_model
from lorq.text.corpus import TextConfig, load_blocks

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = [  # (label, method, preset, hand-offs)
    ("LoftQ NF4 (bnb-nf4)", "loftq", "bnb-nf4", ("peft", "bnb")),
    ("LQ-LoRA INT4-g64", "lq", "int4-g64", ("peft", "gptq")),  # 576 = 9·64: no g128
]
QUANTIZED_KEYS = (".weight", ".absmax", ".nested_absmax", ".qweight", ".qzeros", ".scales")


def child(kind: str, path: Path, ids_file: Path, out_file: Path) -> None:
    """Load one hand-off (or lorq's own directory), run the forward pass, save the logits."""
    ids = torch.load(ids_file)
    if kind == "lorq":
        model = lorq.load(path)
    elif kind == "from_pretrained":  # the lorq directory through transformers (quant_method lorq)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
    elif kind == "gptq":
        model = _decoded_gptq(path)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path / "base")
        model = PeftModel.from_pretrained(base, path / "adapter")
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    torch.save(logits, out_file)
    print(json.dumps({"max_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: per address space, so not inherited from the parent
    through fork + exec the way ``ru_maxrss`` is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _decoded_gptq(path: Path):
    """The GPTQ base decoded by ``lorq.io.gptq.from_gptq`` into dense linears, + PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorq.io.gptq import from_gptq

    config = AutoConfig.from_pretrained(path / "base")
    quantization = config.quantization_config
    del config.quantization_config
    tensors = load_file(path / "base" / "model.safetensors")
    keys = ("qweight", "qzeros", "scales", "g_idx")
    layers = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[1] not in keys}
    for name in layers:
        own = {k: tensors.pop(f"{name}.{k}") for k in keys}
        bits, group = quantization["bits"], quantization["group_size"]
        fmt = quantization.get("checkpoint_format", "gptq")
        state[f"{name}.weight"] = from_gptq(own, bits, group, fmt).dequantize()
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return PeftModel.from_pretrained(model, path / "adapter")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def base_bits(base: Path, numel: int) -> float:
    """Bits per quantized weight the base's files hold for the compressed linears."""
    from safetensors import safe_open

    held = 0
    with safe_open(base / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
            if "proj" in key and key.endswith(QUANTIZED_KEYS):
                tensor = f.get_tensor(key)
                held += tensor.numel() * tensor.element_size()
    return 8 * held / numel


def run_child(kind: str, path: Path, work: Path) -> tuple[torch.Tensor, float]:
    out = work / f"{kind}.logits.pt"
    command = [sys.executable, __file__, "--child", kind, str(path), str(work / "ids.pt"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])["max_rss_mb"]
    return torch.load(out), rss


def run_model(label, method, quant, handoffs, loaded, work: Path) -> dict:
    model = loaded.model
    config = lorq.CompressConfig(method=method, quant=quant, rank=16, iters=1)
    start = time.perf_counter()
    lorq.compress(model, config)
    row: dict = {"compress_seconds": time.perf_counter() - start}
    row["bits"], _ = compressed_bits(model)
    numel = sum(m.in_features * m.out_features for m in lorq.nn.packed_linears(model).values())
    lorq.save(model, work / "lorq", loaded.tokenizer)
    own, row["lorq_rss_mb"] = run_child("lorq", work / "lorq", work)
    row["lorq_mb"] = folder_mb(work / "lorq")
    logits, rss = run_child("from_pretrained", work / "lorq", work)
    row["from_pretrained"] = {"max_abs_logit_diff": float((logits - own).abs().max()), "rss": rss}
    for kind in handoffs:
        out = work / kind
        lorq.export(model, out, kind)
        logits, rss = run_child(kind, out, work)
        row[kind] = {
            "base_mb": folder_mb(out / "base"),
            "adapter_mb": folder_mb(out / "adapter"),
            "base_bits": 32.0 if kind == "peft" else base_bits(out / "base", numel),
            "max_abs_logit_diff": float((logits - own).abs().max()),
            "forward_rss_mb": rss,
        }
    print(label, json.dumps(row), flush=True)
    return row


def table(rows: dict) -> str:
    columns = ("model", "hand-off", "base MB", "adapter MB", "bits/weight (base)")
    columns += ("max |Δlogit| vs lorq", "peak RSS load + forward")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, row in rows.items():
        lines.append(
            f"| {label} | lorq directory | {row['lorq_mb']:.1f} | (inside) | {row['bits']:.3f} "
            f"| 0 | {row['lorq_rss_mb']:.0f} MB |"
        )
        hf = row["from_pretrained"]
        lines.append(
            f"| {label} | lorq directory, transformers' from_pretrained | {row['lorq_mb']:.1f} "
            f"| (inside) | {row['bits']:.3f} | {hf['max_abs_logit_diff']:.2e} "
            f"| {hf['rss']:.0f} MB |"
        )
        for kind in ("peft", "bnb", "gptq"):
            if kind in row:
                r = row[kind]
                lines.append(
                    f"| {label} | {kind} | {r['base_mb']:.1f} | {r['adapter_mb']:.1f} | "
                    f"{r['base_bits']:.3f} | {r['max_abs_logit_diff']:.2e} | "
                    f"{r['forward_rss_mb']:.0f} MB |"
                )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, ids, out = sys.argv[2:6]
        return child(kind, Path(path), Path(ids), Path(out))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "handoff.json")
    args = parser.parse_args()
    models = MODELS[:1] if args.quick else MODELS
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, method, quant, handoffs in models:
            loaded = load_model("smollm2")
            text = TextConfig(seq_len=128, max_blocks=2)
            sub = work / method
            sub.mkdir()
            torch.save(load_blocks(loaded.tokenizer, text, "evaluation"), sub / "ids.pt")
            rows[label] = run_model(label, method, quant, handoffs, loaded, sub)
    print(table(rows))
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
