"""The state of one compress run, shared by the driver's steps: the source, the sink, the config
and plan, the calibration, where it computes (device, dtype, processes) and what it produced."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.budget import BudgetPlan
from lorq.calibrate.blocks import BlockInputs, capture_inputs
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig, uses_activations, uses_fisher
from lorq.model.packing import input_embedding
from lorq.pipeline.sources import Part, Source
from lorq.quant import QuantConfig, QuantizedTensor, as_config
from lorq.util import dist
from lorq.util.progress import Progress, no_progress


@dataclass(frozen=True)
class Given:
    """Statistics and bases computed beforehand (``lorq.compress``'s ``fisher=``, ``hessians=``,
    ``base=``): used as they are instead of being collected."""

    fisher: Mapping[str, torch.Tensor] | None = None
    hessians: Mapping[str, torch.Tensor] | None = None
    base: Mapping[str, QuantizedTensor] | None = None


@dataclass
class Run:
    source: Source
    sink: Any  # MemorySink | DirectorySink
    config: CompressConfig
    targets: list[str]  # in model order; modules are looked up by name when used
    plan: BudgetPlan | None = None
    calibration: Calibration | None = None  # None: the run needs no text
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    world: dist.World = field(default_factory=dist.World)
    progress: Progress = no_progress
    offload: Path | None = None
    given: Given = field(default_factory=Given)
    errors: dict[str, float] = field(default_factory=dict)
    advance: Any = None  # the decomposition's progress, one step per target of this process
    on_statistics: Any = None  # callback(block index, Hessians) for tests and tools
    fisher_folder: bool = False  # the Fisher of this run is computed into the scratch folder
    reference: torch.Tensor | None = None  # the original model's stream X (recovery, sequential)
    recovered: dict = field(default_factory=dict)  # block index → its recovery (lorq.recovery)
    sensitivities: dict[str, float] | None = None  # {target: α} of a KL plan (§10)
    _tokens: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self.source.model

    @property
    def blocks(self):
        return self.source.blocks

    @property
    def planned_embedding(self) -> str | None:
        """The token embedding's name when the plan chooses its format (plan_embeddings)."""
        if not self.config.plan_embeddings:
            return None
        return input_embedding(self.model)[0]

    @property
    def needs_fisher(self) -> bool:
        """Whether the run computes the Fisher: its decomposition weighs by it, or a plan it
        makes costs by it (not when given)."""
        config, planning = self.config, self.config.budgeted and self.plan is None
        wanted = uses_fisher(config.weighting) or (planning and uses_fisher(config.cost_weighting))
        return wanted and self.given.fisher is None

    @property
    def needs_hessians(self) -> bool:
        """Whether the decomposition or Q's rounding uses H (and it is not given)."""
        config = self.config
        wanted = uses_activations(config.weighting) or config.rounds_with_h
        return wanted and self.given.hessians is None

    @property
    def recovers(self) -> bool:
        return self.config.recover == "block"

    @property
    def needs_inputs(self) -> bool:
        """Whether the blocks' calibration inputs flow: the decomposition or Q's rounding uses H
        (not when given), or the blocks are recovered."""
        return self.needs_hessians or self.recovers

    @property
    def sequential(self) -> bool:
        return self.config.sequential and self.given.hessians is None

    def tokens(self) -> torch.Tensor:
        """The calibration token ids (n × L), cut once."""
        if self._tokens is None:
            assert self.calibration is not None
            self._tokens = self.calibration.load(self.tokenizer)
        return self._tokens

    def block_targets(self, index: int | None) -> dict[str, nn.Module]:
        """{name: module} of the targets in block ``index`` (None: outside every block)."""
        return {
            name: self.model.get_submodule(name)
            for name in self.targets
            if self.blocks.index_of(name) == index
        }

    def quant_of(self, name: str) -> QuantConfig:
        """The planned config of target ``name``, or the uniform one."""
        if self.plan is not None:
            return self.plan.config_of(name)
        return as_config(self.config.quant)

    def adapter_of(self, name: str) -> tuple[int, int | None]:
        """(rank, factor bits) of target ``name``: the plan's when it chose them, else the
        config's (factor bits None: as computed; 8: rounded to the 8-bit grid)."""
        if self.plan is not None and self.plan.adapters_planned:
            rank, bits = self.plan.adapter_of(name)
            return rank, 8 if bits == 8 else None
        return self.config.rank, self.config.factor_bits

    def capture(self, dense: bool = False) -> BlockInputs:
        """X_0 of the calibration tokens: block 1's inputs, the outside parts resident meanwhile
        (in the run's dtype, on its device; ``dense`` as for the Fisher)."""
        parts = self.source.outside_parts()
        self.source.load(parts, self.dtype, self.device, dense)
        try:
            first = self.blocks.modules[0]
            return capture_inputs(self.model, first, self.tokens(), self.device, self.offload)
        finally:
            self.source.release(parts)

    def load(self, parts: list[Part], forward: bool, dense: bool = False) -> None:
        """Give ``parts`` their weights: in the run's dtype when they will run a forward, else
        as stored (each matrix is decomposed from its own fp32 copy either way)."""
        self.source.load(parts, self.dtype if forward else None, self.device, dense)
