"""Verbs that make and inspect compressed models: compress, plan, eval, generate, reports.

Each verb maps its options onto one library call and prints what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorq._version import __version__
from lorq.cli.app import app, check_out_dir, console, errors, load_quietly, user_errors
from lorq.cli.tables import plan_tables, presets_table, quantize_report_table, results_table
from lorq.config import RECOVER_LR, RECOVER_SCALE_LR, RECOVER_STEPS, SEQUENTIAL
from lorq.io.models import DEFAULT_MODEL, resolve

DEFAULT_REPORT_PRESETS = ["nf4", "nf3", "nf2", "nf4-fp32-scales", "int4-g32", "int4-g64", "q4_1"]
ModelOption = Annotated[str, typer.Option(help="built-in name, local folder, .gguf file or hub id")]
CalibrationOption = Annotated[str, typer.Option(help="calibration text: builtin, file, hf:NAME")]
AllowPickleOption = Annotated[
    bool, typer.Option(help="load pickle-only weights (.bin) with torch's weights-only unpickler")
]
WeightingOption = Annotated[
    str | None,
    typer.Option(
        help="what the decomposition and plan minimise: none (weight error) | fisher | "
        "activations (layer output error on the calibration text) | both (default: activations)"
    ),
]
FisherOption = Annotated[bool, typer.Option(help="the same as --weighting fisher")]
PlanWeightingOption = Annotated[
    str | None,
    typer.Option(
        help="with --budget: another weighting for the plan's costs, or kl (output error × "
        "each matrix's measured KL sensitivity; default: fisher for a causal LM when "
        "--weighting is not given, else --weighting's)"
    ),
]
CandidatesOption = Annotated[
    str, typer.Option(help="ILP grid: default | full | int | gguf | preset names")
]
RoundingOption = Annotated[
    str | None,
    typer.Option(
        help="Q by round to nearest | weighted (llama.cpp's types: scales under the importance "
        "diag H, as with an imatrix) | gptq (on the calibration text); default: nearest"
    ),
]
CalibrationTokensOption = Annotated[
    int | None,
    typer.Option(help="calibration tokens (sequences of --seq-len; default 64 sequences)"),
]
SeqLenOption = Annotated[int, typer.Option(help="calibration sequence length")]
BudgetMbOption = Annotated[
    float | None,
    typer.Option(
        "--budget-mb",
        help="MiB (2^20 bytes) of what `lorq export --format gguf` writes (base + F16 adapter); "
        "mixed precision by ILP, e.g. with --candidates gguf",
    ),
]
EmbeddingsOption = Annotated[
    str | None, typer.Option(help="preset for the token embeddings (e.g. q8_0); default: kept")
]
GGUFCodesOption = Annotated[
    bool, typer.Option(help="qa-lora q4_1 from a GGUF: keep the file's own Q4_1 codes")
]
StreamOption = Annotated[
    bool,
    typer.Option(
        help="write each transformer block as it finishes into a sharded, resumable directory, "
        "never holding the model (chosen by itself for a model larger than half the free "
        "memory; the same bytes either way; torchrun for many processes)"
    ),
]
ResumeOption = Annotated[
    bool, typer.Option(help="finish the partial streamed run in --out (implies --stream)")
]
DeviceOption = Annotated[
    str, typer.Option(help="auto (the GPU when there is one) | cpu | cuda[:N]")
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        help="the loaded original's dtype: fp32 | bf16 | fp16 (default: "
        "bf16 on a GPU, fp32 on a CPU)"
    ),
]
OffloadOption = Annotated[
    bool | None,
    typer.Option(help="calibration activations in a disk file (default: when they are large)"),
]
RecoverOption = Annotated[
    str,
    typer.Option(
        help="none | block: after each block is decomposed, train its factors (and scales, "
        "--recover-scales) toward the original block's output on the calibration text"
    ),
]
RecoverStepsOption = Annotated[int, typer.Option(help="--recover block: Adam steps per block")]
RecoverLrOption = Annotated[float, typer.Option(help="--recover block: learning rate")]
CompressEvalOption = Annotated[int, typer.Option(help="evaluation blocks of 256 tokens (0: none)")]
RecoverScalesOption = Annotated[
    bool, typer.Option(help="--recover block: train the formats' stored scales too")
]
RecoverScaleLrOption = Annotated[
    float, typer.Option(help="--recover block: the scales' rate, in units of their mean")
]
TokenizerOption = Annotated[
    str | None,
    typer.Option(
        help="a folder with tokenizer files, for a model without its own (default: the model's)"
    ),
]
SequentialOption = Annotated[
    bool,
    typer.Option(
        help="each block's statistics on the outputs of the compressed earlier blocks "
        "(--no-sequential: of the original ones)"
    ),
]
FactorBitsOption = Annotated[
    int | None, typer.Option(help="8: store the low-rank factors in 8 bits (row-wise int8)")
]
PlanRanksOption = Annotated[
    str | None,
    typer.Option(
        help="with a budget: the ranks the plan chooses from per matrix, e.g. 0,8,16 (0: no "
        "adapter); the budget then counts the factors"
    ),
]
PlanFactorBitsOption = Annotated[
    str | None,
    typer.Option(help="with a budget: the factor precisions the plan chooses from: 16, 8 or 16,8"),
]
PlanEmbeddingsOption = Annotated[
    bool,
    typer.Option(
        help="with a budget and --plan-weighting kl: the plan chooses the token embedding's "
        "format too (its bits in the budget)"
    ),
]


def statistics_options(
    weighting: str | None,
    fisher: bool,
    rounding: str | None,
    gptq: bool = False,
    plan_weighting: str | None = None,
    new_plan: tuple[str, float | None] = ("", None),
) -> dict[str, str | None]:
    """CompressConfig fields from --weighting / --fisher, --rounding / --gptq (aliases) and
    --plan-weighting; ``new_plan``: (model, budget of a plan to make, or None)."""
    from lorq.config import JOB_STATISTICS

    if fisher and weighting not in (None, "fisher"):
        raise ValueError(f"--fisher is --weighting fisher; it contradicts --weighting {weighting}")
    if gptq and rounding not in (None, "gptq"):
        raise ValueError(f"--gptq is --rounding gptq; it contradicts --rounding {rounding}")
    weighting = "fisher" if fisher else weighting
    rounding = "gptq" if gptq else rounding
    plan_weighting = job_plan_weighting(*new_plan, weighting, plan_weighting)
    return {
        "weighting": weighting or JOB_STATISTICS["weighting"],
        "rounding": rounding or JOB_STATISTICS["rounding"],
        "plan_weighting": plan_weighting,
    }


def job_plan_weighting(
    model: str, budget: float | None, weighting: str | None, plan_weighting: str | None
) -> str | None:
    """The job's plan costs: Fisher-weighted for a new budget plan of a causal LM when no
    weighting is given (bench/README.md, "Activation-aware decomposition": Fisher costs with
    activation-weighted decompositions gave the lowest KL at 2.75 and 3.25 bits), else as given."""
    if plan_weighting is not None or weighting is not None or budget is None:
        return plan_weighting
    return "fisher" if causal_model(model) else None


def causal_model(model: str) -> bool:
    """Whether ``model`` is a causal LM (False when it cannot be read: the pre-work check
    reports what is wrong with it)."""
    from lorq.io.models import is_causal, resolve, source_config

    try:
        return is_causal(source_config(resolve(model)))
    except (ValueError, OSError):
        return False


def calibration_of(source: str, seq_len: int, tokens: int | None):
    from lorq.calibrate.tokens import CALIBRATION_BLOCKS, Calibration

    if tokens is not None and tokens <= 0:
        raise ValueError(f"--calibration-tokens {tokens} is not supported; allowed: > 0")
    blocks = CALIBRATION_BLOCKS if tokens is None else -(-tokens // seq_len)
    return Calibration(source, seq_len, blocks)


@app.command("quantize-report")
def quantize_report(
    model: ModelOption = DEFAULT_MODEL,
    preset: Annotated[
        list[str] | None, typer.Option("--preset", "-p", help="quantization preset (repeatable)")
    ] = None,
) -> None:
    """Bits/param actually stored and relative error ‖W−Q‖/‖W‖ over a model's linear layers."""
    from lorq.evaluation.measure import quantization_report
    from lorq.model.targets import DenseWeights, find_targets
    from lorq.quant import as_config

    with user_errors() as stage:
        configs = [as_config(name) for name in preset or DEFAULT_REPORT_PRESETS]
        weights = DenseWeights(find_targets(load_quietly(model, with_tokenizer=False).model))
        if not weights:
            raise ValueError(f"model {model!r} has no linear layers to quantize")
        rows = quantization_report(weights, configs, stage)
    console.print(quantize_report_table(model, len(weights), rows))


