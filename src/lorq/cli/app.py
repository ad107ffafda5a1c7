"""The shared pieces of the command line: the Typer app, consoles, progress bars, user errors."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lorq: quantized + low-rank compression and adaptation of language models.",
)
console = Console()
errors = Console(stderr=True)


class Stages:
    """Rich progress bars for library stages, started at the first (a failed call shows none)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def __call__(self, stage: str, total: int):
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=errors,
            )
            self.bar.start()
        bar, task = self.bar, self.bar.add_task(stage, total=total)
        return lambda n: bar.advance(task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# the library names parameters; the command line names its flags
FLAG_WORDS = {
    "overwrite=True": "--overwrite",
    "resume=False": "--no-resume",
    "a smaller seq_len": "a smaller --seq-len",
    "a smaller lr": "a smaller --lr",
    "choose another output": "choose another --out",
    "allow_pickle=True": "--allow-pickle",
}


def cli_words(message: str) -> str:
    """A library error message with its parameter names replaced by the CLI's flags."""
    for words, flag in FLAG_WORDS.items():
        message = message.replace(words, flag)
    return message


@contextlib.contextmanager
def user_errors() -> Iterator[Stages]:
    """Progress bars for the body; a user error becomes one line on stderr and exit code 2."""
    from safetensors import SafetensorError

    stages = Stages()
    try:
        yield stages
    except (ValueError, OSError, re.error, SafetensorError) as err:
        stages.close()
        message = cli_words(error_line(err))
        errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        stages.close()


def error_line(err: BaseException) -> str:
    """One line naming what failed: an OS error's file and reason, else the message."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, FileNotFoundError):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write or read{where}: {err.strerror}"
    if isinstance(err, re.error):
        return f"invalid regular expression {err.pattern!r}: {err}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def load_quietly(
    model: str, with_tokenizer: bool | None = True, packed: bool = True, allow_pickle: bool = False
):
    """Load a model under a spinner (transformers' own progress bars off).

    ``packed`` (default): a LLaMA GGUF's Q4_1 linears stay packed (see lorq.io.gguf_model);
    False where dense weights are needed (the Fisher differentiates them).
    """
    from transformers.utils import logging as hf_logging

    from lorq.io.models import load_model
    from lorq.util.runtime import release_free_memory

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # lorq reports what matters itself
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own bar
    with console.status(f"loading {model}"):
        loaded = load_model(
            model, with_tokenizer=with_tokenizer, packed=packed, allow_pickle=allow_pickle
        )
    release_free_memory()  # the loaders' transient copies
    return loaded


def folder_nbytes(path: Path) -> int:
    """Bytes of the files in a folder (what a job reading it writes about as much of)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_room(out: Path, nbytes: int) -> None:
    """``out``'s file system has room for ``nbytes`` (checked after loading, before writing)."""
    from lorq.util.atomic import check_location

    check_location(out, nbytes)


def check_out_dir(out: Path, overwrite: bool, model: str) -> None:
    """Refuse an output path that is not a lorq directory, exists without --overwrite, is
    ``model``'s own folder, holds a partial streamed run (finished by --stream --resume) or has
    no room for about the source's size."""
    from lorq.io.models import local_files, resolve, source_nbytes
    from lorq.io.native import is_lorq_dir
    from lorq.pipeline.writer import LORQ_FILE, MANIFEST_FILE
    from lorq.util.atomic import check_output

    if (out / MANIFEST_FILE).is_file() and not (out / LORQ_FILE).is_file():
        raise ValueError(
            f"{out} holds a partial streamed run ({MANIFEST_FILE} without {LORQ_FILE}); finish "
            "it with --stream --resume, or start it again with --stream --overwrite"
        )
    source = resolve(model)
    inputs, nbytes = local_files(source), source_nbytes(source)
    check_output(out, overwrite, is_lorq_dir, "lorq model", inputs=inputs, nbytes=nbytes)
