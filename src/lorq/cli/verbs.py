"""Verbs that make and inspect compressed models: compress, plan, eval, generate, reports.

Each verb maps its options onto one library call and prints what it returns.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from lorq._version import __version__
from lorq.cli.app import app, check_out_dir, console, errors, load_quietly, user_errors
from lorq.cli.tables import plan_tables, presets_table, quantize_report_table, results_table
from lorq.models import DEFAULT_MODEL

DEFAULT_REPORT_PRESETS = ["nf4", "nf3", "nf2", "nf4-fp32-scales", "int4-g32", "int4-g64", "q4_1"]
ModelOption = Annotated[str, typer.Option(help="built-in name, local folder, .gguf file or hub id")]
CalibrationOption = Annotated[str, typer.Option(help="calibration text: builtin, file, hf:NAME")]
AllowPickleOption = Annotated[
    bool, typer.Option(help="load pickle-only weights (.bin) with torch's weights-only unpickler")
]


@app.command("quantize-report")
def quantize_report(
    model: ModelOption = DEFAULT_MODEL,
    preset: Annotated[
        list[str] | None, typer.Option("--preset", "-p", help="quantization preset (repeatable)")
    ] = None,
) -> None:
    """Bits/param actually stored and relative error ‖W−Q‖/‖W‖ over a model's linear layers."""
    from lorq.evaluate import quantization_report
    from lorq.quant import as_config
    from lorq.surgery import DenseWeights, find_targets

    with user_errors() as stage:
        configs = [as_config(name) for name in preset or DEFAULT_REPORT_PRESETS]
        weights = DenseWeights(find_targets(load_quietly(model, with_tokenizer=False).model))
        if not weights:
            raise ValueError(f"model {model!r} has no linear layers to quantize")
        rows = quantization_report(weights, configs, stage)
    console.print(quantize_report_table(model, len(weights), rows))


def _check_plan_target(path: Path) -> None:
    """Refuse to overwrite a file that is not a lorq plan, or a PNG beside it that is not ours."""
    from lorq.atomic import check_output
    from lorq.budget import BudgetPlan
    from lorq.plots import is_png

    def is_plan(file: Path) -> bool:
        try:
            BudgetPlan.load(file)
            return True
        except (ValueError, OSError):
            return False

    png = path.with_suffix(".png")
    if png.exists() and not path.exists():
        raise ValueError(f"{png} exists; choose another --out")
    check_output(path, True, is_plan, "lorq plan", directory=False)
    check_output(png, True, is_png, "PNG", directory=False)


