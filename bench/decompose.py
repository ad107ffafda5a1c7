"""Decomposition benchmark: lorq LoftQ / LQ-LoRA against the reference LoftQ of PEFT.

For every target linear weight (``lorq.model.targets.find_targets``) of the built-in models SmolLM2
(210 matrices) and MiniLM, at every (bits, rank) of ``--bits`` × ``--ranks``, it runs on the CPU,
interleaved matrix by matrix (so that machine noise hits all methods alike):

* ``quant``          plain quantization, ``lorq.quantize`` (no low-rank part; rank-independent);
* ``ref T=1/T=5``    the reference LoftQ, ``peft.utils.loftq_utils.loftq_init(W, bits, r, T)``.
                     4 bits: PEFT's own function (bitsandbytes NF4, blocksize 64, fp32 absmax =
                     4.5 bits, exact ``torch.linalg.svd``). PEFT hard-codes its compute device to
                     "cuda"/"xpu"; the benchmark runs PEFT's source with that one line set to
                     "cpu" and nothing else changed. PEFT accepts only 4 and 8 bits, so at 3 bits
                     the reference is ``peft_style_loftq``: the same loop, line for line, with
                     lorq's NF3 quantizer at PEFT's layout (blocksize 64, fp32 absmax = 3.5 bits)
                     and exact ``torch.linalg.svd``. At startup the benchmark checks on one matrix
                     that this loop with bnb NF4 reproduces PEFT's function.
                     Error: ‖W − Q_T − L·R‖ of the iterate PEFT returns. PEFT ignores the LoRA
                     scaling, so s = 1 here: the reference's best case.
* ``lorq LoftQ``     ``lorq.decompose(W, DecomposeConfig(method="loftq", rank=r, quant=…))``, T = 5;
* ``lorq LQ``        ``method="lq"``: T_max = 20 with early stop; both with ``svd="auto"``.
                     Error: ``Decomposition.error`` (best iterate), cross-checked against
                     ‖W − reconstruct()‖.

lorq runs with two quantizers per bit width: the preset (``nf4`` / ``nf3``: blocksize 64,
double-quantized scales, 4.127 / 3.127 bits) and the reference's own layout (``nf4-fp32-scales`` /
nf3 with blocksize 64 and fp32 scales, 4.5 / 3.5 bits: apples to apples).

Reported per (model, bits, rank, method): relative error sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) over all
matrices and total wall time (time.perf_counter around each call, summed), and the ratios
lorq error / reference-T5 error (target ≤ 1) and reference-T5 time / lorq-LoftQ time (target ≥ 3).

    python bench/decompose.py --max-matrices 40      # ~7 min of compute on a quiet 2-core CPU
    python bench/decompose.py                        # all matrices (~25 min)
    python bench/decompose.py --models minilm --ranks 16 --bits 4 --max-matrices 6

``--max-matrices N`` keeps about N matrices per model, spread evenly and stratified by shape.
Timing hygiene: MKL's threaded LAPACK slows down enormously when another process competes for the
cores, so after each matrix the CPU time used by other processes is measured (/proc/stat); above
``--max-foreign`` CPU-s per second the matrix is timed again once the machine is quiet
(``--retries``, ``--max-wait``), and the JSON records what was kept.

Results: rich tables on stdout, JSON at ``--out`` (default ``bench/results/decompose.json``) and a
PNG next to it (same stem). Run on the CPU, bitsandbytes prints a harmless warning about the
``kernels`` package.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import resource
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar, before transformers

import torch
from common import cpu_name, model_weights
from rich import box
from rich.console import Console
from rich.table import Table

import lorq
from lorq.config import DecomposeConfig
from lorq.quant import NFConfig, QuantConfig

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import peft
    import peft.utils.loftq_utils as peft_loftq
except ImportError:  # pragma: no cover - the test extras install them
    sys.exit("bench/decompose.py needs peft and bitsandbytes: pip install -e '.[test]'")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decompose.json"
REF_BLOCK = 64  # bitsandbytes' NF4 blocksize, used by PEFT's loftq_init
# lorq quantizers per bit width: the preset, and the reference's layout (block 64, fp32 absmax).
PRESET = {4: QuantConfig.preset("nf4"), 3: QuantConfig.preset("nf3")}
MATCHED = {
    4: QuantConfig.preset("nf4-fp32-scales"),
    3: NFConfig(bits=3, block_size=REF_BLOCK, scale_bits=None),
}
LOFTQ_ITERS = 5
REF_ITERS = (1, 5)
REF, REF1 = "ref T=5", "ref T=1"
EQUAL_TOL = 1e-5  # relative: float32 round-off between equal algorithms (lorq exact SVD vs PEFT)


# ----------------------------------------------------------------------------- the reference


def _peft_loftq_init_on_cpu() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """PEFT's ``loftq_init``, its source unchanged but for the hard-coded compute device."""
    source = textwrap.dedent(inspect.getsource(peft_loftq.loftq_init))
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if source.count(line) != 1:
        raise RuntimeError(
            f"peft {peft.__version__}: loftq_init no longer contains {line!r}; update the benchmark"
        )
    namespace = dict(vars(peft_loftq))
    exec(
        compile(source.replace(line, 'compute_device = "cpu"'), peft_loftq.__file__, "exec"),
        namespace,
    )
    return namespace["loftq_init"]


