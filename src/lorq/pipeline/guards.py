"""Checks before work: what a job can learn from a model's config alone, before loading it.

    config.json / GGUF metadata ─▶ the architecture on the meta device (no weight is read)
        ─▶ target matrices and their shapes ─▶ rank, formats, budget feasibility, plan

A job that fails here has spent a second, not the minutes of loading, calibrating and
evaluating a model. A hub id that is not in the local cache is checked after loading instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lorq.budget import BudgetPlan
from lorq.budget.choices import plan_choices
from lorq.budget.cost import rows_bits
from lorq.budget.ilp import check_budget
from lorq.calibrate.sensitivity import SENSITIVITY_SEQUENCES
from lorq.calibrate.tokens import Calibration
from lorq.config import CompressConfig
from lorq.io.models import (
    ModelSource,
    check_files,
    check_no_pickle,
    is_causal,
    resolve,
    source_config,
    unusable_as_value_error,
)
from lorq.model.packing import check_embeddings, input_embedding, table_shape
from lorq.model.skeleton import decoder_blocks, skeleton
from lorq.model.targets import targets_of, weight_shape
from lorq.nn.qa_lora_linear import check_qa_base
from lorq.nn.scales import check_memory, training_bytes
from lorq.pipeline import devices
from lorq.quant import QuantConfig, as_config, format_of

Shapes = dict[str, tuple[int, int]]
MAX_LISTED = 5  # names quoted in an error message


def skeleton_of(source: ModelSource) -> nn.Module | None:
    """``source``'s architecture on the meta device; None when its config is not on this machine."""
    try:
        with unusable_as_value_error(source.name):
            config = source_config(source)
    except OSError:
        return None
    return skeleton(config, bool(source.gguf_file) or is_causal(config))


def _bits(quant: QuantConfig, shape: tuple[int, int]) -> float:
    fmt = format_of(quant)
    fmt.check_shape(quant, shape)
    return 8.0 * fmt.nbytes(quant, shape)


def planned_table(model: nn.Module, config: CompressConfig) -> Shapes:
    """{name: (vocab, dim)} of the token embedding when the plan chooses its format, else {}."""
    if not config.plan_embeddings:
        return {}
    name, table = input_embedding(model)
    return {name: table_shape(table)}


def check_planned_embedding(plan: BudgetPlan, model: nn.Module) -> None:
    """A plan's token embedding entry must be this model's table, of its shape."""
    entry = plan.embedding_entry
    if entry is None:
        return
    name, table = input_embedding(model)
    if (name, table_shape(table)) != (entry.name, tuple(entry.shape)):
        raise ValueError(
            f"the plan's token embedding {entry.name} {tuple(entry.shape)} is not this model's "
            f"({name} {table_shape(table)}); make the plan for this model"
        )


def check_shapes(config: CompressConfig, shapes: Shapes, table: Shapes | None = None) -> None:
    """Rank below every matrix's sides; the uniform format fits every matrix, or the budget lies
    in the range the candidates can reach (with ``table``, the planned token embedding's row
    counted too)."""
    smallest = min(shapes.items(), key=lambda item: min(item[1]))
    if (
        config.method in ("lq", "loftq")
        and not config.plans_adapters
        and config.rank >= min(smallest[1])
    ):
        raise ValueError(
            f"rank={config.rank} must be smaller than min(out, in) = {min(smallest[1])} of "
            f"{smallest[0]} {smallest[1]}; choose a smaller rank"
        )
    if not config.budgeted:
        quant = config.quant_config
        for name, shape in shapes.items():
            try:
                _bits(quant, shape)
                if config.method == "qa-lora":
                    check_qa_base(quant, shape)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        _check_rounding(config, [quant])
        return
    grid = plan_choices(config)
    _check_rounding(config, grid.quants)
    bits, numels = rows_bits(shapes, table or {}, grid)
    if config.budget is not None:  # a budget in MiB is checked once the model is loaded
        check_budget(bits, numels, config.budget)


def _check_rounding(config: CompressConfig, quants) -> None:
    """GPTQ rounding needs a GPTQ grid in every format it may round to, importance-weighted
    rounding an importance-weighted search."""
    roundings = {config.rounding, config.cost_rounding if config.budgeted else "nearest"}
    for quant in quants:
        if "gptq" in roundings:
            format_of(quant).check_gptq(quant)
        if "weighted" in roundings:
            format_of(quant).check_weighted(quant)


