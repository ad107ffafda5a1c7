"""Compression of a model's linear layers, in place: the data flow, top to bottom

    weights ─▶ (Fisher, H) ─▶ budget plan or uniform config ─▶ decompose each matrix ─▶ replace
    qa-lora:   weights ─▶ (H) ─▶ INT base Q (RTN, GPTQ, given) ─▶ QALoraLinear (qa_lora)

The statistics are what ``CompressConfig.weighting`` and ``rounding`` name: the Fisher
(``lorq.fisher``) and the layers' input second moments H = XᵀX/N (``lorq.hessian``), both from
the calibration token blocks, on the original model.

``compress`` works layer by layer: each dense weight is released as soon as its module is
replaced, so peak memory stays near the model's own size. A source layer held packed (a plain
QuantLinear, e.g. a GGUF's Q4_1 layer) is decoded to its dense W one at a time, when its turn
comes. Everything but the LoRA factors is frozen. The whole job — load, calibrate, plan,
compress, evaluate, metadata — is :func:`compress_model` below.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorq.budget import BudgetPlan, plan_budgets
from lorq.budget.cost import feasible_range, shape_bits
from lorq.budget.grid import candidate_grid
from lorq.config import JOB_STATISTICS, CompressConfig, uses_activations, uses_fisher
from lorq.data import TextConfig, load_blocks
from lorq.decompose import Decomposition, decompose
from lorq.decompose.common import Rounding
from lorq.evaluate import Measurement, evaluation_blocks, evaluation_summary, measure
from lorq.export.gguf import MIB, GGUFBudget, gguf_budget
from lorq.fisher import estimate_fisher
from lorq.hessian import Hessians, estimate_hessians
from lorq.io.native import set_model_meta
from lorq.layers import LayerStep, relative_error, targets_of
from lorq.models import DEFAULT_MODEL, LoadedModel, ModelSource, load_model, source_record
from lorq.nn import QuantLoraLinear
from lorq.nn.lora_linear import kaiming_uniform
from lorq.pack import check_embeddings, pack_embeddings, round_factors
from lorq.preflight import check_compress, check_plan
from lorq.progress import Progress, no_progress
from lorq.qa_lora import compress_qa_lora, gguf_base
from lorq.quant import QuantConfig, QuantizedTensor, as_config
from lorq.runtime import release_free_memory
from lorq.surgery import (
    DenseWeights,
    dense_weight,
    device_of,
    freeze_all_but_lora,
    set_module,
    shared_copy,
    weight_shape,
)


@dataclass(frozen=True)
class CompressResult:
    """A compressed model and what made it; ``lorq.save(result, dir)`` writes all of it.

    ``metadata``: what ``lorq.json`` records beyond the layers (source, compress config, plan,
    evaluation); it is also kept on the model (``lorq.io.native.model_meta``), so a model saved
    later still carries it. ``measurements``: the evaluation rows of :func:`compress_model`.
    """

    model: nn.Module
    config: CompressConfig
    plan: BudgetPlan | None
    errors: dict[str, float]  # unweighted ‖W − Q − s·B·A‖ / ‖W‖ of every replaced matrix
    tokenizer: Any = None
    measurements: tuple[Measurement, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


def plain_decomposition(
    weight: torch.Tensor,
    quant: QuantConfig,
    config: CompressConfig,
    hessian: torch.Tensor | None = None,
) -> Decomposition:
    """Plain quantization (GPTQ or importance-weighted on ``hessian`` as ``config.rounding``
    says) with LoRA's own init: B = 0, A ~ Kaiming-uniform (seeded)."""
    dc = config.decompose_config(quant)
    q = Rounding(dc, hessian if config.rounds_with_h else None, weight.device)(weight, quant)
    lora_A = kaiming_uniform(config.rank, weight.shape[1], config.seed).to(weight.device)
    lora_B = torch.zeros(weight.shape[0], config.rank, device=weight.device)
    error = float(torch.linalg.vector_norm(weight - q.dequantize()))
    return Decomposition(q, lora_B, lora_A, dc.scaling, (error,), 0, dc)


