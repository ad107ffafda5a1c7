"""What an export target is, and the registry that finds one by name (PEFT-dispatcher style).

    export(model, out, format=NAME, ...)  ─▶  TARGETS[NAME].write(model, out, options)  ─▶  Exported

A target turns a lorq model (as ``lorq.load`` returns it, provenance attached) into files another
tool reads. ``check`` validates the output location and options before any work; ``write`` writes
atomically. Adding a target is one module under ``export/``, one import line in
``export/__init__.py`` and its tests (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ExportOptions:
    """What every target may use: the tokenizer to ship, the dtype of dense tensors (None: the
    target's default, fp32; a GGUF LoRA adapter's F16), overwrite, and the job's inputs."""

    tokenizer: Any = None
    dtype: str | None = None
    overwrite: bool = False
    inputs: tuple[str, ...] = ()  # paths the output must never replace (the model's own folder)

    @property
    def dense_dtype(self) -> str:
        """The dtype of dense tensors: the one given, else fp32."""
        return self.dtype or "fp32"

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Exported:
    """Where a target wrote, and one line on how to load it."""

    path: Path
    summary: str


class ExportTarget:
    """One export format: ``name``, ``description``, ``check`` and ``write``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, out: Path, options: ExportOptions) -> None:
        """Raise ValueError when ``out`` cannot take this export (before any work is done)."""

    def write(self, model: nn.Module, out: Path, options: ExportOptions) -> Exported:
        raise NotImplementedError


_TARGETS: dict[str, ExportTarget] = {}


def register_export(target: ExportTarget) -> ExportTarget:
    if target.name in _TARGETS:
        raise ValueError(f"export target {target.name!r} is registered twice")
    _TARGETS[target.name] = target
    return target


def export_targets() -> dict[str, ExportTarget]:
    """Every registered export target by name."""
    return dict(_TARGETS)


def export_target(name: str) -> ExportTarget:
    if name not in _TARGETS:
        raise ValueError(f"format={name!r} is not supported; allowed: {', '.join(_TARGETS)}")
    return _TARGETS[name]
