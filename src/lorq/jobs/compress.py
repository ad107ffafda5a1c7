"""The compress and plan jobs, top to bottom:

    check (config.json / GGUF metadata only) ─▶ source ─▶ the pipeline (one loop over blocks)
        ─▶ sink: the model in memory, or a sharded lorq directory written as it goes
        ─▶ evaluation: the original, plain quantization at the same formats, the result

``compress_model`` is the only compress job: a model in memory, a safetensors checkpoint or a
GGUF file, into memory or into a directory, on any device and number of processes, give the
same bytes. ``compress`` is the same pipeline on a model in memory, compressed in place, without
evaluation; ``plan_model`` stops after the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorq.budget import BudgetPlan
from lorq.calibrate.tokens import Calibration
from lorq.config import JOB_STATISTICS, CompressConfig
from lorq.io.models import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelSource,
    is_causal,
    load_model,
    load_tokenizer,
    resolve,
    source_config,
)
from lorq.jobs.compress_run import CompressRun
from lorq.jobs.result import CompressResult
from lorq.model.targets import shared_copy
from lorq.pipeline import Given, ResidentSource, Where, plan_pipeline, run_pipeline
from lorq.pipeline.budget_mb import megabyte_budget
from lorq.pipeline.guards import (
    check_compress,
    check_run,
    check_text,
    check_where,
    require_tokenizer,
    text_needs,
)
from lorq.pipeline.sources import CheckpointSource, GGUFSource, Source
from lorq.quant import QuantizedTensor
from lorq.util.progress import Progress, no_progress


def compress(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None = None,
    progress: Progress = no_progress,
    fisher: Mapping[str, torch.Tensor] | None = None,
    base: Mapping[str, QuantizedTensor] | None = None,
    plan: BudgetPlan | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> CompressResult:
    """Replace the target linear layers of ``model`` (in place) by QuantLoraLinear layers, or
    QALoraLinear layers for ``method="qa-lora"``: the pipeline on a model in memory.

    ``calibration``: token ids (n × seq_len) for the statistics the config needs (H, Fisher);
    ``fisher`` ({name: F (out × in)}) / ``hessians`` ({name: H (in × in)}) computed beforehand
    are used as they are instead (they are the original model's: no block-sequential
    statistics). ``base`` (qa-lora): {name: a precomputed INT QuantizedTensor} used as Q.
    ``plan``: a budget plan for ``config.budget`` made beforehand.
    """
    if config.budget_mb is not None:
        raise ValueError(
            "budget_mb= becomes bits/param in lorq.compress_model, which measures the GGUF files "
            "around the codes; here pass budget= (lorq.exporters.gguf.gguf_budget gives it)"
        )
    source = ResidentSource(model, ModelSource(type(model).__name__, ""))
    given = Given(fisher, hessians, base)
    check_run(source.model, config, plan, given)
    text = Calibration.of(calibration) if calibration is not None else None
    outcome = run_pipeline(
        source, config, plan=plan, calibration=text, given=given, progress=progress,
        where=Where(device=_device_of(model)),
    )  # fmt: skip
    return CompressResult(model, config, outcome.plan, outcome.errors, metadata=outcome.metadata)


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def compress_model(
    model: str | nn.Module | LoadedModel = DEFAULT_MODEL,
    config: CompressConfig | None = None,
    out: str | Path | None = None,
    *,
    tokenizer: Any = None,
    calibration: Calibration | str | torch.Tensor | None = "builtin",
    eval_blocks: int = 16,
    baseline: bool = True,
    plan: BudgetPlan | None = None,
    progress: Progress = no_progress,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    resume: bool = False,
    overwrite: bool = False,
    offload_activations: bool | None = None,
    allow_pickle: bool = False,
    on_statistics: Any = None,
) -> CompressResult:
    """The whole ``lorq compress`` job: check, compress block by block, evaluate, describe.

    ``model``: a built-in name, a local folder or ``.gguf`` file, a hub id, a
    :class:`~lorq.io.models.LoadedModel` or a loaded model (then pass its ``tokenizer``; it is
    compressed in place). ``out``: None keeps the result in memory (``lorq.save`` writes it);
    a directory is written shard by shard as each block finishes (never holding the model:
    for checkpoints larger than memory; ``resume`` finishes a killed run, ``overwrite``
    replaces one). Either way the tensors are the same.
    ``config`` defaults to the job's statistics (``JOB_STATISTICS``). ``calibration``: the text
    (or token ids) of the statistics. ``eval_blocks`` blocks of 256 evaluation tokens measure
    the original, plain round-to-nearest quantization in the same formats (``baseline``, for
    lq / loftq) and the result (0: none). ``plan``: a budget plan made beforehand.
    ``device`` / ``dtype``: where the blocks run and in what dtype (fp32 unless given);
    ``offload_activations``: the calibration activations in a disk file (None: when large).
    ``config.budget_mb`` (with ``candidates="gguf"``) becomes bits/param first.
    """
    config = config or CompressConfig(**JOB_STATISTICS)
    calibration = Calibration.of(calibration) if calibration is not None else None
    check_where(device, dtype, out, resume)
    if isinstance(model, str):
        check_compress(model, config, plan, allow_pickle, calibration)
        tokenizer = check_text(model, config, calibration, eval_blocks, tokenizer)
    loaded, source = _opened(model, tokenizer, config, out, allow_pickle)
    tokenizer = job_tokenizer(tokenizer, loaded, source)
    needs = text_needs(config, calibration, eval_blocks)
    require_tokenizer(tokenizer, needs, source.origin.name)
    if loaded is not None:
        loaded = replace(loaded, model=shared_copy(loaded.model))  # the original, kept whole
    config, budget = megabyte_budget(source, config, tokenizer)
    check_run(source.model, config, plan, Given())
    if calibration is not None and config.calibrated:
        calibration = calibration.cut(tokenizer)  # before any work: a bad text fails first
    job = CompressRun(
        source, config, calibration, tokenizer, Where(device, dtype, offload_activations)
    )
    job.progress, job.options = progress, (eval_blocks, baseline)
    if out is None:
        return job.in_memory(loaded, plan, budget)
    written = dict(out=out, resume=resume, overwrite=overwrite, on_statistics=on_statistics)
    return job.written(plan, budget, written)


def _opened(model, tokenizer, config: CompressConfig, out, allow_pickle: bool):
    """(the loaded model or None, the source to compress): a model in memory is compressed in
    place; without ``out`` a name is loaded (a GGUF packed) and its copy compressed; with
    ``out`` a name is read part by part."""
    if isinstance(model, LoadedModel):
        return model, ResidentSource(shared_copy(model.model), model.source)
    if isinstance(model, nn.Module):
        loaded = LoadedModel(model, None, ModelSource(type(model).__name__, ""))
        return loaded, ResidentSource(model, loaded.source)
    if not isinstance(model, str):
        raise ValueError(f"model={model!r} is not supported; pass a name, path or loaded model")
    if out is None:
        wanted = None if tokenizer is None else False  # given, or the model's own when it has one
        loaded = load_model(model, with_tokenizer=wanted, packed=True, allow_pickle=allow_pickle)
        return loaded, ResidentSource(loaded.model, loaded.source)
    return None, streamed_source(model)


def streamed_source(name: str) -> Source:
    """The source of ``name`` read part by part: its GGUF file, or its safetensors checkpoint (a
    local folder, or a hub id from the cache, downloaded first when the hub answers)."""
    from lorq.io.hub import hub_folder
    from lorq.io.models import check_no_foreign_code

    origin = resolve(name)
    if origin.gguf_file:
        return GGUFSource(origin, source_config(origin))
    folder = Path(origin.path) if Path(origin.path).is_dir() else hub_folder(name)
    origin = ModelSource(origin.name, str(folder))
    check_no_foreign_code(origin)
    config = source_config(origin)
    return CheckpointSource(origin, folder, config, is_causal(config))


def job_tokenizer(given: Any, loaded: LoadedModel | None, source: Source):
    """The job's tokenizer: the one given (or a folder holding one), the loaded model's, the
    source's own when it has one; None without any."""
    if isinstance(given, (str, Path)):
        return load_tokenizer(str(given))
    if given is not None:
        return given
    if loaded is not None and loaded.tokenizer is not None:
        return loaded.tokenizer
    return load_tokenizer(source.origin, required=False) if source.origin.path else None