def _check_plan_target(path: Path) -> None:
    """Refuse to overwrite a file that is not a lorq plan, or a PNG beside it that is not ours."""
    from lorq.budget import BudgetPlan
    from lorq.cli.plots import is_png
    from lorq.util.atomic import check_output

    def is_plan(file: Path) -> bool:
        try:
            BudgetPlan.load(file)
            return True
        except (ValueError, OSError):
            return False

    png = path.with_suffix(".png")
    if png.exists() and not path.exists():
        raise ValueError(f"{png} exists; choose another --out")
    check_output(path, True, is_plan, "lorq plan", directory=False)
    check_output(png, True, is_png, "PNG", directory=False)


@app.command()
def plan(
    budget: Annotated[
        float | None, typer.Option(help="average bits per parameter of the quantized part")
    ] = None,
    budget_mb: BudgetMbOption = None,
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="lq | loftq | plain")] = "lq",
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    weighting: WeightingOption = None,
    fisher: FisherOption = False,
    rounding: RoundingOption = None,
    plan_weighting: PlanWeightingOption = None,
    candidates: CandidatesOption = "default",
    plan_ranks: PlanRanksOption = None,
    plan_factor_bits: PlanFactorBitsOption = None,
    plan_embeddings: PlanEmbeddingsOption = False,
    calibration: CalibrationOption = "builtin",
    seq_len: SeqLenOption = 128,
    calibration_tokens: CalibrationTokensOption = None,
    out: Annotated[Path, typer.Option(help="plan JSON (a PNG heatmap is written beside)")] = Path(
        "plan.json"
    ),
    allow_pickle: AllowPickleOption = False,
    stream: Annotated[
        bool, typer.Option(help="the cost table one block at a time (models larger than memory)")
    ] = False,
    device: DeviceOption = "auto",
    sequential: SequentialOption = SEQUENTIAL,
) -> None:
    """Choose bits per matrix under a budget (LQ-LoRA's integer linear program)."""
    from lorq.cli.plots import plan_heatmap
    from lorq.config import CompressConfig
    from lorq.jobs.compress import plan_model
    from lorq.pipeline.guards import check_compress

    with user_errors() as stage:
        if budget is None and budget_mb is None:
            raise ValueError("give --budget (bits/param) or --budget-mb (MiB of the GGUF files)")
        statistics = statistics_options(
            weighting, fisher, rounding, False, plan_weighting, (model, budget or budget_mb)
        )
        config = CompressConfig(method, **_flags(locals(), PLAN_FLAGS), **statistics)
        _check_plan_target(out)
        text = calibration_of(calibration, seq_len, calibration_tokens)
        check_compress(model, config, allow_pickle=allow_pickle, calibration=text)
        source = model if stream else loaded_for(model, config, allow_pickle)
        result = plan_model(
            source, config, calibration=text, progress=stage, device=device, stream=stream
        )
        result.save(out)
        plan_heatmap(result, out.with_suffix(".png"))
    for table in plan_tables(result):
        console.print(table)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")