@app.command()
def plan(
    budget: Annotated[float, typer.Option(help="average bits per parameter of the quantized part")],
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="lq | loftq | plain")] = "lq",
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    fisher: Annotated[bool, typer.Option(help="weight errors by the Fisher information")] = False,
    candidates: Annotated[
        str, typer.Option(help="default | full | int | preset names")
    ] = "default",
    calibration: CalibrationOption = "builtin",
    seq_len: Annotated[int, typer.Option(help="calibration sequence length")] = 128,
    samples: Annotated[int, typer.Option(help="calibration sequences for --fisher")] = 64,
    out: Annotated[Path, typer.Option(help="plan JSON (a PNG heatmap is written beside)")] = Path(
        "plan.json"
    ),
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Choose bits per matrix under a budget (LQ-LoRA's integer linear program)."""
    from lorq.compress import Calibration, plan_model
    from lorq.config import CompressConfig
    from lorq.plots import plan_heatmap
    from lorq.preflight import check_compress

    with user_errors() as stage:
        config = CompressConfig(
            method, budget=budget, rank=rank, fisher=fisher, candidates=candidates
        )
        _check_plan_target(out)
        text = Calibration(calibration, seq_len, samples)
        check_compress(model, config, allow_pickle=allow_pickle)
        loaded = load_quietly(
            model, with_tokenizer=fisher, packed=not fisher, allow_pickle=allow_pickle
        )
        result = plan_model(loaded, config, calibration=text, progress=stage)
        result.save(out)
        plan_heatmap(result, out.with_suffix(".png"))
    for table in plan_tables(result):
        console.print(table)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


@app.command()
def compress(
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="lq (LQ-LoRA) | loftq | plain | qa-lora")] = "lq",
    quant: Annotated[str | None, typer.Option(help="uniform preset (see `lorq presets`)")] = None,
    budget: Annotated[float | None, typer.Option(help="bits/param; mixed precision by ILP")] = None,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="a plan from `lorq plan` (its budget, no new ILP)")
    ] = None,
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    fisher: Annotated[bool, typer.Option(help="Fisher-weighted decomposition and plan")] = False,
    candidates: Annotated[str, typer.Option(help="ILP grid: default | full | presets")] = "default",
    calibration: CalibrationOption = "builtin",
    eval_blocks: Annotated[
        int, typer.Option(help="evaluation blocks of 256 tokens (0: none)")
    ] = 16,
    baseline: Annotated[bool, typer.Option(help="also measure plain NF at the same bits")] = True,
    gptq: Annotated[bool, typer.Option(help="qa-lora: GPTQ rounding of the INT-k base")] = False,
    embeddings: Annotated[
        str | None, typer.Option(help="preset for the token embeddings (e.g. q8_0); default: kept")
    ] = None,
    gguf_codes: Annotated[
        bool, typer.Option(help="qa-lora q4_1 from a GGUF: keep the file's own Q4_1 codes")
    ] = True,
    factor_bits: Annotated[
        int | None, typer.Option(help="8: store the low-rank factors in 8 bits (row-wise int8)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("lorq-out"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Compress a model into quantized + low-rank layers, measure it against the original."""
    from lorq.budget import BudgetPlan
    from lorq.compress import Calibration, compress_model
    from lorq.config import CompressConfig
    from lorq.io import save
    from lorq.preflight import check_compress

    with user_errors() as stage:
        given = BudgetPlan.load(plan_file) if plan_file else None
        budget = given.budget if given and budget is None and quant is None else budget
        config = CompressConfig(method, quant, budget, candidates, rank, fisher=fisher, gptq=gptq)
        config = replace(config, embeddings=embeddings, factor_bits=factor_bits)
        text = Calibration(calibration)
        check_compress(model, config, given, allow_pickle)
        check_out_dir(out, overwrite, model)
        loaded = load_quietly(model, packed=not fisher, allow_pickle=allow_pickle)
        result = compress_model(
            loaded,
            config,
            calibration=text,
            eval_blocks=eval_blocks,
            baseline=baseline,
            plan=given,
            gguf_codes=gguf_codes,
            progress=stage,
        )
        saved = save(result, out, overwrite=overwrite)
    console.print(results_table(f"{model} → {out}", result.measurements, loaded.source, saved))
    console.print(f"saved to {out}")


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    eval_blocks: Annotated[int, typer.Option(help="evaluation blocks of 256 tokens")] = 16,
    reference: Annotated[bool, typer.Option(help="compare with the source model if found")] = True,
) -> None:
    """Perplexity, bits/param, size and KL to the source model of a saved lorq model."""
    from lorq.evaluate import evaluate_saved

    with user_errors() as stage:
        rows, missing = evaluate_saved(path, eval_blocks, reference, stage)
    if missing:
        errors.print(f"source model not available, no KL: {missing}")
    console.print(results_table(f"{path}", rows))


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    prompt: Annotated[str, typer.Option(help="the prompt (the chat template is applied if any)")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
) -> None:
    """Generate text from a saved lorq model (greedy)."""
    from lorq.generate import generate_text
    from lorq.io import load_with_tokenizer

    with user_errors():
        model, tokenizer = load_with_tokenizer(path)
        text = generate_text(model, tokenizer, prompt, max_new_tokens)
    console.print(text)


@app.command()
def presets() -> None:
    """List the named quantization presets and their bits per parameter."""
    console.print(presets_table())


@app.command()
def version() -> None:
    """Print lorq's version."""
    console.print(__version__)
