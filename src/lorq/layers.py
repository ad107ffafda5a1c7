"""What every compression path shares, layer by layer: the targets of a config, the relative
error of a replaced matrix, and a per-layer step that reports progress and returns memory.

    relative error = ‖W − Ŵ‖_F / ‖W‖_F
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from lorq.config import CompressConfig
from lorq.progress import Progress
from lorq.runtime import release_free_memory
from lorq.surgery import DEFAULT_EXCLUDE, find_targets

RELEASE_EVERY = 16  # layers between returns of freed heap memory to the OS


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖W − approximation‖_F / ‖W‖_F."""
    residual = torch.linalg.vector_norm(weight - approximation)
    return float(residual / torch.linalg.vector_norm(weight).clamp_min(1e-30))


def targets_of(model: nn.Module, config: CompressConfig) -> dict[str, nn.Module]:
    """The linear modules ``config.include`` / ``config.exclude`` select; ValueError if none."""
    exclude = DEFAULT_EXCLUDE if config.exclude is None else config.exclude
    targets = find_targets(model, config.include, exclude)
    if not targets:
        raise ValueError(
            f"no linear layers matched the targets (include={config.include}, exclude={exclude}); "
            "check the patterns against the model's module names"
        )
    return targets


class LayerStep:
    """Call once per finished layer: advances ``progress`` and, every RELEASE_EVERY layers, hands
    the heap memory the finished layers freed back to the OS (their temporaries fragment it)."""

    def __init__(self, progress: Progress, label: str, total: int):
        self.advance = progress(label, total)
        self.done = itertools.count(1)

    def __call__(self) -> None:
        self.advance(1)
        if next(self.done) % RELEASE_EVERY == 0:
            release_free_memory()