def loaded_for(model: str, config, allow_pickle: bool):
    """The model as ``lorq plan`` needs it: with a tokenizer when it calibrates."""
    calibrated = config.fisher or config.activations
    return load_quietly(
        model, with_tokenizer=calibrated or None, packed=True, allow_pickle=allow_pickle
    )


def saved_plan(plan_file: Path | None, budget_mb: float | None):
    """The plan of ``--plan`` (None without one); a saved plan has its own budget."""
    from lorq.budget import BudgetPlan

    if plan_file is None:
        return None
    if budget_mb is not None:
        raise ValueError("give --plan or --budget-mb: a saved plan has its own budget")
    return BudgetPlan.load(plan_file)


@app.command()
def compress(
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="lq (LQ-LoRA) | loftq | plain | qa-lora")] = "lq",
    quant: Annotated[str | None, typer.Option(help="uniform preset (see `lorq presets`)")] = None,
    budget: Annotated[float | None, typer.Option(help="bits/param; mixed precision by ILP")] = None,
    budget_mb: BudgetMbOption = None,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="a plan from `lorq plan` (its budget, no new ILP)")
    ] = None,
    rank: Annotated[int, typer.Option(help="rank r of the low-rank part")] = 16,
    weighting: WeightingOption = None,
    fisher: FisherOption = False,
    rounding: RoundingOption = None,
    plan_weighting: PlanWeightingOption = None,
    candidates: CandidatesOption = "default",
    plan_ranks: PlanRanksOption = None,
    plan_factor_bits: PlanFactorBitsOption = None,
    plan_embeddings: PlanEmbeddingsOption = False,
    calibration: CalibrationOption = "builtin",
    seq_len: SeqLenOption = 128,
    calibration_tokens: CalibrationTokensOption = None,
    eval_blocks: CompressEvalOption = 16,
    baseline: Annotated[bool, typer.Option(help="also measure plain NF at the same bits")] = True,
    gptq: Annotated[bool, typer.Option(help="the same as --rounding gptq")] = False,
    embeddings: EmbeddingsOption = None,
    gguf_codes: GGUFCodesOption = True,
    factor_bits: FactorBitsOption = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("lorq-out"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing lorq directory")] = False,
    allow_pickle: AllowPickleOption = False,
    stream: StreamOption = False,
    resume: ResumeOption = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    offload_activations: OffloadOption = None,
    sequential: SequentialOption = SEQUENTIAL,
    tokenizer: TokenizerOption = None,
    recover: RecoverOption = "none",
    recover_steps: RecoverStepsOption = RECOVER_STEPS,
    recover_lr: RecoverLrOption = RECOVER_LR,
    recover_scales: RecoverScalesOption = True,
    recover_scale_lr: RecoverScaleLrOption = RECOVER_SCALE_LR,
) -> None:
    """Compress a model into quantized + low-rank layers, measure it against the original."""
    from lorq.config import CompressConfig
    from lorq.pipeline.guards import check_compress

    with user_errors() as stage:
        given, budget = plan_and_budget(plan_file, budget_mb, budget, quant)
        new_plan = (model, None if given else budget or budget_mb)
        statistics = statistics_options(weighting, fisher, rounding, gptq, plan_weighting, new_plan)
        fields = _flags(locals(), CONFIG_FLAGS)
        config = CompressConfig(method, quant, budget, candidates, rank, **statistics, **fields)
        text = calibration_of(calibration, seq_len, calibration_tokens)
        check_compress(model, config, given, allow_pickle, text)
        job = dict(_flags(locals(), JOB_FLAGS), calibration=text, plan=given, progress=stage)
        result = compress_job(model, config, out, job, stream or resume)
    print_compressed(result, model, out)


