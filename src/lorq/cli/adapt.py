"""Verbs that adapt and hand on a compressed model: finetune, merge, export."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorq.cli.app import app, check_out_dir, console, errors, user_errors

CHECKPOINT_CONFIG = "lorq_finetune.json"
CARRIED_META = ("source", "compress", "plan", "evaluation")


def load_lorq(path: Path, with_tokenizer: bool = True):
    """(model, tokenizer or None, lorq.json) of a lorq model directory."""
    from lorq.io.native import load, read_meta

    meta = read_meta(path)
    model = load(path)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            raise ValueError(f"{path} has no tokenizer files; re-run lorq compress") from None
    return model, tokenizer, meta


class TrainingBar:
    """A rich bar for training: steps, loss, tokens/s, evaluation perplexity."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[speed]} tok/s  ppl {task.fields[ppl]}"
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
            self.bar.update(self.task, ppl=f"{values['perplexity']:.3f}")

    def close(self) -> None:
        self.bar.stop()


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def _checkpoint_dir(out: Path, config_dict: dict[str, Any], resume: bool) -> Path:
    """``OUT-checkpoints``: reused when resuming with the same settings, else started afresh."""
    folder = out.with_name(out.name + "-checkpoints")
    if not is_main_process():
        return folder
    marker = folder / CHECKPOINT_CONFIG
    if folder.exists() and not marker.exists():
        raise ValueError(
            f"{folder} exists and is not a lorq checkpoint folder; choose another --out"
        )
    if folder.exists() and resume and json.loads(marker.read_text()) != config_dict:
        raise ValueError(
            f"the checkpoints in {folder} were made with other settings; pass the same settings, "
            "or --no-resume to start again"
        )
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(config_dict, indent=1))
    return folder


def _peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def _finetune_table(result, out: Path) -> Table:
    table = Table(title=f"fine-tuned → {out}", show_header=False)
    first, last = result.losses[0][1], result.losses[-1][1]
    table.add_row("optimizer steps", str(result.steps))
    table.add_row("training loss (first → last step)", f"{first:.4f} → {last:.4f}")
    before, after = result.perplexity_before, result.perplexity_after
    table.add_row("evaluation perplexity (before → after)", f"{before:.3f} → {after:.3f}")
    table.add_row("tokens/s (training)", f"{result.tokens_per_second:.0f}")
    table.add_row("training time (s)", f"{result.seconds:.1f}")
    table.add_row("peak memory, whole process (MB)", f"{_peak_memory_mb():.0f}")
    return table


