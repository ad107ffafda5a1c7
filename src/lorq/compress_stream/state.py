"""The state of one streaming run, checked before any work: the source, the skeleton, its
blocks and targets, the device and dtype, the calibration, and the settings a resume must match."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.budget import BudgetPlan
from lorq.compress import Calibration
from lorq.config import CompressConfig
from lorq.io.native import FORMAT_VERSION
from lorq.layers import targets_of
from lorq.models import is_causal
from lorq.preflight import check_compress
from lorq.progress import Progress
from lorq.stream import dist
from lorq.stream.devices import resolve_device, resolve_dtype
from lorq.stream.skeleton import (
    Blocks,
    decoder_blocks,
    skeleton,
)
from lorq.stream.source import StreamSource, stream_source
from lorq.surgery import weight_shape


@dataclass(frozen=True)
class TokenBlocks:
    """Calibration given as token ids (n × L), instead of a text to cut."""

    tokens: torch.Tensor

    @property
    def blocks(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def record(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.tokens.cpu().numpy().tobytes()).hexdigest()
        return {"tokens": list(self.tokens.shape), "sha256": digest}


def calibration_record(calibration) -> dict[str, Any] | None:
    if calibration is None:
        return None
    if isinstance(calibration, TokenBlocks):
        return calibration.record()
    return dataclasses.asdict(calibration)


def tokens_of(calibration, folder: Path) -> torch.Tensor:
    if isinstance(calibration, TokenBlocks):
        return calibration.tokens
    return calibration.load(tokenizer_of(folder))


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{folder} has no usable tokenizer for the calibration text "
            f"({str(err).splitlines()[0]})"
        ) from None


@dataclass
class Run:
    """The state of one streaming run (shared by its steps)."""

    source: StreamSource
    model: nn.Module
    blocks: Blocks
    config: CompressConfig
    plan: BudgetPlan | None
    device: torch.device
    dtype: torch.dtype
    sequential: bool
    world: dist.World
    progress: Progress
    targets: dict[str, nn.Module] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    advance: Any = None  # the decomposition's progress, one step per target of this rank
    statistics: Any = None  # a callback(block index, Hessians) for tests and tools


def prepare(model: str, config: CompressConfig, calibration, plan, where) -> tuple[Run, Any]:
    """The run's state (checked before any work) and the calibration it uses, if any."""
    device, dtype, sequential, progress = where
    if isinstance(calibration, torch.Tensor):
        calibration = TokenBlocks(calibration)
    elif isinstance(calibration, str):
        calibration = Calibration(calibration)
    world = dist.world()
    target_device = resolve_device(device, world)
    run_dtype = resolve_dtype(dtype, target_device)
    _check_streamable(config, plan)
    check_compress(model, config, plan)  # formats against shapes, budget, plan: from config.json
    source = stream_source(model)
    built = skeleton(source.config, is_causal(source.config))
    run = Run(
        source, built, decoder_blocks(built), config, plan, target_device, run_dtype,
        sequential, world, progress,
    )  # fmt: skip
    _check_targets(run)
    return run, calibration if config.activations or config.fisher else None


def _check_streamable(config: CompressConfig, plan: BudgetPlan | None) -> None:
    """What the streaming job does not do (yet), refused before any work."""
    if config.method == "qa-lora":
        raise ValueError("method='qa-lora' is not streamed; compress without stream (--stream)")
    if config.budget_mb is not None:
        raise ValueError(
            "budget_mb= (MiB of GGUF files) is not streamed; give budget= (bits/param) instead"
        )
    if config.embeddings is not None:
        raise ValueError("embeddings= (packed embeddings) is not streamed; leave it unset")


def _check_targets(run: Run) -> None:
    """The config's targets, all inside the transformer blocks (what is streamed)."""
    from lorq.preflight import check_plan

    targets = targets_of(run.model, run.config)
    outside = [name for name in targets if run.blocks.index_of(name) is None]
    if outside:
        raise ValueError(
            f"target {outside[0]!r} lies outside the transformer blocks ({run.blocks.prefix}); "
            "streaming compresses the blocks' layers: exclude it (exclude=)"
        )
    if run.plan is not None:
        check_plan(run.plan, run.config, {name: weight_shape(m) for name, m in targets.items()})
    run.targets = targets


def settings_of(run: Run, calibration: Calibration | None) -> dict[str, Any]:
    """What a resumed run must share with the partial one (not the world size: it does not
    change a byte)."""
    from lorq.stream.devices import dtype_name

    settings = {
        "format_version": FORMAT_VERSION,
        "source": run.source.fingerprint(),
        "config": run.config.to_dict(),
        "plan": run.plan.to_dict() if run.plan else None,
        "calibration": calibration_record(calibration),
        "sequential": run.sequential if calibration else None,
        "device": run.device.type,
        "dtype": dtype_name(run.dtype),
    }
    return json.loads(json.dumps(settings, default=str))  # as the manifest holds them
