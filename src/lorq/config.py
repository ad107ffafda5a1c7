"""Frozen, validated configuration dataclasses.

Every artifact lorq writes carries the config that made it (``to_dict`` / ``from_dict``); settings
never live in file names. Validation happens in ``__post_init__`` and raises ``ValueError`` naming
the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lorq.quant import NFConfig, QuantConfig, as_config
from lorq.quant.base import check_choice as _check_choice


class _Serializable:
    """to_dict / from_dict for flat frozen dataclasses (unknown keys are an error)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if isinstance(value, QuantConfig) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} must be a JSON object, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


DEFAULT_ITERATIONS = {"loftq": 5, "lq": 20}  # docs/algorithms.md §2.2 (T = 5), §2.3 (T_max = 20)
WEIGHTINGS = ("none", "fisher", "activations", "both")
PLAN_WEIGHTINGS = (*WEIGHTINGS, "kl")  # "kl": H-norm costs × each target's α (§10)
ROUNDINGS = ("nearest", "weighted", "gptq")
DAMP = 0.01  # λ of H_λ = H + λ·mean(diag H)·I (docs/algorithms.md §5)
# Block-wise recovery (docs/algorithms.md §9): Adam steps of 4 calibration sequences, the
# factors' learning rate (EfficientQAT's Block-AP: ~1e-4 for the factors) and the scales' (in
# units of their matrix's mean scale, lorq.nn.scales)
RECOVER_STEPS = 100
RECOVER_LR = 1e-4
RECOVER_SCALE_LR = 1e-3


def _check_rate(field: str, lr: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise ValueError(f"{field}={lr!r} is not supported; allowed: 0 < lr < 1")


def _check_recovery(config: CompressConfig) -> None:
    _check_choice("recover", config.recover, ("none", "block"))
    _check_choice("recover_scales", config.recover_scales, (True, False))
    steps = config.recover_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"recover_steps={steps!r} is not supported; allowed: an integer ≥ 0")
    _check_rate("recover_lr", config.recover_lr)
    _check_rate("recover_scale_lr", config.recover_scale_lr)


def _check_adapters(config: CompressConfig) -> None:
    """``plan_ranks`` / ``plan_factor_bits``: the ILP chooses each matrix's adapter (rank 0:
    none; factor bits 16 or 8) under a budget that counts it; LQ-LoRA only."""
    for name in ("plan_ranks", "plan_factor_bits"):
        value = getattr(config, name)
        if isinstance(value, list | str | int):
            value = _int_tuple(name, value)
            object.__setattr__(config, name, value)
        if value is None:
            continue
        if not config.budgeted:
            raise ValueError(
                f"{name}={list(value)} lets a budget plan choose the adapters; give budget= "
                "(bits/param) or budget_mb= (MiB), or leave it unset"
            )
        if config.method != "lq":
            raise ValueError(
                f"{name}={list(value)} plans LQ-LoRA's adapters; method={config.method!r} has "
                "one rank for every matrix (use method='lq')"
            )
    bits = config.plan_factor_bits or ()
    if any(b not in (16, 8) for b in bits) or (config.plan_factor_bits is not None and not bits):
        raise ValueError(f"plan_factor_bits={list(bits)} is not supported; allowed: 16 and/or 8")
    if bits and config.factor_bits is not None:
        raise ValueError("give factor_bits (one for every matrix) or plan_factor_bits, not both")
    if 8 in bits and config.budget_mb is not None:
        raise ValueError(
            "plan_factor_bits with 8 does not fit budget_mb: the GGUF adapter stores F16 factors"
        )