PEFT_LOFTQ_INIT = _peft_loftq_init_on_cpu()


@torch.no_grad()
def peft_style_loftq(
    weight: torch.Tensor,
    dequantize_quantized: Callable[[torch.Tensor], torch.Tensor],
    reduced_rank: int,
    num_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's loftq_init loop, line for line, with a pluggable quantizer (quantize → dequantize).

    Returns (Q_T dequantized, lora_A = R, lora_B = L) like PEFT; W ≈ Q_T + L·R (no scaling).
    """
    weight = weight.to(dtype=torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        dequantized_weight = dequantize_quantized(res)
        res = weight - dequantized_weight
        output = peft_loftq._low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = output["L"], output["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized_weight, R, L


def bnb_nf4(w: torch.Tensor) -> torch.Tensor:
    packed, state = bnbf.quantize_4bit(
        w, blocksize=REF_BLOCK, compress_statistics=False, quant_type="nf4"
    )
    return bnbf.dequantize_4bit(packed, state)


def lorq_dequantized(config: QuantConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: lorq.quantize(w, config).dequantize()


def reference_run(bits: int, rank: int, iters: int) -> Callable[[torch.Tensor], Any]:
    if bits == 4:
        return lambda w: PEFT_LOFTQ_INIT(w, num_bits=4, reduced_rank=rank, num_iter=iters)
    quant = lorq_dequantized(MATCHED[bits])
    return lambda w: peft_style_loftq(w, quant, rank, iters)


def reference_error(weight: torch.Tensor, out: tuple[torch.Tensor, ...]) -> float:
    q, lora_A, lora_B = out
    return float(torch.linalg.vector_norm(weight - q - lora_B @ lora_A))


def check_reference_loop(weight: torch.Tensor, rank: int) -> dict[str, Any]:
    """peft_style_loftq with bnb NF4 must reproduce PEFT's loftq_init (used for NF3)."""
    out = {}
    for iters in REF_ITERS:
        a = reference_error(weight, PEFT_LOFTQ_INIT(weight, 4, rank, iters))
        b = reference_error(weight, peft_style_loftq(weight, bnb_nf4, rank, iters))
        out[f"T={iters}"] = {"peft": a, "peft_style_loop": b, "rel_diff": abs(a - b) / a}
    return out


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way to approximate W at one (bits, rank); ``run`` is what is timed."""

    name: str
    family: str  # "quant", "reference", "loftq", "lq"
    quantizer: str
    nominal_bits: float
    run: Callable[[torch.Tensor], Any]
    error: Callable[[torch.Tensor, Any], tuple[float, int, float]]  # (err, iterations, bits)
    svd: str = ""  # lorq's DecomposeConfig.svd ("" for the others)


def _quant_error(weight: torch.Tensor, q: Any) -> tuple[float, int, float]:
    return float(torch.linalg.vector_norm(weight - q.dequantize())), 0, q.bits_per_param


def _lorq_error(weight: torch.Tensor, d: Any) -> tuple[float, int, float]:
    direct = float(torch.linalg.vector_norm(weight - d.reconstruct()))
    if not math.isclose(direct, d.error, rel_tol=1e-3, abs_tol=1e-6):
        raise AssertionError(
            f"Decomposition.error={d.error:.6g} but ‖W − reconstruct()‖={direct:.6g} "
            f"({d.config.method}, {d.config.quant.name}, shape {tuple(weight.shape)})"
        )
    return direct, len(d.errors), d.q.bits_per_param


def methods_for(bits: int, rank: int) -> list[Method]:
    preset, matched = PRESET[bits], MATCHED[bits]
    ref_quant = "bnb nf4 (PEFT)" if bits == 4 else f"lorq {matched.name} (PEFT-style loop)"
    ref_bits = bits + 32 / REF_BLOCK
    methods = [
        Method(
            f"quant {q.name}",
            "quant",
            q.name,
            q.nominal_bits,
            lambda w, q=q: lorq.quantize(w, q),
            _quant_error,
        )
        for q in (preset, matched)
    ]
    for iters in REF_ITERS:
        run = reference_run(bits, rank, iters)
        methods.append(
            Method(
                f"ref T={iters}",
                "reference",
                ref_quant,
                ref_bits,
                run,
                lambda w, out, T=iters: (reference_error(w, out), T, ref_bits),
            )
        )
    runs = [
        ("loftq", "lorq LoftQ", LOFTQ_ITERS, preset, "auto"),
        ("loftq", "lorq LoftQ", LOFTQ_ITERS, matched, "auto"),
        ("loftq", "lorq LoftQ", LOFTQ_ITERS, matched, "exact"),  # diagnostic: SVD as the ref
        ("lq", "lorq LQ", None, preset, "auto"),
        ("lq", "lorq LQ", None, matched, "auto"),
    ]
    for method, label, iters, q, svd in runs:
        config = DecomposeConfig(method=method, rank=rank, quant=q, iters=iters, svd=svd)
        methods.append(
            Method(
                f"{label} {q.name}" + (f" svd={svd}" if svd != "auto" else ""),
                method,
                q.name,
                q.nominal_bits,
                lambda w, c=config: lorq.decompose(w, c),
                _lorq_error,
                svd,
            )
        )
    return methods


# ----------------------------------------------------------------------------- running


@dataclass
class Tally:
    method: Method
    bits: int
    rank: int | None
    matrices: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    seconds: float = 0.0
    iterations: int = 0
    bits_weighted: float = 0.0
    numel: int = 0
    svd: dict[str, int] = field(default_factory=dict)

    def add(self, weight: torch.Tensor, err: float, iters: int, bpp: float, dt: float) -> None:
        self.matrices += 1
        self.err_sq += err**2
        self.ref_sq += float(torch.linalg.vector_norm(weight)) ** 2
        self.seconds += dt
        self.iterations += iters
        self.bits_weighted += bpp * weight.numel()
        self.numel += weight.numel()

    def summary(self) -> dict[str, Any]:
        m = self.method
        return {
            "bits": self.bits,
            "rank": self.rank,
            "method": m.name,
            "family": m.family,
            "quantizer": m.quantizer,
            "bits_per_param": self.bits_weighted / self.numel,
            "nominal_bits_per_param": m.nominal_bits,
            "matrices": self.matrices,
            "rel_error": math.sqrt(self.err_sq / self.ref_sq),
            "seconds": self.seconds,
            "mean_iterations": self.iterations / self.matrices,
            "svd_setting": m.svd or None,
            "svd_used": self.svd,
        }


def select(weights: list[torch.Tensor], n: int | None) -> list[torch.Tensor]:
    """About ``n`` matrices spread evenly over the model, stratified by shape (all without ``n``).

    Plain even spacing would hit the same projection over and over (7 linears per SmolLM2 block),
    so each shape gets a share of ``n`` proportional to its count (at least one), spread evenly
    over that shape's matrices; model order is kept.
    """
    if not n or n >= len(weights):
        return weights
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(tuple(w.shape), []).append(i)
    exact = {k: n * len(v) / len(weights) for k, v in groups.items()}
    counts = {k: max(1, math.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True):
        if sum(counts.values()) >= n:
            break
        counts[k] += 1
    chosen = []
    for k, idx in groups.items():
        c = min(counts[k], len(idx))
        chosen += [idx[round((j + 0.5) * len(idx) / c - 0.5)] for j in range(c)]
    return [weights[i] for i in sorted(chosen)]


class ForeignCpu:
    """CPU seconds that other processes used since the last call (/proc/stat minus our rusage).

    MKL's threaded LAPACK slows down badly when another process competes for the cores, so the
    benchmark measures and reports this contamination instead of guessing it from load averages.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return busy / self.tick, own.ru_utime + own.ru_stime, time.perf_counter()

    def __call__(self) -> tuple[float, float] | None:
        """(foreign CPU seconds, wall seconds) since the previous call; None off Linux."""
        now, last = self._sample(), self.last
        self.last = now
        if now is None or last is None:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])), now[2] - last[2]


