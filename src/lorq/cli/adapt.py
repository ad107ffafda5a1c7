"""Verbs that adapt and hand on a compressed model: finetune, recover, merge, export.

Each verb maps its options onto one library call and prints what it returns.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorq.cli.app import app, check_room, console, errors, folder_nbytes, user_errors
from lorq.exporters import export_targets

PathArgument = Annotated[Path, typer.Argument(help="a lorq model directory")]
OverwriteOption = Annotated[bool, typer.Option(help="replace what lorq wrote there")]


class TrainingBar:
    """A rich bar for training: steps, loss, tokens/s, evaluation perplexity."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[speed]} tok/s  eval {task.fields[ppl]}"
            ),
            TimeElapsedColumn(),
            console=errors,
        )
        self.task = None

    def __call__(self, event: str, values: dict[str, Any]) -> None:
        if event == "start" and self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=values["total"], loss="-", speed="-", ppl="-")
            self.bar.update(self.task, completed=values["step"])
        elif event == "step" and self.task is not None:
            self.bar.update(
                self.task,
                completed=values["step"],
                loss=f"{values['loss']:.4f}",
                speed=f"{values['tokens_per_s']:.0f}",
            )
        elif event == "eval" and self.task is not None:
            value = values.get("perplexity", values.get("kl"))
            self.bar.update(self.task, ppl=f"{value:.3f}")

    def close(self) -> None:
        self.bar.stop()


def _peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def _finetune_table(result, out: Path) -> Table:
    table = Table(title=f"fine-tuned → {out}", show_header=False)
    first, last = result.losses[0][1], result.losses[-1][1]
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("training loss (first → last step)", f"{first:.4f} → {last:.4f}")
    before, after = result.perplexity_before, result.perplexity_after
    metric = "KL to the original" if result.metric == "kl" else "perplexity"
    table.add_row(f"evaluation {metric} (before → after)", f"{before:.4g} → {after:.4g}")
    table.add_row("tokens/s (training)", f"{result.tokens_per_second:.0f}")
    table.add_row("training time (s)", f"{result.seconds:.1f}")
    table.add_row("peak memory, whole process (MB)", f"{_peak_memory_mb():.0f}")
    return table


DataOption = Annotated[
    str, typer.Option(help="builtin, .txt, .jsonl (text/prompt/messages), hf:NAME")
]
StepsOption = Annotated[int | None, typer.Option(help="optimizer steps (default 100)")]
EpochsOption = Annotated[float | None, typer.Option(help="epochs instead of --steps")]
LrOption = Annotated[float, typer.Option(help="peak learning rate (cosine schedule)")]
BatchOption = Annotated[int, typer.Option(help="sequences per device and step")]
AccumOption = Annotated[int, typer.Option(help="gradient accumulation steps")]
SeqLenOption = Annotated[int, typer.Option(help="tokens per training sequence")]
RecomputeOption = Annotated[bool, typer.Option(help="recompute activations")]
EvalEveryOption = Annotated[int, typer.Option(help="evaluate every N steps (0: before/after)")]
EvalBlocksOption = Annotated[int, typer.Option(help="blocks of the built-in evaluation text")]
SaveEveryOption = Annotated[int, typer.Option(help="checkpoint every N steps")]
TrainableOption = Annotated[
    list[str] | None, typer.Option(help="extra parameter-name regex to train (repeatable)")
]
ResumeOption = Annotated[bool, typer.Option(help="continue from OUT-checkpoints if present")]
KeepOption = Annotated[bool, typer.Option(help="keep OUT-checkpoints at the end")]
LowMemoryOption = Annotated[
    bool, typer.Option(help="CPU: pin malloc's mmap threshold (less memory, slower steps)")
]


