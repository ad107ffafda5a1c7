"""The calibration statistics of a model in memory, as the pipeline computes them, for users who
share one estimate between several compressions (``lorq.compress(..., fisher=, hessians=)``):

    estimate_fisher     F = Σ_i (∂ℓ_i/∂W)² of every target (out × in), block by block
    estimate_hessians   H = XᵀX/N of every target's inputs (in × in), block by block, on the
                        original model's activations (not block-sequential)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorq.calibrate.hessian import DEFAULT_MAX_BYTES, Hessians, block_hessians
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig
from lorq.io.models import ModelSource
from lorq.model.targets import find_targets, is_linear
from lorq.pipeline.passes import FisherStore, fisher_pass, top_hessians
from lorq.pipeline.run import Run
from lorq.pipeline.sinks import MemorySink
from lorq.pipeline.sources import ResidentSource
from lorq.util.progress import Progress, no_progress


@dataclass(frozen=True)
class _Statistics:
    """A run over the model's own names, and the names the caller gave its targets."""

    run: Run
    given: list[str]

    def renamed(self, values: dict) -> dict:
        pairs = zip(self.run.targets, self.given, strict=True)
        return {given: values[name] for name, given in pairs}


def _run(model: nn.Module, tokens: torch.Tensor, targets, weighting: str, progress) -> _Statistics:
    """A run over ``model`` in memory for the statistics of ``targets`` only."""
    targets = dict(targets if targets is not None else find_targets(model))
    if not targets:
        raise ValueError("no target layers given; pass {name: linear module}")
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in targets.items():
        if not is_linear(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not nn.Linear or GPT-2 Conv1D"
            )
        if id(module) not in names:
            raise ValueError(f"target {name!r} is not a module of the model; pass its own modules")
    own = [names[id(m)] for m in targets.values()]
    return _Statistics(_model_run(model, tokens, own, weighting, progress), list(targets))


def _model_run(model: nn.Module, tokens: torch.Tensor, names: list[str], weighting, progress):
    """A run of the statistics ``weighting`` needs, of the targets ``names``, on the original
    model's activations; scratch files in a temporary folder."""
    source = ResidentSource(model, ModelSource(type(model).__name__, ""))
    config = CompressConfig(weighting=weighting, sequential=False)
    device = next(model.parameters()).device
    run = Run(source, MemorySink(), config, names, None, Calibration.of(tokens), None, device,
              progress=progress)  # fmt: skip
    run.fisher_folder = run.needs_fisher
    return run


def _check_tokens(tokens: torch.Tensor, least: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else None
        raise ValueError(
            f"calibration batches must be an (n × seq_len) tensor of token ids, got {shape}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] < least or tokens.is_floating_point():
        raise ValueError(
            f"calibration batches must be a non-empty integer (n × seq_len ≥ {least}) tensor of "
            f"token ids, got shape {tuple(tokens.shape)} dtype {tokens.dtype}"
        )


def estimate_fisher(
    model: nn.Module,
    batches: torch.Tensor,
    targets: Mapping[str, nn.Module] | None = None,
    progress: Progress = no_progress,
) -> dict[str, torch.Tensor]:
    """F for every target weight from token blocks ``batches`` (n × seq_len): {name: fp32
    (out × in)} on the CPU. ``model`` must be a causal LM that returns a loss for ``labels``;
    packed layers are differentiated through their decoded weights. Its parameters and mode are
    left as they were."""
    _check_tokens(batches, 2)
    statistics = _run(model, batches, targets, "fisher", progress)
    run = statistics.run
    try:
        fisher_pass(run)
        store = FisherStore.of(run)
        fisher: dict[str, torch.Tensor] = {}
        for index in [*range(len(run.blocks)), None]:
            fisher.update(store.read(index) or {})
        return statistics.renamed(fisher)
    finally:
        run.sink.close()


def estimate_hessians(
    model: nn.Module,
    token_blocks: torch.Tensor,
    targets: Mapping[str, nn.Module],
    progress: Progress = no_progress,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Hessians:
    """H = 1/N·XᵀX of every target's inputs from ``token_blocks`` (n × seq_len): {name: fp32
    (in × in)} on the CPU, stored once per distinct input as a lower triangle. Every block runs
    on the original model's activations; hooks are removed and the mode restored."""
    _check_tokens(token_blocks, 1)
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} is not supported; allowed: a positive integer")
    statistics = _run(model, token_blocks, targets, "activations", progress)
    run = statistics.run
    was_training = model.training
    model.eval()
    try:
        inputs = run.capture()
        advance = progress("Hessians", len(run.blocks))
        parts: list[Hessians] = []
        for index, block in enumerate(run.blocks.modules):
            own = run.block_targets(index)
            hessians, output = block_hessians(block, own, inputs, True, run.world, max_bytes)
            inputs.hidden = output
            parts.append(hessians)
            advance(1)
        outside = run.block_targets(None)
        if outside:
            parts.append(top_hessians(run, outside, inputs))
        return Hessians.joined(parts, run.targets).renamed(statistics.renamed)
    finally:
        model.train(was_training)
        run.sink.close()
