"""Helpers shared by the benchmark scripts (run them as ``python bench/NAME.py``)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from lorq.io.models import load_model
from lorq.model.targets import dense_weight, find_targets


def model_weights(name: str) -> list[torch.Tensor]:
    """Every target linear weight of a built-in model, (out × in) float32, contiguous."""
    model = load_model(name, with_tokenizer=False).model
    return [dense_weight(module).float().contiguous() for module in find_targets(model).values()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
