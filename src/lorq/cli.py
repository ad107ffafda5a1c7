"""The ``lorq`` command line: each verb is a thin typed map onto the library; only this file prints.

User errors (ValueError, FileNotFoundError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
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