def check_plan(
    plan: BudgetPlan, config: CompressConfig, shapes: Mapping[str, tuple] | None = None
) -> None:
    """A given plan must be for this budget, method, rank and (when given, {name: (out, in)})
    these target matrices."""
    if config.budget != plan.budget or config.method != plan.method:
        raise ValueError(
            f"the plan is for method {plan.method!r} at {plan.budget} bits/param, not "
            f"{config.method!r} at {config.budget}; make a plan with these settings (lorq plan)"
        )
    if config.method != "plain" and not plan.adapters_planned and plan.rank != config.rank:
        raise ValueError(f"the plan was made for rank {plan.rank}, not {config.rank}")
    if shapes is None:
        return
    planned = {e.name: e.shape for e in plan.matrices}
    if planned != {name: tuple(shape) for name, shape in shapes.items()}:
        missing = sorted(set(shapes) ^ set(planned))[:MAX_LISTED]
        raise ValueError(
            "the plan's matrices are not this model's targets "
            f"(e.g. {missing or 'a shape differs'}); make the plan for this model and targets"
        )


def check_compress(
    model: str,
    config: CompressConfig,
    plan: BudgetPlan | None = None,
    allow_pickle: bool = False,
    calibration: Any = None,
) -> None:
    """Everything about compressing ``model`` (a name, folder, .gguf file or hub id) with
    ``config`` (and ``plan``) that its config alone decides; ValueError naming the problem."""
    source = resolve(model)
    check_no_pickle(source, allow_pickle)
    check_files(source)
    architecture = skeleton_of(source)
    if architecture is None:
        return
    targets = targets_of(architecture, config)
    shapes = {name: weight_shape(module) for name, module in targets.items()}
    check_embeddings(architecture, config)
    if plan is not None:
        check_plan(plan, config, shapes)
        check_planned_embedding(plan, architecture)
        _check_rounding(config, [entry.config for entry in plan.matrices])
    else:
        check_shapes(config, shapes, planned_table(architecture, config))
    check_recovery_memory(architecture, config, shapes)
    if plan is None:
        probed = len(shapes) + config.plan_embeddings  # the token embedding's probe too
        check_sensitivity_memory(architecture, config, probed, calibration)


def check_recovery_memory(architecture: nn.Module, config: CompressConfig, shapes: Shapes) -> None:
    """Block-wise recovery of the stored scales holds, for the block it trains, a float32 basis
    per scale (two at most a format) and each layer's dense Q with its gradient: refused before
    any work when the largest block's exceeds the free memory."""
    if config.recover != "block" or not config.recover_scales:
        return
    blocks, sizes = decoder_blocks(architecture), defaultdict(int)
    for name, (rows, columns) in shapes.items():
        index = blocks.index_of(name)
        if index is not None:
            sizes[index] += rows * columns
    need = training_bytes([(max(sizes.values(), default=0), 2)])
    instead = "use --no-recover-scales"
    check_memory(need, devices.available_memory(), "block-wise recovery of the scales", instead)


def sensitivity_bytes(architecture: nn.Module, targets: int, calibration: Any) -> int:
    """What a KL plan's probes hold (``lorq.calibrate.sensitivity``): every target's hidden
    states on S sequences (targets × S × L × d) and two outputs (logits: S × L × V), float32."""
    text = Calibration.of(calibration if calibration is not None else "builtin")
    rows, length = (text.blocks, text.seq_len) if text.tokens is None else text.tokens.shape
    tokens = min(rows, SENSITIVITY_SEQUENCES) * length
    hf = architecture.config
    width, vocab = getattr(hf, "hidden_size", 0) or 0, getattr(hf, "vocab_size", 0) or 0
    return 4 * tokens * (targets * width + 2 * vocab)


def check_sensitivity_memory(
    architecture: nn.Module, config: CompressConfig, targets: int, calibration: Any
) -> None:
    """A new KL plan is refused before any work when its probes would not fit the free memory."""
    if not config.budgeted or config.cost_weighting != "kl":
        return
    need, free = sensitivity_bytes(architecture, targets, calibration), devices.available_memory()
    if need > free:
        raise ValueError(
            f"the KL plan's sensitivity probes hold about {need / 1e9:.1f} GB (each target's "
            f"hidden states on {SENSITIVITY_SEQUENCES} calibration sequences) and "
            f"{free / 1e9:.1f} GB is free; use --plan-weighting fisher, shorter calibration "
            "sequences (--seq-len), or a machine with more memory"
        )