def _flags(values: dict, names: tuple[str, ...]) -> dict:
    """The entries of ``values`` (a command's locals) named in ``names``."""
    return {k: v for k, v in values.items() if k in names}


# the lorq compress options that are compress_job's options as they are
JOB_FLAGS = ("eval_blocks", "baseline", "device", "dtype", "allow_pickle", "resume", "overwrite",
             "offload_activations", "tokenizer")  # fmt: skip
# the lorq plan options that are CompressConfig fields as they are
PLAN_FLAGS = ("budget", "budget_mb", "rank", "candidates", "sequential", "plan_ranks",
              "plan_factor_bits", "plan_embeddings")  # fmt: skip
# the lorq compress options that are CompressConfig fields as they are
CONFIG_FLAGS = ("embeddings", "factor_bits", "budget_mb", "sequential", "gguf_codes", "recover",
                "recover_steps", "recover_lr", "recover_scales", "recover_scale_lr",
                "plan_ranks", "plan_factor_bits", "plan_embeddings")  # fmt: skip


def print_compressed(result, model: str, out: Path) -> None:
    """What ``lorq compress`` prints of its result."""
    if result.reused:
        kept, done = len(result.reused), len(result.computed)
        console.print(f"resumed: {kept} finished shards kept, {done} computed")
    recovery = result.metadata.get("recovery")
    if recovery:
        console.print(recovery_line(recovery))
    if result.measurements:
        table = results_table(f"{model} → {out}", result.measurements, resolve(model), out)
        console.print(table)
    console.print(f"saved to {out}")


