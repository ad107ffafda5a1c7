"""Decompositions W ≈ Q + s·B·A on plain tensors (docs/algorithms.md §2.1–2.4)."""

from __future__ import annotations

import torch

from lorq.config import DecomposeConfig
from lorq.decompose.common import Decomposition, Weighting, check_rank
from lorq.decompose.loftq import loftq
from lorq.decompose.lq import lq_lora


def decompose(
    weight: torch.Tensor, config: DecomposeConfig, fisher: torch.Tensor | None = None
) -> Decomposition:
    """Decompose a 2-D float ``weight`` (out × in) by ``config.method`` ∈ {"loftq", "lq"}.

    ``fisher`` (out × in, ≥ 0) weights the error and the low-rank fit (two-sided heuristic); the
    quantization itself stays unweighted.
    """
    check_rank(weight, config.rank)
    weighting = Weighting.from_fisher(fisher, weight)
    if config.method == "loftq":
        return loftq(weight, config, weighting)
    return lq_lora(weight, config, weighting)


__all__ = ["DecomposeConfig", "Decomposition", "decompose"]
