"""The ``lorq`` command line: each verb is a thin typed map onto the library; only this file prints.

User errors (ValueError, FileNotFoundError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorq import __version__
from lorq.config import QuantConfig
from lorq.models import DEFAULT_MODEL

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lorq: quantized + low-rank compression and adaptation of language models.",
)
console = Console()
errors = Console(stderr=True)

DEFAULT_REPORT_PRESETS = ["nf4", "nf3", "nf2", "nf4-fp32-scales", "int4-g32", "int4-g64", "q4_1"]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error into one line on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    )


def load_quietly(model: str, with_tokenizer: bool = True):
    """Load a model under a spinner (transformers' own progress bars off)."""
    from transformers.utils import logging as hf_logging

    from lorq.models import load_model

    hf_logging.disable_progress_bar()
    with console.status(f"loading {model}"):
        return load_model(model, with_tokenizer=with_tokenizer)


@app.command("quantize-report")
def quantize_report(
    model: Annotated[
        str, typer.Option(help="built-in name, local folder, .gguf file or hub id")
    ] = (DEFAULT_MODEL),
    preset: Annotated[
        list[str] | None, typer.Option("--preset", "-p", help="quantization preset (repeatable)")
    ] = None,
) -> None:
    """Bits/param actually stored and relative error ‖W−Q‖/‖W‖ over a model's linear layers."""
    from lorq.evaluate import quantization_report
    from lorq.surgery import dense_weight, find_targets

    with user_errors():
        configs = [QuantConfig.preset(name) for name in preset or DEFAULT_REPORT_PRESETS]
        loaded = load_quietly(model, with_tokenizer=False)
        weights = {name: dense_weight(m) for name, m in find_targets(loaded.model).items()}
        if not weights:
            raise ValueError(f"model {model!r} has no linear layers to quantize")
        with progress_bar() as bar:
            task = bar.add_task("quantizing", total=len(weights) * len(configs))
            rows = quantization_report(weights, configs, lambda n: bar.advance(task, n))
    numel = rows[0].numel
    table = Table(title=f"{model}: {len(weights)} linear layers, {numel / 1e6:.1f} M parameters")
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
    console.print(table)


def _fisher(loaded, targets, source: str, seq_len: int, max_blocks: int):
    """Fisher of the target weights on calibration text, under a progress bar."""
    from lorq.data import TextConfig, load_blocks
    from lorq.fisher import estimate_fisher

    config = TextConfig(source=source, seq_len=seq_len, max_blocks=max_blocks)
    blocks = load_blocks(loaded.tokenizer, config, "calibration")
    with progress_bar() as bar:
        task = bar.add_task("Fisher (calibration)", total=len(blocks))
        return estimate_fisher(loaded.model, blocks, targets, lambda n: bar.advance(task, n))


def _check_plan_target(path: Path) -> None:
    """Refuse to overwrite a file that is not a lorq plan."""
    from lorq.budget import BudgetPlan

    if path.exists():
        try:
            BudgetPlan.load(path)
        except ValueError:
            raise ValueError(
                f"{path} exists and is not a lorq plan; choose another --out"
            ) from None


def _print_plan(plan) -> None:
    from lorq.budget.layout import bits_grid

    layers, kinds, cells = bits_grid({e.name: e.bits_per_param for e in plan.entries})
    table = Table(title="bits/param per layer and module", show_lines=False)
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind.split(".")[-1], justify="right")
    for layer in layers:
        row = [cells.get((layer, kind)) for kind in kinds]
        table.add_row(
            "-" if layer is None else str(layer), *("" if b is None else f"{b:.2f}" for b in row)
        )
    console.print(table)
    quantized_mb = sum(e.bits for e in plan.entries) / 8e6
    summary = Table(show_header=False)
    summary.add_row("budget (bits/param)", f"{plan.budget:.4f}")
    summary.add_row("achieved, quantized part", f"{plan.achieved_bits:.4f}")
    summary.add_row("achieved, with low-rank factors (bf16)", f"{plan.bits_with_low_rank(16):.4f}")
    summary.add_row("quantized linears (MB)", f"{quantized_mb:.2f}")
    lora_mb = (plan.bits_with_low_rank(16) - plan.achieved_bits) * plan.total_params / 8e6
    summary.add_row("low-rank factors, bf16 (MB)", f"{lora_mb:.2f}")
    summary.add_row(
        "total squared error" + (" (Fisher-weighted)" if plan.weighted else ""),
        f"{plan.total_error:.6g}",
    )
    summary.add_row("solver", f"{plan.status}, gap {plan.gap:.2e}, {plan.solve_seconds:.2f} s")
    summary.add_row("cost table", f"{plan.table_seconds:.1f} s")
    console.print(summary)


@app.command()
def plan(
    budget: Annotated[float, typer.Option(help="average bits per parameter of the quantized part")],
    model: Annotated[
        str, typer.Option(help="built-in name, local folder, .gguf file or hub id")
    ] = (DEFAULT_MODEL),
    method: Annotated[str, typer.Option(help="lq | loftq | none (plain quantization)")] = "lq",
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    fisher: Annotated[bool, typer.Option(help="weight errors by the Fisher information")] = False,
    candidates: Annotated[
        str, typer.Option(help="default | full | int | comma-separated preset names")
    ] = "default",
    calibration: Annotated[str, typer.Option(help="text for --fisher: builtin, file, hf:NAME")] = (
        "builtin"
    ),
    seq_len: Annotated[int, typer.Option(help="calibration sequence length")] = 128,
    samples: Annotated[int, typer.Option(help="calibration sequences for --fisher")] = 64,
    out: Annotated[Path, typer.Option(help="plan JSON path (a PNG heatmap is written beside)")] = (
        Path("plan.json")
    ),
) -> None:
    """Choose bits per matrix under a budget (LQ-LoRA's integer linear program)."""
    from lorq.budget import plan_budget
    from lorq.plots import plan_heatmap
    from lorq.surgery import dense_weight, find_targets

    with user_errors():
        _check_plan_target(out)
        loaded = load_quietly(model, with_tokenizer=fisher)
        targets = find_targets(loaded.model)
        if not targets:
            raise ValueError(f"model {model!r} has no linear layers to plan for")
        weights = {name: dense_weight(m) for name, m in targets.items()}
        scores = _fisher(loaded, targets, calibration, seq_len, samples) if fisher else None
        with progress_bar() as bar:
            task = bar.add_task(f"cost table ({method}, r={rank})", total=len(weights))
            result = plan_budget(
                weights,
                budget,
                candidates,
                method,
                rank,
                scores,
                progress=lambda n: bar.advance(task, n),
            )
        result.save(out)
        plan_heatmap(result, out.with_suffix(".png"))
    _print_plan(result)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


@app.command()
def presets() -> None:
    """List the named quantization presets and their bits per parameter."""
    table = Table("preset", "format", "bits", "block", "bits/param")
    for name in QuantConfig.PRESETS:
        cfg = QuantConfig.preset(name)
        table.add_row(
            name, cfg.format, str(cfg.bits), str(cfg.block_size), f"{cfg.nominal_bits:.3f}"
        )
    console.print(table)


@app.command()
def version() -> None:
    """Print lorq's version."""
    console.print(__version__)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    sys.exit(app())
