"""Decompositions W ≈ Q + s·B·A on plain tensors (docs/algorithms.md §2.1–2.4, §5)."""

from __future__ import annotations

import torch

from lorq.config import DecomposeConfig
from lorq.decomposition.common import Decomposition, Rounding, Weighting, check_rank
from lorq.decomposition.loftq import loftq
from lorq.decomposition.lq import lq_lora


def decompose(
    weight: torch.Tensor,
    config: DecomposeConfig,
    fisher: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> Decomposition:
    """Decompose a 2-D float ``weight`` (out × in) by ``config.method`` ∈ {"loftq", "lq"}.

    ``fisher`` (out × in, ≥ 0) is needed by ``config.weighting`` "fisher" / "both"; ``hessian``
    H = XᵀX/N of the layer's inputs (in × in) by "activations" / "both" and by GPTQ rounding.
    """
    check_rank(weight, config.rank)
    weighting = Weighting.build(weight, config, fisher, hessian)
    rounding = Rounding(config, hessian, weight.device, weighting.chol)
    if config.method == "loftq":
        return loftq(weight, config, weighting, rounding)
    return lq_lora(weight, config, weighting, rounding)


__all__ = ["DecomposeConfig", "Decomposition", "decompose"]