def plan_budgets_for(
    model: nn.Module,
    config: CompressConfig,
    budgets: list[float],
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = no_progress,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> list[BudgetPlan]:
    """Plans of ``config``'s method, rank, weighting and targets at several budgets from one cost
    table; pass each to :func:`compress` as ``plan=`` with ``config.budget`` set to its budget.
    ``fisher`` / ``hessians``: the statistics ``config.weighting`` and ``rounding`` need."""
    weighting = config.cost_weighting
    needs_h = uses_activations(weighting) or config.cost_rounding != "nearest"
    return plan_budgets(
        DenseWeights(targets_of(model, config)),
        budgets,
        config.candidates,
        config.method,
        config.rank,
        fisher if uses_fisher(weighting) else None,
        iters=config.plan_iters,
        progress=progress,
        hessians=hessians if needs_h else None,
        weighting=weighting,
        rounding=config.cost_rounding,
    )


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
    """Replace the target linear layers of ``model`` (in place) by QuantLoraLinear layers, or by
    QALoraLinear layers for ``method="qa-lora"``.

    A Fisher weighting (``config.fisher``) needs either ``calibration`` token blocks
    (n × seq_len) to estimate the Fisher from, or a precomputed ``fisher`` ({module name:
    F (out × in)}, e.g. from :func:`lorq.fisher.estimate_fisher`, to share one estimate between
    several compressions). Activation weighting or GPTQ rounding (``config.activations``) needs
    ``calibration`` or precomputed ``hessians`` ({module name: H (in × in)}, e.g. from
    :func:`lorq.hessian.estimate_hessians`). ``base`` (qa-lora only):
    {module name: a precomputed INT QuantizedTensor (out × in)}, e.g. Q4_1 codes read from a GGUF
    file, used as Q as they are (with their own QuantConfig) instead of quantizing W.
    ``plan``: a precomputed budget plan (from :func:`lorq.budget.plan_budgets`, or ``lorq plan``)
    for ``config.budget``, instead of building its cost table again.
    """
    targets = targets_of(model, config)
    embeddings = check_embeddings(model, config)
    if config.method == "qa-lora" and plan is not None:
        raise ValueError("method='qa-lora' uses one uniform base config; it takes no plan")
    if config.budget_mb is not None:
        raise ValueError(
            "budget_mb= becomes bits/param in lorq.compress_model, which measures the GGUF files "
            "around the codes; here pass budget= (lorq.export.gguf.gguf_budget gives it)"
        )
    if base is not None and config.method != "qa-lora":
        raise ValueError(
            f"base= (a precomputed Q) is only used by method='qa-lora', not {config.method!r}"
        )
    fisher = _fisher(model, config, targets, calibration, progress, fisher)
    hessians = _hessians(model, config, targets, calibration, progress, hessians)
    if config.method == "qa-lora":
        errors = compress_qa_lora(model, config, targets, hessians or {}, progress, base)
        return _result(model, config, None, errors, embeddings)
    if plan is not None:
        check_plan(plan, config, {name: weight_shape(m) for name, m in targets.items()})
    elif config.budget is not None:
        (plan,) = plan_budgets_for(model, config, [config.budget], fisher, progress, hessians)
    errors = _decompose_layers(model, config, targets, plan, (fisher, hessians), progress)
    return _result(model, config, plan, errors, embeddings)


def _result(model, config, plan, errors, embeddings: QuantConfig | None) -> CompressResult:
    """Pack the embeddings if asked, freeze all but the factors, describe the result."""
    if embeddings is not None:
        pack_embeddings(model, embeddings)
    if config.factor_bits == 8:
        round_factors(model)
    freeze_all_but_lora(model)
    metadata = {"compress": config.to_dict(), "plan": plan.to_dict() if plan else None}
    set_model_meta(model, metadata)
    return CompressResult(model, config, plan, errors, metadata=metadata)


def _decompose_layers(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    plan: BudgetPlan | None,
    statistics: tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None],
    progress: Progress,
) -> dict[str, float]:
    """Every target → QuantLoraLinear, in place; returns ‖W − Q − s·B·A‖ / ‖W‖ per target.
    ``statistics``: (Fisher, H) by target name, entries dropped as their layers are done."""
    fisher, hessians = statistics
    errors = {}
    step = LayerStep(progress, f"decomposing ({config.method}, r={config.rank})", len(targets))
    for name, module in targets.items():
        quant = plan.config_of(name) if plan else as_config(config.quant or "nf4")
        weight = dense_weight(module).float()
        scores = fisher.pop(name, None) if fisher else None
        hessian = hessians.pop(name, None) if hessians else None
        scores = scores if uses_fisher(config.weighting) else None  # the plan's only
        hessian = hessian if uses_activations(config.weighting) or config.rounds_with_h else None
        if config.method == "plain":
            d = plain_decomposition(weight, quant, config, hessian)
        else:
            d = decompose(weight, config.decompose_config(quant), scores, hessian)
        layer = QuantLoraLinear.from_decomposition(d, getattr(module, "bias", None))
        set_module(model, name, layer.to(device_of(module)))
        errors[name] = relative_error(weight, d.reconstruct())
        del weight, module
        step()
    return errors