def check_run(
    model: nn.Module, config: CompressConfig, plan: BudgetPlan | None, given: Any
) -> None:
    """What a run checks of the model it is given (resident or a skeleton) before any work:
    targets, embeddings, the plan against the targets, given bases and statistics."""
    targets = targets_of(model, config)
    check_embeddings(model, config)
    if config.method == "qa-lora" and given.base is None:
        for name, module in targets.items():
            try:
                check_qa_base(as_config(config.quant), weight_shape(module))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
    if plan is not None:
        if config.method == "qa-lora":
            raise ValueError("method='qa-lora' uses one uniform base config; it takes no plan")
        check_plan(plan, config, {name: weight_shape(m) for name, m in targets.items()})
        check_planned_embedding(plan, model)
    if given.base is not None:
        if config.method != "qa-lora":
            raise ValueError(
                f"base= (a precomputed Q) is only used by method='qa-lora', not {config.method!r}"
            )
        check_base(given.base, targets)


def check_base(base: Mapping[str, Any], targets: Mapping[str, nn.Module]) -> None:
    """``base`` must hold, per target name, a Q of the module's shape that can carry QA-LoRA."""
    unknown = sorted(set(base) - set(targets))
    if unknown:
        raise ValueError(
            f"base has entries for {unknown}, which are not targets of this compression; "
            "give one entry per target module name (see include / exclude)"
        )
    for name, q in base.items():
        shape = weight_shape(targets[name])
        if q.shape != shape:
            raise ValueError(
                f"base[{name!r}] has shape {q.shape} but the module's weight is {shape} "
                "(out × in); give a Q of the module's own shape"
            )
        check_qa_base(q.config, q.shape)


ASKED = "asked"


def write_as_you_go(model: str, asked: bool = False) -> str | None:
    """Why ``lorq compress`` writes ``model`` block by block into its output instead of holding
    it: ``ASKED`` (``asked``), or unasked because its weights in fp32 would take more than half
    of the free memory (counted on the architecture its config builds on the meta device).
    None: load it whole (the bytes are the same either way)."""
    if asked:
        return ASKED

    architecture = skeleton_of(resolve(model))
    if architecture is None:
        return None  # a hub id not on this machine: the load says what it is
    need = 4 * sum(p.numel() for p in architecture.parameters())
    free = devices.available_memory()
    if need > free // 2:
        return (
            f"its weights take {need / 1e9:.1f} GB in fp32, more than half of the "
            f"{free / 1e9:.1f} GB free"
        )
    return None


def text_needs(config: CompressConfig, calibration: Any, eval_blocks: int) -> list[str]:
    """What in a compress job needs the model's tokenizer (its text), as the options that ask
    for it; empty for, e.g., plain round-to-nearest without evaluation."""
    needs = []
    if config.calibrated and (calibration is None or calibration.needs_tokenizer):
        recovery = f" / recover={config.recover!r}" if config.recover != "none" else ""
        needs.append(
            f"the calibration text of weighting={config.weighting!r} / "
            f"rounding={config.rounding!r}{recovery} (--weighting, --rounding, --recover)"
        )
    if eval_blocks > 0:
        needs.append("the evaluation (eval_blocks; --eval-blocks 0 skips it)")
    return needs


def require_tokenizer(tokenizer: Any, needs: list[str], model: str) -> None:
    """ValueError naming what needs a tokenizer when there is none."""
    if tokenizer is None and needs:
        raise ValueError(
            f"{needs[0]} needs a tokenizer and {model!r} has none; give one (tokenizer=PATH, "
            "--tokenizer PATH: a folder with tokenizer files) or leave out what needs text"
        )


def check_where(device: Any, dtype: Any, out: Any, resume: bool) -> None:
    """The device, dtype and output options, before any work."""
    from lorq.pipeline.devices import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))
    if resume and out is None:
        raise ValueError(
            "resume=True (--resume) finishes a run written block by block into a directory; "
            "give out= (--out)"
        )


def check_text(
    model: str, config: CompressConfig, calibration: Any, eval_blocks: int, tokenizer: Any = None
) -> Any:
    """Before loading ``model``: a tokenizer when the job needs text (``text_needs``) — the one
    given (a folder path, or an object) or the model's own; returns it (None when no text is
    needed and the model has none)."""
    from lorq.io.models import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(str(tokenizer))
    source = resolve(model)
    if source.gguf_file is None and not Path(source.path).is_dir():
        return None  # a hub id: its tokenizer comes with it
    found = load_tokenizer(source, required=False)
    require_tokenizer(found, text_needs(config, calibration, eval_blocks), model)
    return found
