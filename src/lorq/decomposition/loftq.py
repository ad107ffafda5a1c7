"""LoftQ: alternating quantization and low-rank fit, quantize first (Li et al., 2023, Alg. 1).

    R = W
    for t = 1..T:   Q_t = quant(R);   s·B_t·A_t = svd_r(W − Q_t);   R = W − s·B_t·A_t
                    err_t = ‖√F ⊙ (W − Q_t − s·B_t·A_t)‖_F
    return the iterate with the smallest err_t (at 2 bits the error can rise after a few steps)

Activation-aware (docs/algorithms.md §5): the same two steps in the H-norm and GPTQ rounding
(``lorq.decomposition.common``).

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


def loftq(
    weight: torch.Tensor, config: DecomposeConfig, weighting: Weighting, rounding: Rounding
) -> Decomposition:
    weight = weight.detach().float()
    step = LowRankStep(config, weighting, weight)
    target, errors, best = weight, [], None
    for _ in range(config.iterations):
        q = rounding(target, config.quant)
        residual = weight - q.dequantize()
        low = step(residual)
        low_rank = low.dense()
        errors.append(weighting.error(residual - low_rank))
        if errors[-1] <= min(errors):
            best = Iterate(q, *split_factors(low, config.scaling))
        target = weight - low_rank
    assert best is not None
    return finish(config, best, errors)