def _check_plan_embeddings(config: CompressConfig) -> None:
    """``plan_embeddings``: the token embedding is a row of a KL plan (docs/algorithms.md §10)."""
    _check_choice("plan_embeddings", config.plan_embeddings, (True, False))
    if not config.plan_embeddings:
        return
    if not config.budgeted or config.cost_weighting != "kl":
        raise ValueError(
            "plan_embeddings chooses the token embedding's format in a plan whose costs are the "
            "KL's; give a budget (budget= or budget_mb=) with plan_weighting='kl'"
        )
    if config.embeddings is not None:
        raise ValueError(
            f"give embeddings={config.embeddings!r} (one format, fixed) or plan_embeddings "
            "(the plan chooses it), not both"
        )
    grid = config.adapter_grid()
    if grid is not None and 0 not in grid[0]:
        raise ValueError(
            f"plan_embeddings with plan_ranks={list(grid[0])}: the token embedding takes no "
            "adapter, so the rank grid must include 0"
        )


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """'0,8,16' / [0, 8, 16] / 8 → (0, 8, 16); ValueError naming ``name`` otherwise."""
    items = value.split(",") if isinstance(value, str) else value
    items = items if isinstance(items, list | tuple) else [items]
    try:
        numbers = tuple(dict.fromkeys(int(str(v).strip()) for v in items if str(v).strip()))
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not supported; allowed: integers, e.g. 0,8,16"
        ) from None
    if not numbers or any(n < 0 for n in numbers):
        raise ValueError(f"{name}={value!r} is not supported; allowed: integers ≥ 0, e.g. 0,8,16")
    return numbers


# Block-sequential statistics by default (bench/README.md, "One pipeline": measured on the
# default job and the budget grid).
SEQUENTIAL = True


# The main job's statistics (``compress_model``, ``lorq compress`` / ``plan``): the output-error
# decomposition and plan on the built-in calibration text, Q rounded to nearest (bench/README.md,
# "Activation-aware decomposition": on SmolLM2 at nf3 this lowers the KL from 0.797 to 0.281;
# GPTQ rounding on top gave 0.290 at 3× the time). A CompressConfig built by hand stays data-free
# ("none", "nearest") unless it names them.
JOB_STATISTICS = {"weighting": "activations", "rounding": "nearest"}


def uses_fisher(weighting: str) -> bool:
    return weighting in ("fisher", "both")


def uses_activations(weighting: str) -> bool:
    """Whether an error needs the layers' H: a KL plan's costs are the H-norm's (× α)."""
    return weighting in ("activations", "both", "kl")


def _check_weighting(weighting: str, rounding: str, damp: float) -> None:
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("rounding", rounding, ROUNDINGS)
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp >= 0:
        raise ValueError(f"damp={damp!r} is not supported; allowed: a float ≥ 0 ({DAMP})")


