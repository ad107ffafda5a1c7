"""Verbs that make and inspect compressed models: compress, eval, generate, plan, reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorq import __version__
from lorq.cli.app import (
    Stages,
    app,
    check_out_dir,
    console,
    errors,
    load_quietly,
    user_errors,
)
from lorq.config import QuantConfig
from lorq.evaluate import EvalResult, compressed_bits, model_nbytes
from lorq.models import DEFAULT_MODEL

DEFAULT_REPORT_PRESETS = ["nf4", "nf3", "nf2", "nf4-fp32-scales", "int4-g32", "int4-g64", "q4_1"]


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
    from lorq.surgery import DenseWeights, find_targets

    with user_errors() as stage:
        configs = [QuantConfig.preset(name) for name in preset or DEFAULT_REPORT_PRESETS]
        loaded = load_quietly(model, with_tokenizer=False)
        weights = DenseWeights(find_targets(loaded.model))
        if not weights:
            raise ValueError(f"model {model!r} has no linear layers to quantize")
        rows = quantization_report(weights, configs, stage)
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


def _fisher(loaded, targets, source: str, seq_len: int, max_blocks: int, stage: Stages):
    """Fisher of the target weights on calibration text."""
    from lorq.data import TextConfig, load_blocks
    from lorq.fisher import estimate_fisher

    config = TextConfig(source=source, seq_len=seq_len, max_blocks=max_blocks)
    blocks = load_blocks(loaded.tokenizer, config, "calibration")
    return estimate_fisher(loaded.model, blocks, targets, stage)


def _qa_lora_inputs(loaded, config, targets, calibration: str, gguf_codes: bool):
    """GPTQ's calibration blocks, and a GGUF source's own Q4_1 codes as the QA-LoRA base."""
    from lorq.data import TextConfig, load_blocks
    from lorq.io.gguf import read_gguf_quantized

    blocks = base = None
    if config.gptq:
        text = TextConfig(source=calibration, seq_len=128, max_blocks=64)
        blocks = load_blocks(loaded.tokenizer, text, "calibration")
    source = loaded.source
    if config.method == "qa-lora" and config.quant == "q4_1" and gguf_codes and source.gguf_file:
        q4_1 = QuantConfig.preset("q4_1")
        packed = {n: m.q for n, m in targets.items() if getattr(m, "quant_config", None) == q4_1}
        codes = packed or read_gguf_quantized(Path(source.path) / source.gguf_file)
        base = {name: q for name, q in codes.items() if name in targets} or None
    return blocks, base


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
    from lorq.surgery import DenseWeights, find_targets

    with user_errors() as stage:
        _check_plan_target(out)
        loaded = load_quietly(model, with_tokenizer=fisher, packed=not fisher)
        targets = find_targets(loaded.model)
        if not targets:
            raise ValueError(f"model {model!r} has no linear layers to plan for")
        weights = DenseWeights(targets)
        scores = _fisher(loaded, targets, calibration, seq_len, samples, stage) if fisher else None
        result = plan_budget(weights, budget, candidates, method, rank, scores, progress=stage)
        result.save(out)
        plan_heatmap(result, out.with_suffix(".png"))
    _print_plan(result)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


@dataclass(frozen=True)
class Measured:
    """One row of the results table; the model itself can be freed once measured."""

    label: str
    bits: tuple[float | None, float | None]  # Q alone, with B, A in bf16 (None: not quantized)
    megabytes: float
    result: EvalResult


def _measure(model, blocks, reference, label: str, stage: Stages, quantized: bool = True):
    from lorq.evaluate import evaluate_model
    from lorq.runtime import release_free_memory

    result = evaluate_model(model, blocks, reference, progress=stage, label=f"evaluating {label}")
    release_free_memory()
    bits = compressed_bits(model) if quantized else (None, None)
    return Measured(label, bits, model_nbytes(model) / 1e6, result)


def _results_table(title: str, rows: list[Measured]) -> Table:
    table = Table(
        title=title,
        caption="bits: per parameter of the replaced linears (Q alone; with B, A in bf16); MB: all "
        "parameters and buffers in memory (a GGUF's Q4_1 layers stay packed); ppl: perplexity on "
        "the evaluation text; KL: mean KL divergence of next-token distributions to the original; "
        "cos: embedding cosine to the original",
    )
    for column in ("model", "bits Q", "bits Q+BA", "MB", "ppl", "KL", "cos"):
        table.add_column(column, justify="left" if column == "model" else "right")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        result = row.result
        table.add_row(
            row.label,
            fmt(row.bits[0], ".3f"),
            fmt(row.bits[1], ".3f"),
            f"{row.megabytes:.1f}",
            fmt(result.perplexity, ".3f"),
            fmt(result.kl, ".4f"),
            fmt(result.cosine, ".5f"),
        )
    return table


@app.command()
def compress(
    model: Annotated[
        str, typer.Option(help="built-in name, local folder, .gguf file or hub id")
    ] = (DEFAULT_MODEL),
    method: Annotated[
        str, typer.Option(help="lq (LQ-LoRA) | loftq | nf (plain quantization) | qa-lora")
    ] = "lq",
    quant: Annotated[str | None, typer.Option(help="uniform preset (see `lorq presets`)")] = None,
    budget: Annotated[float | None, typer.Option(help="bits/param; mixed precision by ILP")] = None,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="a plan from `lorq plan` (its budget, no new ILP)")
    ] = None,
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    fisher: Annotated[bool, typer.Option(help="Fisher-weighted decomposition and plan")] = False,
    candidates: Annotated[str, typer.Option(help="ILP grid: default | full | presets")] = "default",
    calibration: Annotated[str, typer.Option(help="calibration text: builtin, file, hf:NAME")] = (
        "builtin"
    ),
    eval_blocks: Annotated[int, typer.Option(help="evaluation blocks of 256 tokens")] = 16,
    baseline: Annotated[bool, typer.Option(help="also measure plain NF at the same bits")] = True,
    gptq: Annotated[bool, typer.Option(help="qa-lora: GPTQ rounding of the INT-k base")] = False,
    gguf_codes: Annotated[
        bool, typer.Option(help="qa-lora q4_1 from a GGUF: keep the file's own Q4_1 codes")
    ] = True,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("lorq-out"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
) -> None:
    """Compress a model into quantized + low-rank layers, measure it against the original."""
    from lorq.budget import BudgetPlan
    from lorq.config import CompressConfig
    from lorq.data import TextConfig, load_blocks
    from lorq.io import save
    from lorq.pipeline import check_plan
    from lorq.pipeline import compress as run_compress
    from lorq.runtime import release_free_memory
    from lorq.surgery import find_targets, shared_copy, weight_shape

    with user_errors() as stage:
        given_plan = BudgetPlan.load(plan_file) if plan_file else None
        if given_plan and budget is None and quant is None:
            budget = given_plan.budget
        config = CompressConfig(
            method=method,
            quant=quant,
            budget=budget,
            rank=rank,
            fisher=fisher,
            candidates=candidates,
            gptq=gptq,
        )
        if given_plan:
            check_plan(given_plan, config)
        check_out_dir(out, overwrite)
        loaded = load_quietly(model, packed=not fisher)
        original = loaded.model
        blocks = load_blocks(
            loaded.tokenizer, TextConfig(seq_len=256, max_blocks=eval_blocks), "evaluation"
        )
        targets = find_targets(original)
        if given_plan:
            check_plan(given_plan, config, {name: weight_shape(m) for name, m in targets.items()})
        scores = _fisher(loaded, targets, calibration, 128, 64, stage) if fisher else None
        rows = [_measure(original, blocks, None, "original", stage, quantized=False)]
        gptq_blocks, base = _qa_lora_inputs(loaded, config, targets, calibration, gguf_codes)
        if baseline and method not in ("nf", "qa-lora"):
            plain = CompressConfig(
                method="nf",
                quant=config.quant,
                budget=config.budget,
                rank=rank,
                candidates=candidates,
                fisher=fisher,
            )
            result = run_compress(shared_copy(original), plain, None, stage, scores)
            release_free_memory()
            name = plain.quant or f"{budget} bits" + (", Fisher plan" if fisher else "")
            rows.append(_measure(result.model, blocks, original, f"plain NF ({name})", stage))
            del result
        result = run_compress(
            shared_copy(original), config, gptq_blocks, stage, scores, base, given_plan
        )
        release_free_memory()
        label = f"lorq {method} r={rank}" + (" +Fisher" if fisher else "")
        label += f" ({config.quant}{', GPTQ' if gptq else ''}{', GGUF codes' if base else ''})"
        rows.append(_measure(result.model, blocks, original, label, stage))
        measured = rows[-1].result
        extra = {
            "source": {
                "model": model,
                "path": loaded.source.path,
                "gguf_file": loaded.source.gguf_file,
            },
            "compress": config.to_dict(),
            "plan": result.plan.to_dict() if result.plan else None,
            "evaluation": {
                "original_perplexity": rows[0].result.perplexity,
                "perplexity": measured.perplexity,
                "kl": measured.kl,
                "cosine": measured.cosine,
            },
        }
        save(result.model, out, loaded.tokenizer, extra, overwrite)
    console.print(_results_table(f"{model} → {out}", rows))
    console.print(f"saved to {out}")


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    eval_blocks: Annotated[int, typer.Option(help="evaluation blocks of 256 tokens")] = 16,
    reference: Annotated[bool, typer.Option(help="compare with the source model if found")] = True,
) -> None:
    """Perplexity, bits/param, size and KL to the source model of a saved lorq model."""
    from transformers import AutoTokenizer

    from lorq.data import TextConfig, load_blocks
    from lorq.io.native import load, read_meta

    with user_errors() as stage:
        meta = read_meta(path)
        model = load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        blocks = load_blocks(
            tokenizer, TextConfig(seq_len=256, max_blocks=eval_blocks), "evaluation"
        )
        original = None
        source = (meta.get("source") or {}).get("model")
        if reference and source:
            try:
                original = load_quietly(source, with_tokenizer=False).model
            except (FileNotFoundError, ValueError) as err:
                errors.print(f"source model not available, no KL: {err}")
        rows = []
        if original is not None:
            rows.append(_measure(original, blocks, None, "original", stage, quantized=False))
        rows.append(_measure(model, blocks, original, str(path), stage))
    console.print(_results_table(f"{path}", rows))


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    prompt: Annotated[str, typer.Option(help="the prompt (the chat template is applied if any)")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
) -> None:
    """Generate text from a saved lorq model (greedy)."""
    import torch
    from transformers import AutoTokenizer

    from lorq.io.native import load

    with user_errors():
        model = load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not hasattr(model, "generate"):
            raise ValueError(f"{path} holds an encoder; generate needs a causal language model")
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids["input_ids"],
                attention_mask=ids["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
    console.print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


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