def recovery_line(blocks: dict) -> str:
    """One line on a compress job's block-wise recovery: the blocks' summed output errors
    before and after, how many kept their training, which stopped on a non-finite loss."""
    before = sum(r["before"] for r in blocks.values())
    after = sum(r["after"] for r in blocks.values())
    kept = sum(r["kept"] for r in blocks.values())
    line = f"block-wise recovery: summed block loss {before:.4g} → {after:.4g}, "
    line += f"{kept} of {len(blocks)} blocks improved (the others keep their decomposition)"
    stopped = [f"block {i} at step {r['stopped']}" for i, r in blocks.items() if r["stopped"]]
    return line + (f"; loss not finite: {', '.join(stopped)}" if stopped else "")


def compress_job(model: str, config, out: Path, job: dict, stream: bool):
    """``lorq compress``'s one library call: written block by block into ``out`` (asked, or a
    model larger than half the free memory), or held and saved (the same bytes either way)."""
    from lorq.io import save
    from lorq.jobs.compress import compress_model
    from lorq.pipeline.guards import ASKED, check_text, check_where, write_as_you_go
    from lorq.util.runtime import JOB_THRESHOLD_BYTES, fixed_mmap_threshold

    fixed_mmap_threshold(JOB_THRESHOLD_BYTES)  # before the model is read
    check_where(job["device"], job["dtype"], out, job["resume"])
    args = (config, job["calibration"], job["eval_blocks"], job["tokenizer"])
    job["tokenizer"] = check_text(model, *args)
    reason = write_as_you_go(model, asked=stream)
    if reason:
        if reason != ASKED:
            errors.print(f"writing one block at a time ({reason})")
        return compress_model(model, config, out, **job)
    overwrite = job.pop("overwrite")
    job.pop("resume"), job.pop("offload_activations")  # --resume streams (above)
    check_out_dir(out, overwrite, model)
    allow_pickle, wanted = job["allow_pickle"], False if job["tokenizer"] else None
    loaded = load_quietly(model, packed=True, allow_pickle=allow_pickle, with_tokenizer=wanted)
    result = compress_model(loaded, config, **job)
    save(result, out, overwrite=overwrite)
    return result


def plan_and_budget(plan_file, budget_mb, budget, quant):
    """(the saved plan, if any; the budget: the plan's unless one or a preset is given)."""
    given = saved_plan(plan_file, budget_mb)
    return given, given.budget if given and budget is None and quant is None else budget


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    eval_blocks: Annotated[int, typer.Option(help="evaluation blocks of 256 tokens")] = 16,
    reference: Annotated[bool, typer.Option(help="compare with the source model if found")] = True,
    device: DeviceOption = "auto",
) -> None:
    """Perplexity, bits/param, size and KL to the source model of a saved lorq model."""
    from lorq.jobs.evaluate import evaluate_saved

    with user_errors() as stage:
        rows, missing = evaluate_saved(path, eval_blocks, reference, stage, device)
    if missing:
        errors.print(f"source model not available, no KL: {missing}")
    console.print(results_table(f"{path}", rows))


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="a directory written by lorq compress")],
    prompt: Annotated[str, typer.Option(help="the prompt (the chat template is applied if any)")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    device: DeviceOption = "auto",
) -> None:
    """Generate text from a saved lorq model (greedy)."""
    from lorq.io import load_with_tokenizer
    from lorq.jobs.generate import generate_text
    from lorq.pipeline.devices import resolve_device

    with user_errors():
        where = resolve_device(device)
        model, tokenizer = load_with_tokenizer(path)
        text = generate_text(model.to(where), tokenizer, prompt, max_new_tokens)
    console.print(text)


@app.command()
def presets() -> None:
    """List the named quantization presets and their bits per parameter."""
    console.print(presets_table())


@app.command()
def version() -> None:
    """Print lorq's version."""
    console.print(__version__)
