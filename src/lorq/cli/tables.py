"""The tables the command line prints (rich), one function per kind of result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from lorq.budget import BudgetPlan
from lorq.evaluation.measure import Measurement
from lorq.io.models import ModelSource, source_nbytes

RESULTS_CAPTION = (
    "bits: per parameter of the replaced linears (Q alone; with B, A as saved: bf16, or 8-bit "
    "rows where they sit on that grid, as B = 0 does); MB: all "
    "parameters and buffers in memory (a GGUF's quantized layers stay packed); ppl: perplexity on "
    "the evaluation text; KL: mean KL divergence of next-token distributions to the original; "
    "cos: embedding cosine to the original"
)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def directory_nbytes(path: Path) -> int:
    """Bytes of every file under ``path`` (a file: its size)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def results_table(
    title: str,
    rows: Sequence[Measurement],
    source: ModelSource | None = None,
    out: Path | None = None,
) -> Table:
    """One row per measured model; with ``source`` / ``out``, their sizes on disk below."""
    caption = RESULTS_CAPTION
    if source is not None and out is not None:
        size = source_nbytes(source)
        before = "unknown" if size is None else f"{size / 1e6:.1f} MB"
        caption += f". On disk: source {before}, output {directory_nbytes(out) / 1e6:.1f} MB"
    table = Table(title=title, caption=caption)
    for column in ("model", "bits Q", "bits Q+BA", "MB", "ppl", "KL", "cos"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        result = row.result
        table.add_row(
            row.label,
            _fmt(row.bits[0], ".3f"),
            _fmt(row.bits[1], ".3f"),
            f"{row.megabytes:.1f}",
            _fmt(result.perplexity, ".3f"),
            _fmt(result.kl, ".4f"),
            _fmt(result.cosine, ".5f"),
        )
    return table


def plan_tables(plan: BudgetPlan) -> tuple[Table, Table]:
    """The plan's bits per layer and module, and its summary."""
    from lorq.budget.layout import bits_grid

    layers, kinds, cells = bits_grid({e.name: e for e in plan.entries})
    title = "bits/param per layer and module" + (", rank" * plan.adapters_planned)
    grid = Table(title=title, show_lines=False)
    grid.add_column("layer", justify="right")
    for kind in kinds:
        grid.add_column(kind.split(".")[-1], justify="right")
    for layer in layers:
        row = [cells.get((layer, kind)) for kind in kinds]
        grid.add_row("-" if layer is None else str(layer), *(_cell(e) for e in row))
    with_factors = plan.bits_with_low_rank(16)
    factors = "planned factors" if plan.adapters_planned else "low-rank factors (bf16)"
    summary = Table(show_header=False)
    counted = "quantized part" + " + token embedding" * (plan.embedding is not None)
    counted += " + planned factors" * plan.adapters_planned
    summary.add_row(f"budget (bits/param, {counted})", f"{plan.budget:.4f}")
    summary.add_row("achieved, quantized part", f"{plan.achieved_bits:.4f}")
    summary.add_row(f"achieved, with {factors}", f"{with_factors:.4f}")
    summary.add_row("quantized linears (MB)", f"{sum(e.bits for e in plan.matrices) / 8e6:.2f}")
    if (table := plan.embedding_entry) is not None:
        summary.add_row(f"token embedding, {table.config.name} (MB)", f"{table.bits / 8e6:.2f}")
    lora_mb = (with_factors - plan.achieved_bits) * plan.total_params / 8e6
    summary.add_row(f"{factors} (MB)", f"{lora_mb:.2f}")
    if plan.adapters_planned:
        ranks = Counter(e.adapter_label for e in plan.entries)
        summary.add_row("ranks chosen", ", ".join(f"{k}: {n}" for k, n in sorted(ranks.items())))
    summary.add_row(
        "cost weighting, rounding", f"{WEIGHTING_LABELS[plan.weighting]}, {plan.rounding}"
    )
    if plan.predicted_kl is not None:
        summary.add_row("predicted KL (Σ α·t²)", f"{plan.predicted_kl:.4f}")
    else:
        summary.add_row("total squared error", f"{plan.total_error:.6g}")
    summary.add_row("solver", f"{plan.status}, gap {plan.gap:.2e}, {plan.solve_seconds:.2f} s")
    if plan.table_seconds:  # a plan of the block pipeline keeps no timings (the same bytes)
        summary.add_row("cost table", f"{plan.table_seconds:.1f} s")
    return grid, summary


def _cell(entry) -> str:
    """bits/param of a plan entry, and its planned rank (·8: 8-bit factors)."""
    if entry is None:
        return ""
    return f"{entry.bits_per_param:.2f} {entry.adapter_label}".rstrip()


WEIGHTING_LABELS = {
    "none": "none (‖W − Ŵ‖²)",
    "fisher": "Fisher (‖√F ⊙ (W − Ŵ)‖²)",
    "activations": "activations (output MSE)",
    "both": "activations + Fisher rows",
    "kl": "KL (α · relative output error²)",
}


def quantize_report_table(model: str, layers: int, rows) -> Table:
    """Bits/param nominal and stored, size and relative error of each format."""
    numel = rows[0].numel
    table = Table(title=f"{model}: {layers} linear layers, {numel / 1e6:.1f} M parameters")
    for column in ("format", "bits/param (nominal)", "bits/param (stored)", "size MB", "‖W−Q‖/‖W‖"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in rows:
        table.add_row(
            row.config.name,
            f"{row.config.nominal_bits:.3f}",
            f"{row.bits_per_param:.3f}",
            f"{row.nbytes / 1e6:.2f}",
            f"{row.relative_error:.4f}",
        )
    return table


def presets_table() -> Table:
    """Every registered format's presets with their bits per parameter."""
    from lorq.quant import format_of, presets

    table = Table("preset", "format", "bits", "block", "bits/param")
    for name, config in presets().items():
        fmt = format_of(config).name
        table.add_row(
            name, fmt, str(config.bits), str(config.block_size), f"{config.nominal_bits:.3f}"
        )
    return table