@dataclass
class QuietGuard:
    """Keeps a matrix's timings only if other processes stayed (nearly) off the CPU meanwhile.

    After each matrix (all methods, interleaved), the CPU time other processes used is measured;
    above ``threshold`` CPU-s per second the matrix is timed again once the machine is quiet, up
    to ``retries`` times and ``max_wait_s`` of waiting in all; then it is kept and counted as
    contaminated. Errors are deterministic; only the times change.
    """

    threshold: float
    retries: int
    max_wait_s: float
    waited_s: float = 0.0
    retimed: int = 0
    contaminated: int = 0

    def clean(self, other: tuple[float, float] | None) -> bool:
        return other is None or other[0] <= self.threshold * other[1]

    def wait(self, foreign: ForeignCpu) -> None:
        """Poll 5-s windows until one is quiet (or the waiting budget is spent)."""
        while self.waited_s < self.max_wait_s:
            foreign()
            time.sleep(5)
            other = foreign()
            self.waited_s += other[1] if other else 5
            if self.clean(other):
                return


def run_suite(
    weights: list[torch.Tensor],
    bits_list: list[int],
    ranks: list[int],
    console: Console,
    guard: QuietGuard,
    trace: list[dict[str, Any]],
) -> list[Tally]:
    plans: list[tuple[Tally, Method]] = []
    for bits in bits_list:
        for rank in ranks:
            for m in methods_for(bits, rank):
                if m.family == "quant" and rank != ranks[0]:
                    continue  # rank-independent: once per bit width
                tally = Tally(m, bits, None if m.family == "quant" else rank)
                plans.append((tally, m))
    small = min(weights, key=lambda w: w.numel())
    for _, m in plans:  # warm-up (lazy tables, MKL, allocator) on the smallest matrix, untimed
        m.run(small)
    foreign = ForeignCpu()
    guard.wait(foreign)  # start on a quiet machine
    for index, weight in enumerate(weights):
        for attempt in range(guard.retries + 1):
            foreign()
            outs = []
            for _, m in plans:
                t0 = time.perf_counter()
                out = m.run(weight)
                outs.append((out, time.perf_counter() - t0))
            other = foreign()
            clean = guard.clean(other)
            if clean or attempt == guard.retries or guard.waited_s >= guard.max_wait_s:
                break
            assert other is not None
            console.log(
                f"  matrix {index + 1}: other processes used {other[0]:.1f} CPU-s in "
                f"{other[1]:.1f} s; timing it again once the machine is quiet"
            )
            guard.retimed += 1
            guard.wait(foreign)
        guard.contaminated += not clean
        trace.append(
            {
                "matrix": index,
                "shape": list(weight.shape),
                "attempts": attempt + 1,
                "wall_s": other[1] if other else None,
                "foreign_cpu_s": other[0] if other else None,
                "clean": clean,
            }
        )
        for (tally, m), (out, dt) in zip(plans, outs, strict=True):
            err, iters, bpp = m.error(weight, out)
            tally.add(weight, err, iters, bpp, dt)
            if m.family in ("loftq", "lq"):
                svd = out.config.svd_method(tuple(weight.shape))
                tally.svd[svd] = tally.svd.get(svd, 0) + 1
        if (index + 1) % 10 == 0 or index + 1 == len(weights):
            console.log(
                f"  {index + 1}/{len(weights)} matrices ({guard.retimed} re-timed, "
                f"{guard.contaminated} kept contaminated, {guard.waited_s:.0f} s waited)"
            )
    return [t for t, _ in plans]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (bits, rank): lorq / reference-T5 error and reference-T5 / lorq time."""
    out = []
    keyed = {(r["bits"], r["rank"], r["method"]): r for r in rows}
    for bits, rank in sorted({(r["bits"], r["rank"]) for r in rows if r["rank"]}, reverse=True):
        ref = keyed[(bits, rank, REF)]
        ref1 = keyed[(bits, rank, REF1)]
        for r in rows:
            if (r["bits"], r["rank"]) != (bits, rank) or r["family"] not in ("loftq", "lq"):
                continue
            out.append(
                {
                    "bits": bits,
                    "rank": rank,
                    "method": r["method"],
                    "quantizer": r["quantizer"],
                    "same_quantizer_as_reference": r["quantizer"] == MATCHED[bits].name,
                    "error_vs_ref_T5": r["rel_error"] / ref["rel_error"],
                    "error_vs_ref_T1": r["rel_error"] / ref1["rel_error"],
                    "speedup_vs_ref_T5": ref["seconds"] / r["seconds"],
                    "svd_setting": r["svd_setting"],
                    "error_target_met": r["rel_error"] <= ref["rel_error"] * (1 + EQUAL_TOL),
                    "speed_target_met": (
                        ref["seconds"] / r["seconds"] >= 3
                        if r["family"] == "loftq" and r["svd_setting"] == "auto"
                        else None
                    ),
                }
            )
    return out


# ----------------------------------------------------------------------------- reporting


def results_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, box=box.MARKDOWN, title_justify="left")
    for col in ("bits", "rank", "method", "bits/param", "rel. error", "iters", "time (s)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            str(r["bits"]),
            str(r["rank"] or "—"),
            r["method"] + (" ¹" if r["family"] == "reference" else ""),
            f"{r['bits_per_param']:.3f}",
            f"{r['rel_error']:.5f}",
            f"{r['mean_iterations']:.1f}" if r["family"] != "quant" else "—",
            f"{r['seconds']:.2f}",
        )
    return table


def ratio_table(title: str, data: list[dict[str, Any]]) -> Table:
    table = Table(title=title, box=box.MARKDOWN, title_justify="left")
    for col in ("bits", "rank", "lorq method", "err / ref T=5", "err / ref T=1", "speed-up"):
        table.add_column(col, justify="left" if col == "lorq method" else "right")
    for r in data:
        name = r["method"] + (" ²" if r["same_quantizer_as_reference"] else "")
        err = f"{r['error_vs_ref_T5']:.5f}" + ("" if r["error_target_met"] else " ✗")
        speed = f"{r['speedup_vs_ref_T5']:.2f}×"
        if r["speed_target_met"] is False:
            speed += " ✗"
        table.add_row(
            str(r["bits"]), str(r["rank"]), name, err, f"{r['error_vs_ref_T1']:.4f}", speed
        )
    return table


COLORS = {
    "quant": "#bbbbbb",
    "reference": "#d62728",
    "loftq": "#1f77b4",
    "lq": "#2ca02c",
}


def series(r: dict[str, Any]) -> str:
    """A label that is the same across bit widths: the quantizer named by its role."""
    return (
        r["method"]
        .replace(MATCHED[r["bits"]].name, "ref layout")
        .replace(PRESET[r["bits"]].name, "preset")
    )


def value(rows: list[dict[str, Any]], label: str, bits: int, rank: int, key: str) -> float:
    """``key`` of series ``label`` at (bits, rank); "ratio": its error / the reference T=5."""
    r = next(
        x for x in rows if x["bits"] == bits and x["rank"] in (rank, None) and series(x) == label
    )
    if key != "ratio":
        return r[key]
    ref = next(x for x in rows if (x["bits"], x["rank"], x["method"]) == (bits, rank, REF))
    return r["rel_error"] / ref["rel_error"]


def plot(suites: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("rel_error", "relative error"),
        ("ratio", "error / ref T=5"),
        ("seconds", "time (s)"),
    )
    fig, axes = plt.subplots(len(suites), 3, figsize=(21, 5.5 * len(suites)), squeeze=False)
    for row, (name, suite) in enumerate(suites.items()):
        rows = suite["results"]
        configs = sorted({(r["bits"], r["rank"]) for r in rows if r["rank"]}, reverse=True)
        labels = list(dict.fromkeys(series(r) for r in rows))
        family = {series(r): r["family"] for r in rows}

        for col, (key, ylabel) in enumerate(panels):
            ax = axes[row][col]
            shown = [
                s
                for s in labels
                if not (key == "ratio" and (family[s] == "quant" or s in (REF, REF1)))
                and not (key == "seconds" and family[s] == "quant")
            ]
            width = 0.85 / len(shown)
            for i, label in enumerate(shown):
                xs = [c + (i - (len(shown) - 1) / 2) * width for c in range(len(configs))]
                vals = [value(rows, label, b, k, key) for b, k in configs]
                hatch = "//" if "ref layout" in label or label == REF1 else None
                if "exact" in label:
                    hatch = "xx"
                ax.bar(
                    xs,
                    vals,
                    width,
                    label=label,
                    color=COLORS[family[label]],
                    hatch=hatch,
                    edgecolor="black",
                    linewidth=0.4,
                )
            ax.set_xticks(range(len(configs)), [f"NF{b} r={k}" for b, k in configs])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} ({suite['matrices']} matrices): {ylabel}")
            if key == "ratio":
                ax.axhline(1.0, color="black", lw=0.8, ls="--")
                lo = min(value(rows, s, b, k, key) for s in shown for b, k in configs)
                ax.set_ylim(min(0.9, lo - 0.02), 1.06)
            if key == "seconds":
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05 / len(suites), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated built-ins")
    parser.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks")
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths (4, 3)")
    parser.add_argument("--max-matrices", type=int, default=None, help="subsample evenly")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.1,
        help="re-time a matrix when other processes used more CPU-s per second than this",
    )
    parser.add_argument("--retries", type=int, default=5, help="re-timings per matrix at most")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    parser.add_argument("--max-wait", type=float, default=1800, help="total s to wait for quiet")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ranks, bits_list = _ints(args.ranks), _ints(args.bits)
    if any(b not in PRESET for b in bits_list):
        parser.error(f"--bits: supported {sorted(PRESET)}")
    if any(r <= 0 for r in ranks):
        parser.error("--ranks must be positive")

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=150)
    started = time.perf_counter()
    suites: dict[str, dict[str, Any]] = {}
    check: dict[str, Any] | None = None
    for name in models:
        console.log(f"[bold]{name}[/bold]: loading")
        all_weights = model_weights(name)
        weights = select(all_weights, args.max_matrices)
        if check is None:
            check = check_reference_loop(weights[0], ranks[0])
            console.log(f"  PEFT loftq_init vs peft_style_loftq (bnb NF4): {check}")
        params = sum(w.numel() for w in weights)
        console.log(
            f"  {len(weights)} of {len(all_weights)} matrices, {params / 1e6:.2f} M params, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        t0, load_before = time.perf_counter(), os.getloadavg()
        trace: list[dict[str, Any]] = []
        guard = QuietGuard(args.max_foreign, args.retries, args.max_wait)
        tallies = run_suite(weights, bits_list, ranks, console, guard, trace)
        foreign_s = sum(t["foreign_cpu_s"] or 0.0 for t in trace)
        rows = [t.summary() for t in tallies]
        suites[name] = {
            "matrices": len(weights),
            "matrices_in_model": len(all_weights),
            "params": params,
            "shapes": sorted({tuple(w.shape) for w in weights}),
            "results": rows,
            "ratios": ratios(rows),
            "seconds": time.perf_counter() - t0,
            "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
            "foreign_cpu_s_in_kept_timings": foreign_s,
            "matrices_retimed": guard.retimed,
            "matrices_kept_contaminated": guard.contaminated,
            "seconds_waited_for_quiet": guard.waited_s,
            "per_matrix": trace,
        }
        if guard.contaminated:
            console.log(
                f"[bold red]warning[/]: {guard.contaminated} of {len(weights)} matrices of {name} "
                f"were timed while other processes used the CPU; their times are unreliable"
            )
        del all_weights, weights
        title = f"{name}: {suites[name]['matrices']} matrices"
        console.print(results_table(title, rows))
        console.print(
            ratio_table(f"{name}: lorq vs the reference (PEFT LoftQ)", suites[name]["ratios"])
        )
    console.print(
        "¹ reference error ‖W − Q_T − L·R‖ with s = 1 (PEFT ignores the LoRA scaling: its best "
        "case).  ² lorq with the reference's quantizer layout (block 64, fp32 absmax)."
    )

    result = {
        "command": " ".join(["python", "bench/decompose.py", *(argv or sys.argv[1:])]),
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "lorq": lorq.__version__,
        },
        "settings": {
            "ranks": ranks,
            "bits": bits_list,
            "max_matrices": args.max_matrices,
            "quiet_guard": {
                "max_foreign_cpu_s_per_s": args.max_foreign,
                "retries": args.retries,
                "max_wait_s": args.max_wait,
            },
            "lorq_loftq_iters": LOFTQ_ITERS,
            "lorq_lq_max_iters": DecomposeConfig(method="lq").iterations,
            "reference_iters": list(REF_ITERS),
            "lorq_svd": "auto",
            "quantizers": {
                str(b): {"preset": PRESET[b].to_dict(), "reference_layout": MATCHED[b].to_dict()}
                for b in bits_list
            },
            "reference": {
                "4": "peft.utils.loftq_utils.loftq_init (bnb NF4 blocksize 64, fp32 absmax), "
                "compute device set to cpu",
                "3": "PEFT-style loop (peft_style_loftq) with lorq's NF3 quantizer (blocksize 64, "
                "fp32 absmax) + torch.linalg.svd; PEFT's loftq_init supports only 4 and 8 bits",
                "error": "‖W − Q_T − L·R‖ of the returned iterate, s = 1",
            },
        },
        "reference_loop_check": check,
        "suites": suites,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(suites, png)
    console.log(f"wrote {args.out} and {png} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
