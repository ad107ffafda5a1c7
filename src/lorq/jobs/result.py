"""What a compress job returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorq.budget import BudgetPlan
from lorq.config import CompressConfig
from lorq.evaluation.measure import Measurement


@dataclass(frozen=True)
class CompressResult:
    """A compressed model and what made it; ``lorq.save(result, dir)`` writes all of it.

    ``model``: the compressed model in memory (None when it was written to ``path`` as it went).
    ``metadata``: what ``lorq.json`` records beyond the layers (source, compress config, plan,
    calibration, evaluation); ``measurements``: the evaluation rows; ``errors``: the unweighted
    ‖W − Q − s·B·A‖ / ‖W‖ of every target; ``computed`` / ``reused``: the shards this run
    computed or found finished (a directory)."""

    model: nn.Module | None
    config: CompressConfig
    plan: BudgetPlan | None
    errors: dict[str, float]
    tokenizer: Any = None
    measurements: tuple[Measurement, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