def plan_model(
    model: str | nn.Module | LoadedModel,
    config: CompressConfig,
    *,
    tokenizer: Any = None,
    calibration: Calibration | str | torch.Tensor = "builtin",
    progress: Progress = no_progress,
    device: str = "auto",
    stream: bool = False,
) -> BudgetPlan:
    """The ``lorq plan`` job: ``config.budget``'s plan of ``model``'s targets — the pipeline's
    plan pass alone (``stream``: the model read part by part, for one larger than memory)."""
    if not config.budgeted:
        raise ValueError("plan_model needs config.budget (bits/param) or budget_mb (MiB)")
    calibration = Calibration.of(calibration)
    if isinstance(model, str):
        check_compress(model, config, None, False, calibration)
    loaded, source = _opened(model, tokenizer, config, "stream" if stream else None, False)
    tokenizer = job_tokenizer(tokenizer, loaded, source)
    require_tokenizer(tokenizer, text_needs(config, calibration, 0), source.origin.name)
    config, _ = megabyte_budget(source, config, tokenizer)
    check_run(source.model, config, None, Given())
    text = calibration if config.activations or config.fisher else None
    where = Where(device)
    (plan,) = plan_pipeline(
        source, config, calibration=text, tokenizer=tokenizer, where=where, progress=progress
    )
    return plan


def plan_budgets_for(
    model: nn.Module,
    config: CompressConfig,
    budgets: list[float],
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = no_progress,
    hessians: Mapping[str, torch.Tensor] | None = None,
    calibration: torch.Tensor | None = None,
) -> list[BudgetPlan]:
    """Plans of ``config``'s method, rank, weighting and targets of ``model`` (in memory) at
    several budgets from one cost table; pass each to :func:`compress` as ``plan=`` with
    ``config.budget`` set to its budget. The statistics the costs need: ``fisher`` /
    ``hessians`` computed beforehand, or ``calibration`` token ids to collect them."""
    source = ResidentSource(model, ModelSource(type(model).__name__, ""))
    config = replace(config, budget=config.budget or budgets[0], quant=None)
    text = Calibration.of(calibration) if calibration is not None else None
    where = Where(device=_device_of(model))
    return plan_pipeline(
        source, config, calibration=text, progress=progress, budgets=budgets,
        given=Given(fisher, hessians), where=where,
    )  # fmt: skip
