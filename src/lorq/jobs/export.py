"""The ``lorq export`` job: a lorq model written as another tool's files.

lorq.export(model, out, format="peft" | "hf" | "gguf" | "gptq" | "bnb", tokenizer=, dtype=)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from lorq.exporters import Exported, ExportOptions, export_target
from lorq.io.native import input_paths


def check_export(out: str | Path, format: str, **options: Any) -> None:
    """Validate a target, its options and the output location, before any work."""
    export_target(format).check(Path(out), ExportOptions(**options))


def export(model: nn.Module, out: str | Path, format: str = "peft", **options: Any) -> Exported:
    """Write ``model`` (a lorq model) to ``out`` as ``format``; ``options``: tokenizer, dtype
    (fp32 | fp16 | bf16, of dense tensors), overwrite."""
    target = export_target(format)
    opts = ExportOptions(**options)
    opts = replace(opts, inputs=(*opts.inputs, *input_paths(model)))
    target.check(Path(out), opts)
    return target.write(model, Path(out), opts)