@dataclass(frozen=True)
class DecomposeConfig(_Serializable):
    """How W ≈ Q + s·B·A is found (docs/algorithms.md §2).

    ``method``: "loftq" (quantize first, T = 5) or "lq" (LQ-LoRA: SVD first, stop when the error
    rises, T_max = 20); ``iters`` overrides T. ``scaling`` s = lora_alpha / r (/ √r with
    ``rslora``); the factors satisfy Q + s·B·A = the decomposition for any alpha. ``svd``:
    "exact", "randomized" (oversampling 10, 2 power iterations, warm-started between iterations)
    or "auto" (randomized when the rank is small next to the matrix, exact otherwise).
    ``weighting`` (docs/algorithms.md §2.3, §5): the error the low-rank step and the stopping
    rule minimise — "none" ‖R‖_F, "fisher" ‖√F ⊙ R‖_F (two-sided SVD heuristic), "activations"
    the H-norm ‖R·L‖_F (H_λ = L·Lᵀ, closed-form low-rank step), "both" ‖diag(ρ)·R·L‖_F.
    ``rounding``: Q by round to nearest, by round to nearest with each block's scales searched
    under the importance diag H ("weighted": llama.cpp's imatrix use, on its types) or by GPTQ
    on H (``damp`` is λ of H_λ for both).
    """

    method: Literal["loftq", "lq"] = "lq"
    rank: int = 16
    iters: int | None = None
    quant: QuantConfig = dataclasses.field(default_factory=NFConfig)
    lora_alpha: float = 16.0
    rslora: bool = False
    svd: Literal["exact", "randomized", "auto"] = "auto"
    seed: int = 0
    weighting: Literal["none", "fisher", "activations", "both"] = "none"
    rounding: Literal["nearest", "weighted", "gptq"] = "nearest"
    damp: float = DAMP

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("loftq", "lq"))
        _check_weighting(self.weighting, self.rounding, self.damp)
        _check_choice("svd", self.svd, ("exact", "randomized", "auto"))
        if isinstance(self.quant, dict):
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
        object.__setattr__(self, "quant", as_config(self.quant))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank={self.rank!r} is not supported; allowed: a positive integer")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters <= 0):
            raise ValueError(f"iters={self.iters!r} is not supported; allowed: a positive integer")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is not supported; allowed: > 0")

    @property
    def iterations(self) -> int:
        return self.iters if self.iters is not None else DEFAULT_ITERATIONS[self.method]

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / √r for rsLoRA."""
        return self.lora_alpha / (self.rank**0.5 if self.rslora else self.rank)

    def svd_method(self, shape: tuple[int, ...]) -> str:
        """The SVD actually used for a matrix of ``shape`` ("exact" or "randomized")."""
        if self.svd != "auto":
            return self.svd
        return "randomized" if 4 * (self.rank + 10) <= min(shape) else "exact"


COMPRESS_METHODS = ("lq", "loftq", "plain", "qa-lora")
# names lorq 0.1 wrote for plain quantization (compress method "nf", plan method "none")
LEGACY_METHODS = {"nf": "plain", "none": "plain"}
DEFAULT_COMPRESS_QUANT = "nf3"
# QA-LoRA's INT4, G = 32 with a real-valued offset per group (its β; GGUF Q4_1 layout, 5.0 bits):
# the adapter then merges exactly up to fp16. Integer zeros (int4-g32, GPTQ layout, 4.625 bits)
# round Δ / scale to whole steps: a typical trained adapter (|Δ| ≪ scale / 2) is lost in the merge.
DEFAULT_QA_LORA_QUANT = "q4_1"


@dataclass(frozen=True)
class CompressConfig(_Serializable):
    """What ``lorq.compress_model`` does to a model.

    ``method``: "lq" (LQ-LoRA), "loftq", "plain" (plain quantization; the LoRA factors start as
    B = 0 and a random A, QLoRA-style), or "qa-lora" (an INT-k base and a group-pooled adapter,
    B = 0, that merges into the zero points; docs/algorithms.md §2.5). Either a uniform ``quant``
    (a preset name or a QuantConfig) for every target (default nf3; q4_1 for qa-lora, which needs
    an affine format), or a ``budget`` in bits/param chosen per matrix by the ILP over
    ``candidates`` (costs from ``plan_iters`` decomposition steps; not for qa-lora), or
    ``budget_mb``: the MiB of what ``lorq export --format gguf`` writes (base file and F16
    adapter), turned into bits/param by ``compress_model`` / ``plan_model``.
    ``weighting`` (docs/algorithms.md §2.3, §5): what the decomposition, its stopping rule and
    the plan's costs minimise — "none" the weight error, "fisher" the Fisher-weighted weight
    error (causal LMs), "activations" the layers' output error on the calibration inputs
    (H = XᵀX/N; any model), "both" the output error with Fisher row weights. ``rounding``:
    Q by round to nearest, with llama.cpp's types' scales searched under the importance diag H
    ("weighted", as llama.cpp uses an imatrix) or by GPTQ on H ("gptq"); ``damp`` is λ of
    H_λ = H + λ·mean(diag H)·I.
    For qa-lora, "activations" initialises the pooled adapter by the closed form (else B = 0)
    and "gptq" rounds the base. ``plan_weighting`` (with a budget): another error for the plan's
    costs than for the decomposition, e.g. "fisher" costs with "activations" decompositions,
    or "kl": each matrix's relative output error t (H-norm) times its sensitivity α, measured
    on the model (docs/algorithms.md §10), so the costs add up to the KL the plan predicts;
    ``plan_rounding``: another rounding for them, e.g. "weighted" costs (one encode per
    candidate) for "gptq" decompositions.
    ``include`` / ``exclude`` are regexes on module names
    (default: every linear layer of the blocks, no LM head). ``embeddings``: a preset or config
    for the token embedding table (and an untied output layer) — stored packed, no adapter;
    None (default) keeps them as the source has them. ``plan_embeddings`` (a KL plan): the
    token embedding is a row of the plan, its format chosen among the candidates (no adapter)
    at the cost α_E·t² (t its relative Frobenius error, α_E measured the same way), its bits in
    the budget; a tied head is the same table, an untied one a target when ``include`` names
    it. ``factor_bits=8``: the initial factors
    are rounded to 8 bits per value (row-wise int8, docs/algorithms.md §1.9) and saved so; they
    train and merge as floats. ``sequential`` (docs/algorithms.md §6): each block's statistics
    come from the outputs of the compressed earlier blocks (False: of the original ones).
    ``gguf_codes`` (qa-lora): a source layer already packed in ``quant`` (a GGUF's Q4_1) keeps
    its own codes as the base. ``recover="block"`` (docs/algorithms.md §9): after each block is
    decomposed, its factors — and with ``recover_scales`` the scales its formats store — are
    trained toward the original block's output on the calibration inputs (``recover_steps`` Adam
    steps at ``recover_lr``; the scales at ``recover_scale_lr`` of their typical value).
    """

    method: Literal["lq", "loftq", "plain", "qa-lora"] = "lq"
    quant: str | QuantConfig | None = None
    budget: float | None = None
    candidates: str = "default"
    rank: int = 16
    lora_alpha: float = 16.0
    iters: int | None = None
    svd: Literal["exact", "randomized", "auto"] = "auto"
    weighting: Literal["none", "fisher", "activations", "both"] = "none"
    plan_iters: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] | None = None
    seed: int = 0
    rounding: Literal["nearest", "weighted", "gptq"] = "nearest"
    embeddings: str | QuantConfig | None = None
    factor_bits: int | None = None
    damp: float = DAMP
    plan_weighting: Literal["none", "fisher", "activations", "both", "kl"] | None = None
    budget_mb: float | None = None
    plan_rounding: Literal["nearest", "weighted", "gptq"] | None = None
    sequential: bool = SEQUENTIAL
    gguf_codes: bool = True
    recover: Literal["none", "block"] = "none"
    recover_steps: int = RECOVER_STEPS
    recover_lr: float = RECOVER_LR
    recover_scales: bool = True
    recover_scale_lr: float = RECOVER_SCALE_LR
    plan_ranks: tuple[int, ...] | None = None
    plan_factor_bits: tuple[int, ...] | None = None
    plan_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_choice("factor_bits", self.factor_bits, (None, 8))
        _check_adapters(self)
        _check_plan_embeddings(self)
        _check_choice("sequential", self.sequential, (True, False))
        _check_choice("gguf_codes", self.gguf_codes, (True, False))
        _check_recovery(self)
        _check_weighting(self.weighting, self.rounding, self.damp)
        _check_choice("plan_weighting", self.plan_weighting, (None, *PLAN_WEIGHTINGS))
        _check_choice("plan_rounding", self.plan_rounding, (None, *ROUNDINGS))
        for field in ("plan_weighting", "plan_rounding"):
            if getattr(self, field) is not None and not self.budgeted:
                raise ValueError(
                    f"{field}={getattr(self, field)!r} shapes the costs of a budget plan; "
                    f"give budget= (bits/param) or leave {field} unset"
                )
        object.__setattr__(self, "method", LEGACY_METHODS.get(self.method, self.method))
        if isinstance(self.embeddings, dict):
            object.__setattr__(self, "embeddings", QuantConfig.from_dict(self.embeddings))
        if self.embeddings is not None:
            as_config(self.embeddings)
        _check_choice("method", self.method, COMPRESS_METHODS)
        if isinstance(self.quant, dict):
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
        self._check_qa_lora()
        self._check_budgets()
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.decompose_config(NFConfig())  # validates rank, iters, alpha, svd

    @property
    def budgeted(self) -> bool:
        """True when the ILP chooses the configs (a budget in bits/param or in MiB)."""
        return self.budget is not None or self.budget_mb is not None

    def _check_budgets(self) -> None:
        """Exactly one of quant, budget, budget_mb (quant defaults when neither budget is set)."""
        budgets = (("budget", self.budget), ("budget_mb", self.budget_mb))
        given = [(name, value) for name, value in budgets if value is not None]
        if self.quant is None and not given:
            default = DEFAULT_QA_LORA_QUANT if self.method == "qa-lora" else DEFAULT_COMPRESS_QUANT
            object.__setattr__(self, "quant", default)
        given = [("quant", self.quant)] * (self.quant is not None) + given
        if len(given) > 1:
            named = " and ".join(f"{n}={v!r}" for n, v in given)
            raise ValueError(
                f"give exactly one of {named}: a uniform preset, bits/param or MiB for the ILP"
            )
        if self.quant is not None:
            as_config(self.quant)
        for name, unit in (("budget", "bits/param"), ("budget_mb", "MiB")):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name}={value!r} is not supported; allowed: {unit} > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        """Also reads lorq 0.1's ``fisher`` and ``gptq`` flags (now ``weighting``, ``rounding``)."""
        if isinstance(data, dict) and ("fisher" in data or "gptq" in data):
            data = dict(data)
            if data.pop("fisher", False):
                data["weighting"] = "fisher"
            if data.pop("gptq", False):
                data["rounding"] = "gptq"
        return super().from_dict(data)

    @property
    def cost_weighting(self) -> str:
        """The error the plan's costs use: ``plan_weighting``, else ``weighting``."""
        return self.plan_weighting or self.weighting

    @property
    def cost_rounding(self) -> str:
        """How the plan's costs round Q: ``plan_rounding``, else ``rounding``."""
        return self.plan_rounding or self.rounding

    @property
    def fisher(self) -> bool:
        """True when the decomposition or the plan needs the Fisher information."""
        return uses_fisher(self.weighting) or uses_fisher(self.cost_weighting)

    @property
    def activations(self) -> bool:
        """True when the job needs the layers' input statistics H (weighting, plan or GPTQ)."""
        weighted = uses_activations(self.weighting) or uses_activations(self.cost_weighting)
        return weighted or self.rounding != "nearest" or self.cost_rounding != "nearest"

    @property
    def calibrated(self) -> bool:
        """True when the job needs calibration text: statistics, or block-wise recovery."""
        return self.activations or self.fisher or self.recover == "block"

    @property
    def gptq(self) -> bool:
        return self.rounding == "gptq"

    @property
    def rounds_with_h(self) -> bool:
        """True when Q's rounding uses H (GPTQ, or the importance diag H)."""
        return self.rounding != "nearest"

    def _check_qa_lora(self) -> None:
        """qa-lora only with a uniform affine preset, without the Fisher."""
        if self.method != "qa-lora":
            return
        if self.budgeted:
            which = "budget" if self.budget is not None else "budget_mb"
            raise ValueError(
                f"{which}={getattr(self, which)!r} is not supported with method='qa-lora' (the "
                f"base is one uniform INT format); pass quant=, e.g. "
                f"quant={DEFAULT_QA_LORA_QUANT!r}"
            )
        if self.fisher:
            raise ValueError(
                f"weighting={self.weighting!r} is not supported with method='qa-lora' (the Fisher "
                "does not enter its base or adapter); use weighting='activations' and "
                "rounding='gptq' for data-aware QA-LoRA"
            )

    @property
    def quant_config(self) -> QuantConfig | None:
        """The uniform config (None with a budget)."""
        return None if self.quant is None else as_config(self.quant)

    @property
    def plans_adapters(self) -> bool:
        """Whether the plan chooses each matrix's rank and factor bits."""
        return self.plan_ranks is not None or self.plan_factor_bits is not None

    def adapter_grid(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(ranks, factor bits) the plan chooses from, or None (rank fixed, not budgeted)."""
        if not self.plans_adapters:
            return None
        return self.plan_ranks or (self.rank,), self.plan_factor_bits or (16,)

    def decompose_config(self, quant: QuantConfig) -> DecomposeConfig:
        """The DecomposeConfig of one matrix quantized with ``quant``."""
        method: Literal["loftq", "lq"] = "loftq" if self.method == "loftq" else "lq"
        return DecomposeConfig(
            method=method,
            rank=self.rank,
            iters=self.iters,
            quant=quant,
            lora_alpha=self.lora_alpha,
            svd=self.svd,
            seed=self.seed,
            weighting=self.weighting,
            rounding=self.rounding,
            damp=self.damp,
        )