@app.command()
def finetune(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    data: Annotated[
        str, typer.Option(help="builtin, .txt, .jsonl (text/prompt/messages), hf:NAME")
    ] = ("builtin"),
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default 100)")] = None,
    epochs: Annotated[float | None, typer.Option(help="epochs instead of --steps")] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine schedule)")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="sequences per device and step")] = 4,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 256,
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute activations")] = False,
    eval_every: Annotated[int, typer.Option(help="evaluate every N steps (0: before/after)")] = 0,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps")] = 25,
    trainable: Annotated[
        list[str] | None, typer.Option(help="extra parameter-name regex to train (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: PATH-finetuned)")] = (
        None
    ),
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
    resume: Annotated[bool, typer.Option(help="continue from OUT-checkpoints if present")] = True,
    keep_checkpoints: Annotated[bool, typer.Option(help="keep OUT-checkpoints at the end")] = False,
    low_memory: Annotated[
        bool, typer.Option(help="CPU: pin malloc's mmap threshold (less memory, slower steps)")
    ] = False,
) -> None:
    """Fine-tune the low-rank factors of a compressed model (transformers.Trainer underneath)."""
    from lorq.io.native import save
    from lorq.runtime import fixed_mmap_threshold
    from lorq.train import FinetuneConfig
    from lorq.train import finetune as run_finetune

    if low_memory:
        fixed_mmap_threshold()

    out = out or path.with_name(path.name + "-finetuned")
    bar = TrainingBar()
    with user_errors():
        config = FinetuneConfig(
            data=data,
            steps=steps,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing,
            eval_every=eval_every,
            save_every=save_every,
            trainable=tuple(trainable or ()),
        )
        check_out_dir(out, overwrite)
        model, tokenizer, meta = load_lorq(path)
        checkpoints = _checkpoint_dir(out, config.to_dict(), resume)
        try:
            result = run_finetune(model, tokenizer, config, checkpoints, resume, bar)
        except BaseException:
            if not any(checkpoints.glob("checkpoint-*")):  # nothing to resume from: no trace
                shutil.rmtree(checkpoints, ignore_errors=True)
            raise
        finally:
            bar.close()
        if not is_main_process():
            return
        extra = {key: meta[key] for key in CARRIED_META if key in meta}
        extra["finetune"] = {
            "config": config.to_dict(),
            "result": result.to_dict(),
            "from": str(path),
        }
        save(model, out, tokenizer, extra, overwrite)
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    console.print(_finetune_table(result, out))
    console.print(f"saved to {out}")


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
    path: Annotated[Path, typer.Argument(help="a lorq model directory")],
    out: Annotated[Path, typer.Option(help="output directory")],
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (dense merge)")] = "fp32",
    mins: Annotated[
        str | None,
        typer.Option(help="QA-LoRA float mins: fp32 for an exact merge (6 bits, not GGUF)"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a directory lorq wrote")] = False,
) -> None:
    """Merge s·B·A into the weights: a dense Hugging Face model, or for QA-LoRA a quantized one."""
    from lorq.io.hf_merged import is_export_dir, save_merged, torch_dtype
    from lorq.io.native import read_meta, save
    from lorq.pipeline import merge_qa_lora

    with user_errors():
        torch_dtype(dtype)
        if mins not in (None, "fp16", "fp32"):
            raise ValueError(f"--mins {mins!r} is not supported; allowed: fp16, fp32")
        kinds = {spec.get("kind", "lora") for spec in read_meta(path)["layers"].values()}
        if kinds == {"quant"}:
            raise ValueError(f"{path} is already merged (no adapters left)")
        qa_lora = "qa-lora" in kinds
        check_out_dir(out, overwrite, None if qa_lora else is_export_dir, "lorq export")
        model, tokenizer, meta = load_lorq(path)
        if qa_lora:
            errors = merge_qa_lora(model, mins)
            extra = {key: meta[key] for key in CARRIED_META if key in meta}
            extra["merge"] = {"from": str(path), "errors": {n: vars(e) for n, e in errors.items()}}
            save(model, out, tokenizer, extra, overwrite)
        else:
            save_merged(model, out, tokenizer, dtype, overwrite, source=str(path))
    if qa_lora:
        console.print(_merge_table(errors))
        console.print(f"merged quantized model written to {out} (lorq export --format gguf|gptq)")
    else:
        console.print(f"merged model written to {out} (load it with transformers' from_pretrained)")


EXPORT_FORMATS = ("peft", "gguf", "gptq")


def _export(fmt: str, model, meta, out: Path, tokenizer, dtype: str, overwrite: bool, path: Path):
    from lorq.io.peft import export_peft
    from lorq.io.quantized_export import export_gguf, export_gptq

    if fmt == "peft":
        export_peft(model, out, tokenizer, dtype, overwrite, source=str(path))
        return (
            f"PEFT adapter in {out / 'adapter'}, its base model in {out / 'base'}: "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)"
        )
    if fmt == "gguf":
        export_gguf(model, meta, out, tokenizer, overwrite)
        return f"GGUF written to {out} (transformers: from_pretrained(dir, gguf_file=name))"
    _, checkpoint_format = export_gptq(model, meta, out, tokenizer, overwrite)
    return f"GPTQ checkpoint ({checkpoint_format}) written to {out}"


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="a lorq model directory")],
    out: Annotated[Path, typer.Option(help="output directory (gguf: the .gguf file)")],
    format: Annotated[str, typer.Option(help=" | ".join(EXPORT_FORMATS))] = "peft",
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (PEFT's tensors)")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="replace what lorq wrote there")] = False,
) -> None:
    """Export: a PEFT adapter with its base, or a merged QA-LoRA model as GGUF / GPTQ."""
    from lorq.io.hf_merged import is_export_dir, torch_dtype

    with user_errors():
        if format not in EXPORT_FORMATS:
            raise ValueError(
                f"--format {format!r} is not supported; allowed: {', '.join(EXPORT_FORMATS)}"
            )
        torch_dtype(dtype)
        if format == "peft":
            check_out_dir(out, overwrite, is_export_dir, "lorq export")
        model, tokenizer, meta = load_lorq(path)
        message = _export(format, model, meta, out, tokenizer, dtype, overwrite, path)
    console.print(message)