@app.command()
def finetune(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    data: DataOption = "builtin",
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    lr: LrOption = 2e-4,
    batch_size: BatchOption = 4,
    grad_accum: AccumOption = 1,
    seq_len: SeqLenOption = 256,
    gradient_checkpointing: RecomputeOption = False,
    eval_every: EvalEveryOption = 0,
    eval_blocks: EvalBlocksOption = 16,
    save_every: SaveEveryOption = 25,
    trainable: TrainableOption = None,
    out: Annotated[
        Path | None, typer.Option(help="output directory (default: PATH-finetuned)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
    resume: ResumeOption = True,
    keep_checkpoints: KeepOption = False,
    low_memory: LowMemoryOption = False,
) -> None:
    """Fine-tune the low-rank factors of a compressed model (transformers.Trainer underneath)."""
    from lorq.train.trainer import CONFIG_FIELDS, FinetuneConfig

    with user_errors():
        config = FinetuneConfig(**{k: v for k, v in locals().items() if k in CONFIG_FIELDS})
    _train_job(path, config, out, dict(locals()))


@app.command()
def recover(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    top_k: Annotated[int, typer.Option(help="teacher tokens kept per position")] = 64,
    scales: Annotated[
        bool, typer.Option(help="train the formats' stored scales too (GGUF d/dmin, NF absmax…)")
    ] = False,
    scale_lr: Annotated[
        float, typer.Option(help="--scales: their rate, in units of their matrix's mean")
    ] = 1e-3,
    teacher: Annotated[
        str | None, typer.Option(help="the original model (default: lorq.json's source)")
    ] = None,
    data: DataOption = "builtin",
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    lr: LrOption = 1e-4,
    batch_size: BatchOption = 4,
    grad_accum: AccumOption = 1,
    seq_len: SeqLenOption = 256,
    gradient_checkpointing: RecomputeOption = False,
    eval_every: EvalEveryOption = 0,
    eval_blocks: EvalBlocksOption = 16,
    save_every: SaveEveryOption = 25,
    trainable: TrainableOption = None,
    out: Annotated[
        Path | None, typer.Option(help="output directory (default: PATH-recovered)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
    resume: ResumeOption = True,
    keep_checkpoints: KeepOption = False,
    low_memory: LowMemoryOption = False,
) -> None:
    """Train the low-rank factors (and with --scales the stored scales) toward the original
    model's next-token distributions (KL on its cached top-k), the fine-tune's conventions
    otherwise."""
    from lorq.train.trainer import RECOVER_FIELDS, RecoverConfig

    with user_errors():
        config = RecoverConfig(**{k: v for k, v in locals().items() if k in RECOVER_FIELDS})
    _train_job(path, config, out, dict(locals()))


def _train_job(path: Path, config, out: Path | None, given: dict) -> None:
    """``lorq finetune``, or ``lorq recover`` for a :class:`RecoverConfig` (its ``--teacher``
    in ``given``): one library call, a table of what it did."""
    from lorq.io import load_with_tokenizer
    from lorq.jobs.finetune import check_finetune_out, default_finetune_out, is_main_process
    from lorq.jobs.recover import RECOVERED
    from lorq.train.trainer import RecoverConfig
    from lorq.util.runtime import fixed_mmap_threshold

    if given["low_memory"]:
        fixed_mmap_threshold()
    bar = TrainingBar()
    with user_errors():
        if out is None and isinstance(config, RecoverConfig):
            out = default_finetune_out(path, RECOVERED)
        out = out or default_finetune_out(path)
        check_finetune_out(out, given["overwrite"], inputs=[path])
        model, tokenizer = load_with_tokenizer(path)
        check_room(out, folder_nbytes(path))
        options = {k: given[k] for k in ("resume", "keep_checkpoints", "overwrite")}
        try:
            teacher = given.get("teacher")  # recover's --teacher (None: the recorded source)
            result = _train_call(model, tokenizer, config, out, options, str(path), teacher, bar)
        finally:
            bar.close()
    if is_main_process():
        console.print(_finetune_table(result, out))
        console.print(f"saved to {out}")


def _train_call(model, tokenizer, config, out, options, source, teacher, bar):
    """finetune_model, or for a RecoverConfig recover (``teacher`` None: the recorded source)."""
    from lorq.jobs.finetune import finetune_model
    from lorq.jobs.recover import recover
    from lorq.train.trainer import RecoverConfig

    if not isinstance(config, RecoverConfig):
        return finetune_model(model, tokenizer, config, out, monitor=bar, source=source, **options)
    return recover(model, tokenizer, config, out, teacher=teacher, monitor=bar, source=source,
                   **options)  # fmt: skip


def _merge_table(errors: dict) -> Table:
    table = Table(title="QA-LoRA merge into the quantized base", show_header=False)
    worst = max(errors.values(), key=lambda e: e.relative)
    table.add_row("layers merged", str(len(errors)))
    table.add_row("largest |Δ weight| error", f"{max(e.max_abs for e in errors.values()):.3g}")
    table.add_row("worst relative error ‖W′−W‖/‖W‖", f"{worst.relative:.3g}")
    lost = max(e.delta_relative for e in errors.values())
    table.add_row("worst share of the adapter lost", f"{lost:.3g}")
    return table


@app.command()
def merge(
    path: PathArgument,
    out: Annotated[Path, typer.Option(help="output directory")],
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (dense merge)")] = "fp32",
    mins: Annotated[
        str | None,
        typer.Option(help="QA-LoRA float mins: fp32 for an exact merge (6 bits, not GGUF)"),
    ] = None,
    dequantize: Annotated[bool, typer.Option(help="always merge into dense weights")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge s·B·A into the weights: a dense Hugging Face model, or for QA-LoRA a quantized one."""
    from lorq.exporters.hf import dense_nbytes, torch_dtype
    from lorq.io import load_with_tokenizer
    from lorq.jobs.merge import check_merge_out, merges_quantized
    from lorq.jobs.merge import merge as merge_model

    with user_errors():
        torch_dtype(dtype)
        model, tokenizer = load_with_tokenizer(path)
        quantized = merges_quantized(model, dequantize)
        check_merge_out(out, quantized, overwrite, inputs=[path])
        check_room(out, folder_nbytes(path) if quantized else dense_nbytes(model, dtype))
        result = merge_model(model, dequantize=dequantize, min_dtype=mins, tokenizer=tokenizer)
        result.save(out, dtype, overwrite)
    if result.quantized:
        console.print(_merge_table(result.errors))
        console.print(f"merged quantized model written to {out} (lorq export --format gguf|gptq)")
    else:
        console.print(f"merged model written to {out} (load it with transformers' from_pretrained)")


@app.command()
def export(
    path: PathArgument,
    out: Annotated[Path, typer.Option(help="output directory (gguf: the .gguf file)")],
    format: Annotated[str, typer.Option(help=" | ".join(export_targets()))] = "peft",
    dtype: Annotated[
        str | None,
        typer.Option(help="fp32 | fp16 | bf16: dense tensors (default fp32), GGUF adapter (fp16)"),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Export: a PEFT adapter with its base (dense, or still compressed as a bitsandbytes /
    GPTQ base), a merged HF model, or a merged QA-LoRA model as GGUF / GPTQ."""
    from lorq.exporters.hf import dense_nbytes
    from lorq.io import load_with_tokenizer
    from lorq.jobs.export import check_export
    from lorq.jobs.export import export as export_model

    with user_errors():
        check_export(out, format, dtype=dtype, overwrite=overwrite, inputs=(str(path),))
        model, tokenizer = load_with_tokenizer(path)
        dense = format in ("peft", "hf")
        check_room(out, dense_nbytes(model, dtype or "fp32") if dense else folder_nbytes(path))
        exported = export_model(
            model, out, format, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite
        )
    console.print(exported.summary)
