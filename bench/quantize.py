"""Quantizer benchmark: lorq presets against bitsandbytes NF4 on real and synthetic weights.

For every target linear weight (``lorq.model.targets.find_targets``) of the built-in models SmolLM2
(210 matrices) and MiniLM (37 matrices), and for one synthetic 4096 × 11008 Gaussian fp32 matrix
(an LLaMA-7B MLP shape), it measures per quantizer:

* stored bits / param    8 · Σ nbytes / Σ numel, counting every per-matrix buffer actually kept;
* relative error         sqrt(Σ ‖W − Q‖² / Σ ‖W‖²) over all matrices of the model;
* quantize throughput    M params / s = Σ numel / Σ t, with t the fastest of ``--repeats`` timed
                         calls per matrix (time.perf_counter; the machine is shared and noisy);
* dequantize throughput  the same for decoding back to a dense fp32 tensor.

Quantizers: every lorq preset (``lorq.presets()``; a preset whose block_size does not divide
a matrix is skipped for that model, and the table says why), and bitsandbytes NF4 (blocksize 64)
without and with double quantization (``compress_statistics``), run on the CPU in the same
process, on the same matrices, interleaved matrix by matrix and round by round (each compared
lorq preset right before its bnb counterpart) so that machine noise hits both alike.
Run on the CPU, bitsandbytes prints a harmless warning about the ``kernels`` package.

lorq's ``nf4-fp32-scales`` is the algorithm of bitsandbytes NF4 without double quantization; the
benchmark checks that both produce the same codes and bit-identical dequantized weights.

    python bench/quantize.py                          # both models + synthetic, 3 (7) repeats
    python bench/quantize.py --models minilm --repeats 5 --out /tmp/q.json

Results: rich tables (Markdown-shaped, ready to paste) on stdout and JSON at ``--out``
(default ``bench/results/quantize.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar, before transformers

import torch
from common import cpu_name, model_weights
from rich import box
from rich.console import Console
from rich.table import Table

import lorq
from lorq.quant import QuantConfig
from lorq.quant import presets as lorq_presets

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except ImportError:  # pragma: no cover - the test extras install it
    sys.exit("bench/quantize.py needs bitsandbytes: pip install -e '.[test]'")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quantize.json"
SYNTHETIC_SHAPE = (4096, 11008)
SYNTHETIC_PRESETS = ("nf4", "nf4-fp32-scales", "nf3", "int4-g32", "q4_1")
BNB_BLOCK = 64
BNB_NF4, BNB_NF4_DQ = "bnb nf4", "bnb nf4+dq"
SAME_ALGORITHM = ("nf4-fp32-scales", BNB_NF4)  # lorq preset, bnb method: identical algorithm
# (lorq, bnb) pairs whose ratios are reported: same algorithm, and both with double quantization.
RATIO_PAIRS = (SAME_ALGORITHM, ("nf4", BNB_NF4_DQ))
NOTES = {"nf4-fp32-scales": "same algorithm as bnb nf4", "nf4": "double quant, like bnb nf4+dq"}


@dataclass(frozen=True)
class Method:
    """One quantizer: how to quantize, decode and size the result."""

    name: str
    library: str
    quantize: Callable[[torch.Tensor], Any]
    dequantize: Callable[[Any], torch.Tensor]
    nbytes: Callable[[Any], int]
    nominal_bits: float
    config: dict[str, Any] | None = None


def lorq_method(preset: str) -> Method:
    config = QuantConfig.preset(preset)
    return Method(
        name=preset,
        library="lorq",
        quantize=lambda w: lorq.quantize(w, config),
        dequantize=lambda q: q.dequantize(),
        nbytes=lambda q: q.nbytes,
        nominal_bits=config.nominal_bits,
        config=config.to_dict(),
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bnb_nbytes(result: tuple[torch.Tensor, Any]) -> int:
    """Per-matrix buffers of a bnb 4-bit result: packed codes, absmax, and with double quantization
    the 8-bit absmax codes, their fp32 second-level absmax and the fp32 offset. The NF4 table
    (``state.code``) and the 256-entry dynamic map of the second level (``state2.code``) are
    shared constants, not counted."""
    packed, state = result
    total = _nbytes(packed) + _nbytes(state.absmax)
    if state.nested:
        total += _nbytes(state.state2.absmax) + _nbytes(torch.as_tensor(state.offset))
    return total


def bnb_method(double_quant: bool) -> Method:
    nominal = 4 + (8 / BNB_BLOCK + 32 / (BNB_BLOCK * 256) if double_quant else 32 / BNB_BLOCK)
    return Method(
        name=BNB_NF4_DQ if double_quant else BNB_NF4,
        library="bitsandbytes",
        quantize=lambda w: bnbf.quantize_4bit(
            w, blocksize=BNB_BLOCK, compress_statistics=double_quant, quant_type="nf4"
        ),
        dequantize=lambda r: bnbf.dequantize_4bit(r[0], r[1]),
        nbytes=bnb_nbytes,
        nominal_bits=nominal,
        config={"quant_type": "nf4", "blocksize": BNB_BLOCK, "compress_statistics": double_quant},
    )


@dataclass
class Tally:
    """Running totals of one method over the matrices of one suite."""

    method: Method
    matrices: int = 0
    numel: int = 0
    nbytes: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    quantize_min_s: float = 0.0
    quantize_median_s: float = 0.0
    dequantize_min_s: float = 0.0
    dequantize_median_s: float = 0.0
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        m = self.method
        out: dict[str, Any] = {
            "method": m.name,
            "library": m.library,
            "config": m.config,
            "nominal_bits_per_param": m.nominal_bits,
            "skipped": self.skipped,
        }
        if self.skipped:
            return out
        mparams = self.numel / 1e6
        out |= {
            "matrices": self.matrices,
            "params": self.numel,
            "nbytes": self.nbytes,
            "bits_per_param": 8 * self.nbytes / self.numel,
            "rel_error": math.sqrt(self.err_sq / self.ref_sq),
            "quantize_mparams_per_s": mparams / self.quantize_min_s,
            "dequantize_mparams_per_s": mparams / self.dequantize_min_s,
            "quantize_mparams_per_s_median": mparams / self.quantize_median_s,
            "dequantize_mparams_per_s_median": mparams / self.dequantize_median_s,
            "quantize_s_sum_of_min": self.quantize_min_s,
            "dequantize_s_sum_of_min": self.dequantize_min_s,
        }
        return out


def skip_reason(method: Method, weights: list[torch.Tensor], err: ValueError) -> str:
    """The ValueError's gist plus how many of the suite's matrices the preset cannot take."""
    block = (method.config or {}).get("block_size")
    if block and method.config.get("format") == "int":
        bad = sum(w.shape[1] % block != 0 for w in weights)
        widths = sorted({w.shape[1] for w in weights if w.shape[1] % block})
        return f"block_size={block} does not divide in_features {widths} ({bad}/{len(weights)})"
    return str(err).split(";")[0]


@dataclass
class Exactness:
    """lorq nf4-fp32-scales vs bnb nf4: matrices with identical codes / dequantized weights."""

    matrices: int = 0
    same_codes: int = 0
    same_dequantized: int = 0
    max_abs_diff: float = 0.0


def run_suite(
    weights: list[torch.Tensor], methods: list[Method], repeats: int, console: Console
) -> tuple[list[Tally], Exactness]:
    """Quantize every weight with every method, ``repeats`` timed rounds, interleaved."""
    tallies = {m.name: Tally(m) for m in methods}
    exact = Exactness()
    with torch.inference_mode():
        for m in methods:  # warm-up (lazy tables, allocator) on the first matrix, untimed
            with contextlib.suppress(ValueError):
                m.dequantize(m.quantize(weights[0]))
        for index, weight in enumerate(weights):
            weight = weight.detach().float().contiguous()
            ref_sq = torch.linalg.vector_norm(weight, dtype=torch.float64).item() ** 2
            active = [t for t in tallies.values() if t.skipped is None]
            q_times: dict[str, list[float]] = {t.method.name: [] for t in active}
            dq_times: dict[str, list[float]] = {t.method.name: [] for t in active}
            decoded: dict[str, tuple[Any, torch.Tensor]] = {}
            for round_ in range(repeats):
                for tally in active:
                    m = tally.method
                    if tally.skipped:
                        continue
                    t0 = time.perf_counter()
                    try:
                        q = m.quantize(weight)
                    except ValueError as err:
                        tally.skipped = skip_reason(m, weights, err)
                        continue
                    t1 = time.perf_counter()
                    d = m.dequantize(q)
                    t2 = time.perf_counter()
                    q_times[m.name].append(t1 - t0)
                    dq_times[m.name].append(t2 - t1)
                    if round_ == 0:
                        diff = torch.linalg.vector_norm(weight - d, dtype=torch.float64).item()
                        tally.err_sq += diff**2
                        tally.ref_sq += ref_sq
                        tally.nbytes += m.nbytes(q)
                        tally.numel += weight.numel()
                        tally.matrices += 1
                        if m.name in SAME_ALGORITHM:
                            decoded[m.name] = (q, d)
                    del q, d
            for tally in active:
                name = tally.method.name
                if tally.skipped:
                    continue
                tally.quantize_min_s += min(q_times[name])
                tally.quantize_median_s += statistics.median(q_times[name])
                tally.dequantize_min_s += min(dq_times[name])
                tally.dequantize_median_s += statistics.median(dq_times[name])
            if all(n in decoded for n in SAME_ALGORITHM):
                (lq, ld), ((packed, _), bd) = (decoded[n] for n in SAME_ALGORITHM)
                exact.matrices += 1
                exact.same_codes += torch.equal(lq.codes, packed.reshape(-1))
                exact.same_dequantized += torch.equal(ld, bd)
                exact.max_abs_diff = max(exact.max_abs_diff, (ld - bd).abs().max().item())
            if (index + 1) % 50 == 0:
                console.log(f"  {index + 1}/{len(weights)} matrices")
    return list(tallies.values()), exact


def ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """lorq / bnb ratios of error, bits and throughput for RATIO_PAIRS."""
    out = []
    for lorq_name, bnb_name in RATIO_PAIRS:
        a, b = results.get(lorq_name), results.get(bnb_name)
        if not a or not b or a["skipped"] or b["skipped"]:
            continue
        out.append(
            {
                "lorq": lorq_name,
                "bnb": bnb_name,
                "rel_error": a["rel_error"] / b["rel_error"],
                "rel_error_exactly_equal": a["rel_error"] == b["rel_error"],
                "bits_per_param": a["bits_per_param"] / b["bits_per_param"],
                "quantize_throughput": a["quantize_mparams_per_s"] / b["quantize_mparams_per_s"],
                "dequantize_throughput": (
                    a["dequantize_mparams_per_s"] / b["dequantize_mparams_per_s"]
                ),
                "quantize_throughput_median": (
                    a["quantize_mparams_per_s_median"] / b["quantize_mparams_per_s_median"]
                ),
                "dequantize_throughput_median": (
                    a["dequantize_mparams_per_s_median"] / b["dequantize_mparams_per_s_median"]
                ),
            }
        )
    return out


def paired(lorq_methods: list[Method], bnb_methods: list[Method]) -> list[Method]:
    """Run order: each RATIO_PAIRS lorq preset right before its bnb counterpart, then the rest, so
    that the calls whose times are divided by each other run back to back (shared, noisy CPU)."""
    by_name = {m.name: m for m in [*lorq_methods, *bnb_methods]}
    first = [by_name[n] for pair in RATIO_PAIRS for n in pair if n in by_name]
    return first + [m for m in lorq_methods if m not in first]


def results_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, box=box.MARKDOWN, title_justify="left")
    table.add_column("quantizer")
    table.add_column("bits/param stored", justify="right")
    table.add_column("nominal", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("quantize M/s", justify="right")
    table.add_column("dequantize M/s", justify="right")
    table.add_column("note")
    for r in rows:
        name = r["method"] if r["library"] == "lorq" else f"{r['method']} ¹"
        if r["skipped"]:
            table.add_row(name, "", f"{r['nominal_bits_per_param']:.3f}", "", "", "", r["skipped"])
            continue
        table.add_row(
            name,
            f"{r['bits_per_param']:.4f}",
            f"{r['nominal_bits_per_param']:.3f}",
            f"{r['rel_error']:.6f}",
            f"{r['quantize_mparams_per_s']:.1f}",
            f"{r['dequantize_mparams_per_s']:.1f}",
            NOTES.get(r["method"], ""),
        )
    return table


def ratio_table(suites: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="lorq / bitsandbytes ratios", box=box.MARKDOWN, title_justify="left")
    for col in ("suite", "lorq", "bnb", "rel. error", "bits/param", "quantize", "dequantize"):
        table.add_column(col, justify="left" if col in ("suite", "lorq", "bnb") else "right")
    for suite, data in suites.items():
        for r in data["ratios"]:
            err = f"{r['rel_error']:.6f}" + (" (=)" if r["rel_error_exactly_equal"] else "")
            table.add_row(
                suite,
                r["lorq"],
                r["bnb"],
                err,
                f"{r['bits_per_param']:.4f}",
                f"{r['quantize_throughput']:.2f}×",
                f"{r['dequantize_throughput']:.2f}×",
            )
    return table


def synthetic_weight() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(SYNTHETIC_SHAPE, generator=generator, dtype=torch.float32) * 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated built-ins")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per matrix (min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--synthetic-repeats", type=int, default=7, help="timed calls for the single big matrix"
    )
    parser.add_argument("--skip-synthetic", action="store_true", help="no 4096×11008 matrix")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.synthetic_repeats < 1:
        parser.error("--repeats and --synthetic-repeats must be ≥ 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    console = Console(width=200)  # wide enough that no table cell wraps
    started = time.perf_counter()
    bnb_methods = [bnb_method(False), bnb_method(True)]
    presets = [*map(lorq_method, lorq_presets())]
    plans: list[tuple[str, Callable[[], list[torch.Tensor]], list[Method], int]] = [
        (name, lambda name=name: model_weights(name), presets, args.repeats) for name in models
    ]
    if not args.skip_synthetic:
        title = f"synthetic {SYNTHETIC_SHAPE[0]}x{SYNTHETIC_SHAPE[1]}"
        synthetic = [*map(lorq_method, SYNTHETIC_PRESETS)]
        plans.append((title, lambda: [synthetic_weight()], synthetic, args.synthetic_repeats))

    suites: dict[str, dict[str, Any]] = {}
    for suite, load, methods, repeats in plans:
        t0, load_before = time.perf_counter(), os.getloadavg()
        console.log(f"[bold]{suite}[/bold]: loading")
        weights = load()
        params = sum(w.numel() for w in weights)
        console.log(f"  {len(weights)} matrices, {params / 1e6:.1f} M params")
        tallies, exact = run_suite(weights, paired(methods, bnb_methods), repeats, console)
        order = [m.name for m in methods + bnb_methods]  # tables: presets, then bnb
        rows = [t.summary() for t in sorted(tallies, key=lambda t: order.index(t.method.name))]
        by_name = {r["method"]: r for r in rows}
        suites[suite] = {
            "matrices": len(weights),
            "params": params,
            "shapes": sorted({tuple(w.shape) for w in weights}),
            "results": rows,
            "ratios": ratios(by_name),
            "nf4_fp32_scales_vs_bnb_nf4": {
                "matrices": exact.matrices,
                "identical_codes": exact.same_codes,
                "identical_dequantized": exact.same_dequantized,
                "max_abs_diff": exact.max_abs_diff,
            },
            "repeats": repeats,
            "seconds": time.perf_counter() - t0,
            "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        }
        del weights
        title = f"{suite}: {len(rows)} quantizers, {suites[suite]['matrices']} matrices"
        console.print(results_table(f"{title}, {params / 1e6:.1f} M params", rows))
        console.print(
            f"nf4-fp32-scales vs bnb nf4: identical codes on {exact.same_codes}/{exact.matrices}"
            f" matrices, bit-identical dequantized weights on {exact.same_dequantized}/"
            f"{exact.matrices} (max |Δ| = {exact.max_abs_diff:g})\n"
        )

    console.print(ratio_table(suites))
    console.print(
        "\n¹ bitsandbytes bits/param count the per-matrix buffers only: packed codes and absmax "
        "(fp32; with double quantization uint8 codes + fp32 state2.absmax + fp32 offset). The "
        "shared constants are not counted: the 16-entry NF4 table and, with double quantization, "
        "the 256-entry fp32 state2.code map (1 KiB per matrix as bnb stores it).\n"
        f"Throughput: Σ params / Σ per-matrix min of {args.repeats} timed calls "
        f"({args.synthetic_repeats} for the synthetic matrix), "
        f"torch threads = {torch.get_num_threads()}, {os.cpu_count()} CPUs: {cpu_name()}. "
        "1-min load average before → after each suite: "
        + ", ".join(
            f"{k} {v['loadavg_1min_before_after'][0]:.1f} → {v['loadavg_1min_before_after'][1]:.1f}"
            for k, v in suites.items()
        )
        + "."
    )

    total = time.perf_counter() - started
    flags = sys.argv[1:] if argv is None else argv
    report = {
        "benchmark": "bench/quantize.py",
        "command": " ".join(["python bench/quantize.py", *flags]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "lorq": getattr(lorq, "__version__", None),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpu": cpu_name(),
            "device": "cpu",
        },
        "timing": {
            "repeats": args.repeats,
            "synthetic_repeats": args.synthetic_repeats,
            "statistic": "per-matrix min (throughput) and median (*_median) of the timed calls",
            "throughput": "sum of params / sum of per-matrix times, M params per second",
            "clock": "time.perf_counter",
        },
        "bits_note": (
            "bits_per_param = 8 * sum(nbytes) / sum(numel) of per-matrix buffers. bitsandbytes: "
            "packed + absmax (+ state2.absmax + offset with double quant); the shared NF4 table "
            "and state2.code (256 fp32) are not counted."
        ),
        "suites": suites,
        "seconds": total,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"wrote {args.out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
