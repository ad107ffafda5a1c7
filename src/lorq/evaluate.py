"""Measurements: reconstruction error of quantized weights (more metrics join as stages land).

relative error = sqrt(Σ_i ‖W_i − Q_i‖²_F / Σ_i ‖W_i‖²_F)   over the matrices of a model
bits / param   = 8 · Σ_i nbytes(Q_i) / Σ_i numel(W_i)      (every stored buffer counted)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lorq.config import QuantConfig
from lorq.quant import quantize

Progress = Callable[[int], None]  # called with the number of steps just completed


@dataclass(frozen=True)
class QuantReportRow:
    config: QuantConfig
    numel: int
    nbytes: int
    squared_error: float
    squared_norm: float

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def relative_error(self) -> float:
        return (self.squared_error / self.squared_norm) ** 0.5


def quantization_report(
    weights: Mapping[str, torch.Tensor],
    configs: Iterable[QuantConfig],
    progress: Progress | None = None,
) -> list[QuantReportRow]:
    """Quantize every weight with every config; one row per config, totals over the weights."""
    rows = []
    for config in configs:
        numel = nbytes = 0
        err = norm = 0.0
        for weight in weights.values():
            w = weight.float()
            q = quantize(w, config)
            numel, nbytes = numel + w.numel(), nbytes + q.nbytes
            err += float(torch.sum((q.dequantize() - w) ** 2))
            norm += float(torch.sum(w**2))
            if progress:
                progress(1)
        rows.append(QuantReportRow(config, numel, nbytes, err, norm))
    return rows
