"""LQ-LoRA: low-rank first, then quantize the rest, until the error rises (Guo et al., 2024, §3.1).

    Q_0 = 0
    for t = 1..T_max:   s·B_t·A_t = svd_r(W − Q_{t−1});   Q_t = quant(W − s·B_t·A_t)
                        err_t = ‖√F ⊙ (W − Q_t − s·B_t·A_t)‖_F;   stop once err_t stops falling
    return the iterate with the smallest err_t

Activation-aware (docs/algorithms.md §5): svd_r is the closed form in the H-norm, quant may be
GPTQ on H, err_t = ‖(W − Q_t − s·B_t·A_t)·L‖_F (``lorq.decomposition.common``).

Shapes: W (out × in), B (out × r), A (r × in).
"""

from __future__ import annotations

import torch

from lorq.config import DecomposeConfig
from lorq.decomposition.common import (
    Decomposition,
    Iterate,
    LowRankStep,
    Rounding,
    Weighting,
    finish,
)
from lorq.decomposition.svd import split_factors

STALL = 1e-6  # a relative improvement below this counts as "no longer falling"


def lq_lora(
    weight: torch.Tensor, config: DecomposeConfig, weighting: Weighting, rounding: Rounding
) -> Decomposition:
    weight = weight.detach().float()
    step = LowRankStep(config, weighting, weight)
    dense_q = torch.zeros_like(weight)
    errors: list[float] = []
    best = None
    for _ in range(config.iterations):
        low = step(weight - dense_q)
        low_rank = low.dense()
        q = rounding(weight - low_rank, config.quant)
        dense_q = q.dequantize()
        errors.append(weighting.error(weight - dense_q - low_rank))
        if errors[-1] <= min(errors):
            best = Iterate(q, *split_factors(low, config.scaling))
        if len(errors) > 1 and errors[-1] > errors[-2] * (1 - STALL):
            break
    assert best is not None
    return finish(config, best, errors)
