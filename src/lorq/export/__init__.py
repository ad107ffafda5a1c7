"""Exports: a lorq model handed to the tools people run (docs/architecture.md).

    lorq.export(model, out, format="peft" | "hf" | "gguf" | "gptq" | "bnb",
                tokenizer=..., dtype=...)

Each target is one module registered here; ``export_targets()`` lists them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

# registry lines: one import per target, in the order `lorq export --help` lists them
from lorq.export import peft  # noqa: F401  isort: skip
from lorq.export import hf  # noqa: F401  isort: skip
from lorq.export import gguf  # noqa: F401  isort: skip
from lorq.export import gptq  # noqa: F401  isort: skip
from lorq.export import bnb  # noqa: F401  isort: skip
from lorq.io.native import input_paths  # isort: skip
from lorq.export.base import (
    Exported,
    ExportOptions,
    ExportTarget,
    export_target,
    export_targets,
    register_export,
)


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


__all__ = [
    "ExportOptions",
    "ExportTarget",
    "Exported",
    "check_export",
    "export",
    "export_target",
    "export_targets",
    "register_export",
]