def _fisher(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor | None,
    progress: Progress,
    fisher: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    if not config.fisher:
        return None
    if fisher is not None:
        return dict(fisher)  # entries are dropped as layers are done; the caller's stays whole
    if calibration is None:
        raise ValueError(
            f"weighting={config.weighting!r} needs calibration token blocks (or a precomputed "
            "fisher)"
        )
    return estimate_fisher(model, calibration, targets, progress)


def _hessians(
    model: nn.Module,
    config: CompressConfig,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor | None,
    progress: Progress,
    hessians: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    if not config.activations:
        return None
    if hessians is not None:  # entries are dropped as layers are done; the caller's stays whole
        return hessians.copy() if isinstance(hessians, Hessians) else dict(hessians)
    if calibration is None:
        raise ValueError(
            f"weighting={config.weighting!r}, rounding={config.rounding!r} needs calibration "
            "token blocks (or precomputed hessians) for the layers' input statistics"
        )
    return estimate_hessians(model, calibration, targets, progress)


CALIBRATION_SEQ_LEN = 128  # tokens per calibration sequence (Fisher, GPTQ Hessians)
CALIBRATION_BLOCKS = 64  # calibration sequences (docs/algorithms.md §4)


@dataclass(frozen=True)
class Calibration:
    """Calibration text for the Fisher and GPTQ: ``source`` (builtin, a .txt / .jsonl file or
    ``hf:NAME``) cut into ``blocks`` sequences of ``seq_len`` tokens."""

    source: str = "builtin"
    seq_len: int = CALIBRATION_SEQ_LEN
    blocks: int = CALIBRATION_BLOCKS

    def __post_init__(self) -> None:
        TextConfig(self.source, self.seq_len, self.blocks)  # validates

    def load(self, tokenizer: Any) -> torch.Tensor:
        config = TextConfig(self.source, self.seq_len, self.blocks)
        return load_blocks(tokenizer, config, "calibration")


def compress_model(
    model: str | nn.Module | LoadedModel = DEFAULT_MODEL,
    config: CompressConfig | None = None,
    *,
    tokenizer: Any = None,
    calibration: Calibration | str = "builtin",
    eval_blocks: int = 16,
    baseline: bool = True,
    plan: BudgetPlan | None = None,
    gguf_codes: bool = True,
    progress: Progress = no_progress,
) -> CompressResult:
    """The whole ``lorq compress`` job: load, calibrate, plan, compress, evaluate, describe.

    ``model``: a built-in name, a local folder or ``.gguf`` file, a hub id, a
    :class:`~lorq.models.LoadedModel` or a loaded model (then pass its ``tokenizer``; it is
    compressed in place). ``config`` defaults to the job's statistics (``JOB_STATISTICS``:
    activation weighting). ``calibration``: the text for the Fisher and the layers' input
    statistics H, when ``config`` needs them (loaded before any work). ``eval_blocks`` blocks of
    256 evaluation tokens measure the original,
    plain quantization at the same bits (``baseline``, for lq / loftq) and the result (0: no
    evaluation). ``plan``: a budget plan made beforehand for ``config.budget``. ``gguf_codes``:
    QA-LoRA on a GGUF source whose codes are already in ``config.quant`` keeps them as the base.
    ``config.budget_mb`` (the MiB of what ``lorq export --format gguf`` will write, with
    ``candidates="gguf"``) becomes bits/param by :func:`lorq.export.gguf.gguf_budget` on the loaded
    model. The result's metadata names the source, the config, the plan, the evaluation (and the
    MiB budget);
    ``lorq.save(result, dir)`` writes what ``lorq compress`` writes.
    """
    config = config or CompressConfig(**JOB_STATISTICS)
    calibration = Calibration(calibration) if isinstance(calibration, str) else calibration
    if plan is not None:
        check_plan(plan, config)
    loaded = _loaded(model, tokenizer, config, plan)
    config, budget = _megabyte_budget(loaded, config)
    targets = targets_of(loaded.model, config)
    if plan is not None:
        check_plan(plan, config, {name: weight_shape(m) for name, m in targets.items()})
    text = Evaluation(loaded.tokenizer, eval_blocks)
    blocks = calibration.load(loaded.tokenizer) if config.fisher or config.activations else None
    rows = text.measure(loaded.model, None, "original", progress, quantized=False)
    fisher, hessians = _job_statistics(loaded.model, config, targets, blocks, progress)
    if baseline and config.method in ("lq", "loftq"):
        rows += _baseline(loaded.model, config, text, (fisher, hessians), progress)
    base = _qa_base(loaded, config, targets) if gguf_codes else None
    original = loaded.model
    work = original if isinstance(model, nn.Module) else shared_copy(original)
    result = compress(work, config, None, progress, fisher, base, plan, hessians)
    del fisher, hessians
    release_free_memory()
    reference = None if work is original else original
    rows += text.measure(result.model, reference, _label(config, base is not None), progress)
    used = calibration if config.fisher or config.activations else None
    return _described(result, loaded, rows, used, budget)


def plan_model(
    model: str | nn.Module | LoadedModel,
    config: CompressConfig,
    *,
    tokenizer: Any = None,
    calibration: Calibration | str = "builtin",
    progress: Progress = no_progress,
) -> BudgetPlan:
    """The ``lorq plan`` job: ``config.budget``'s plan of ``model``'s targets (costs weighted by
    ``config.weighting``, its statistics estimated on ``calibration``); ``config.budget_mb`` as
    for :func:`compress_model`."""
    if not config.budgeted:
        raise ValueError("plan_model needs config.budget (bits/param) or budget_mb (MiB)")
    calibration = Calibration(calibration) if isinstance(calibration, str) else calibration
    loaded = _loaded(model, tokenizer, config)
    config, _ = _megabyte_budget(loaded, config)
    targets = targets_of(loaded.model, config)
    blocks = calibration.load(loaded.tokenizer) if config.fisher or config.activations else None
    fisher, hessians = _job_statistics(loaded.model, config, targets, blocks, progress)
    (plan,) = plan_budgets_for(loaded.model, config, [config.budget], fisher, progress, hessians)
    return plan


def _megabyte_budget(loaded: LoadedModel, config: CompressConfig):
    """(config with ``budget_mb`` turned into bits/param, its GGUFBudget); (config, None)
    without a budget in MiB."""
    if config.budget_mb is None:
        return config, None
    shapes = {name: weight_shape(m) for name, m in targets_of(loaded.model, config).items()}
    source = loaded.source
    gguf = Path(source.path) / source.gguf_file if source.gguf_file else None
    embeddings = as_config(config.embeddings) if config.embeddings is not None else None
    budget = gguf_budget(
        loaded.model, shapes, config.budget_mb, config.rank, embeddings=embeddings,
        tokenizer=loaded.tokenizer, source=gguf,
    )  # fmt: skip
    return replace(config, budget=_feasible_bits(budget, config, shapes), budget_mb=None), budget


def _feasible_bits(budget: GGUFBudget, config: CompressConfig, shapes) -> float:
    """The budget's bits/param, at most what the largest candidates take; ValueError in MiB when
    even the smallest do not fit."""
    grid = candidate_grid(config.candidates)
    bits = np.array([shape_bits(name, shape, grid) for name, shape in shapes.items()])
    low, high = feasible_range(bits, np.array([o * i for o, i in shapes.values()], np.int64))
    if budget.bits < low:
        other = (budget.base_bytes + budget.adapter_bytes) / MIB
        raise ValueError(
            f"budget_mb={budget.megabytes:g} leaves {budget.bits:.3f} bits/param for the "
            f"quantized layers after {other:.1f} MiB of other bytes (metadata, embeddings, norms, "
            f"the rank-{config.rank} adapter); the candidates need at least {low:.3f}: give at "
            f"least {budget.megabytes_for(low):.1f} MiB, or pack the embeddings (embeddings=)"
        )
    return min(budget.bits, high)


def _job_statistics(model, config, targets, blocks: torch.Tensor | None, progress):
    """(Fisher, H) of the targets on the calibration ``blocks`` (loaded before any work, so a bad
    calibration file fails first), each None when ``config`` needs none."""
    if blocks is None:
        return None, None
    fisher = estimate_fisher(model, blocks, targets, progress) if config.fisher else None
    return fisher, _hessians(model, config, targets, blocks, progress, None)


@dataclass(frozen=True)
class Evaluation:
    """The evaluation token blocks of one job (cut when first needed) and its rows."""

    tokenizer: Any
    eval_blocks: int

    @functools.cached_property
    def blocks(self) -> torch.Tensor | None:
        if self.eval_blocks <= 0:
            return None
        return evaluation_blocks(self.tokenizer, self.eval_blocks)

    def measure(self, model, reference, label, progress, quantized=True) -> list[Measurement]:
        """One row for ``model`` (none when evaluation is off)."""
        if self.blocks is None:
            return []
        return [measure(model, self.blocks, reference, label, progress, quantized)]


def _loaded(
    model: str | nn.Module | LoadedModel,
    tokenizer: Any,
    config: CompressConfig,
    plan: BudgetPlan | None = None,
) -> LoadedModel:
    """The model to work on; a name or path is checked (:func:`check_compress`), then loaded."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a loaded model (for calibration and evaluation)")
        return LoadedModel(model, tokenizer, ModelSource(type(model).__name__, ""))
    if not isinstance(model, str):
        raise ValueError(f"model={model!r} is not supported; pass a name, path or loaded model")
    check_compress(model, config, plan)
    return load_model(model, packed=not config.fisher)


def _baseline(model, config, text: Evaluation, statistics, progress) -> list[Measurement]:
    """Plain round-to-nearest quantization at the same bits (the same plan's budget, costs
    weighted alike), measured."""
    if text.blocks is None:
        return []
    plain = replace(config, method="plain", iters=None, rounding="nearest")
    fisher, hessians = statistics
    hessians = hessians if plain.activations else None
    result = compress(shared_copy(model), plain, None, progress, fisher, hessians=hessians)
    release_free_memory()
    weighting = config.cost_weighting
    planned = f", {weighting} plan" if weighting != "none" and config.budget else ""
    return text.measure(
        result.model, model, f"plain NF ({_quant_label(config)}{planned})", progress
    )


def _qa_base(loaded: LoadedModel, config: CompressConfig, targets) -> dict | None:
    """QA-LoRA from a GGUF source: the file's own codes as the base, where they are ``quant``."""
    source = loaded.source
    if config.method != "qa-lora" or config.quant is None or not source.gguf_file:
        return None
    return gguf_base(targets, as_config(config.quant), Path(source.path) / source.gguf_file)


def _quant_label(config: CompressConfig) -> str:
    if config.quant is None:
        return f"{config.budget} bits"
    return config.quant if isinstance(config.quant, str) else config.quant.name


WEIGHTING_TAGS = {"none": "", "fisher": " +Fisher", "activations": " +act", "both": " +act+Fisher"}


def _label(config: CompressConfig, gguf_codes: bool) -> str:
    label = f"lorq {config.method} r={config.rank}" + WEIGHTING_TAGS[config.weighting]
    details = _quant_label(config) + (", GPTQ" if config.gptq else "")
    if config.plan_weighting and config.plan_weighting != config.weighting:
        details += f", {config.plan_weighting} plan"
    return label + f" ({details}{', GGUF codes' if gguf_codes else ''})"


def _described(
    result: CompressResult,
    loaded: LoadedModel,
    rows: list[Measurement],
    calibration: Calibration | None,
    budget: GGUFBudget | None = None,
) -> CompressResult:
    """``result`` with the tokenizer, the rows and the metadata of the whole job (the
    calibration text when statistics came from it, the MiB budget when one was given)."""
    source = loaded.source
    metadata = {
        "source": {**source_record(source)},
        **result.metadata,
        "calibration": dataclasses.asdict(calibration) if calibration else None,
        "evaluation": evaluation_summary(rows),
        **({"gguf_budget": budget.to_dict()} if budget else {}),
    }
    set_model_meta(result.model, metadata)
    return replace(result, tokenizer=loaded.tokenizer, measurements=tuple(rows), metadata=metadata)
