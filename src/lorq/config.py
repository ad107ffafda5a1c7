"""Frozen, validated configuration dataclasses.

Every artifact lorq writes carries the config that made it (``to_dict`` / ``from_dict``); settings
never live in file names. Validation happens in ``__post_init__`` and raises ``ValueError`` naming
the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Format = Literal["nf", "int"]
Zero = Literal["int", "float"]
FloatName = Literal["fp16", "bf16", "fp32"]

FLOAT_BITS: dict[str, int] = {"fp16": 16, "bf16": 16, "fp32": 32}
SUPPORTED_BITS = (2, 3, 4, 8)
NF_BLOCK_RANGE = (16, 4096)
INT_BLOCK_RANGE = (16, 1024)


def _check_choice(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{field}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}"
        )


def _check_power_of_two(field: str, value: Any, lo: int, hi: int) -> None:
    ok = isinstance(value, int) and lo <= value <= hi and value & (value - 1) == 0
    if not ok:
        raise ValueError(
            f"{field}={value!r} is not supported; allowed: a power of two from {lo} to {hi}"
        )


class _Serializable:
    """to_dict / from_dict for flat frozen dataclasses (unknown keys are an error)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class QuantConfig(_Serializable):
    """How one weight matrix is quantized (ALGORITHMS.md §1).

    ``block_size`` is the number of consecutive row-major values that share one scale: B0 for
    NormalFloat, the group size G for affine INT-k (there it must divide ``in_features``).

    NormalFloat (``format="nf"``): absmax scales per block, optionally double-quantized
    (``scale_bits`` = b0 bits per scale, ``scale_block_size`` = B1 scales per super-block whose
    max is stored in ``super_scale_dtype`` = b1). ``scale_bits=None`` stores the scales as
    ``scale_dtype`` floats.

    Affine INT-k (``format="int"``): ``scale_dtype`` scales per group and either an integer k-bit
    zero point (``zero="int"``, GPTQ layout) or a float min (``zero="float"``, HQQ / GGUF Q4_1
    layout, stored as ``scale_dtype``).
    """

    format: Format = "nf"
    bits: int = 4
    block_size: int = 64
    scale_bits: int | None = 8
    scale_block_size: int = 256
    super_scale_dtype: FloatName = "fp32"
    scale_dtype: FloatName | None = None
    zero: Zero = "int"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "nf4": dict(format="nf", bits=4, block_size=64),
        "nf3": dict(format="nf", bits=3, block_size=64),
        "nf2": dict(format="nf", bits=2, block_size=64),
        "nf8": dict(format="nf", bits=8, block_size=64),
        "nf4-fp32-scales": dict(format="nf", bits=4, block_size=64, scale_bits=None),
        "int8-g128": dict(format="int", bits=8, block_size=128),
        "int4-g32": dict(format="int", bits=4, block_size=32),
        "int4-g64": dict(format="int", bits=4, block_size=64),
        "int4-g128": dict(format="int", bits=4, block_size=128),
        "int3-g32": dict(format="int", bits=3, block_size=32),
        "int3-g128": dict(format="int", bits=3, block_size=128),
        "int2-g32": dict(format="int", bits=2, block_size=32),
        "q4_1": dict(format="int", bits=4, block_size=32, zero="float"),
        "int3-g32-fmin": dict(format="int", bits=3, block_size=32, zero="float"),
        "int2-g32-fmin": dict(format="int", bits=2, block_size=32, zero="float"),
    }

    def __post_init__(self) -> None:
        _check_choice("format", self.format, ("nf", "int"))
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        lo, hi = NF_BLOCK_RANGE if self.format == "nf" else INT_BLOCK_RANGE
        _check_power_of_two("block_size", self.block_size, lo, hi)
        if self.scale_dtype is None:  # resolve the per-format default once, so it is saved
            object.__setattr__(self, "scale_dtype", "fp32" if self.format == "nf" else "fp16")
        _check_choice("scale_dtype", self.scale_dtype, tuple(FLOAT_BITS))
        _check_choice("super_scale_dtype", self.super_scale_dtype, tuple(FLOAT_BITS))
        _check_choice("zero", self.zero, ("int", "float"))
        if self.format == "nf":
            _check_choice("scale_bits", self.scale_bits, (None, *SUPPORTED_BITS))
            _check_power_of_two("scale_block_size", self.scale_block_size, 2, 4096)

    @property
    def double_quant(self) -> bool:
        """True when the NF scales are themselves quantized (LQ-LoRA's second level)."""
        return self.format == "nf" and self.scale_bits is not None

    @property
    def nominal_bits(self) -> float:
        """Bits per parameter by the formulas of ALGORITHMS.md §1.2/§1.3 (no per-matrix scalars)."""
        if self.format == "int":
            zero_bits = self.bits if self.zero == "int" else FLOAT_BITS[self.scale_dtype or "fp16"]
            return (
                self.bits + (FLOAT_BITS[self.scale_dtype or "fp16"] + zero_bits) / self.block_size
            )
        if self.scale_bits is None:
            return self.bits + FLOAT_BITS[self.scale_dtype or "fp32"] / self.block_size
        super_bits = FLOAT_BITS[self.super_scale_dtype] / (self.block_size * self.scale_block_size)
        return self.bits + self.scale_bits / self.block_size + super_bits

    @property
    def name(self) -> str:
        """A short human-readable label (the preset name when the config is a preset)."""
        for preset, fields in self.PRESETS.items():
            if QuantConfig(**fields) == self:
                return preset
        if self.format == "int":
            return f"int{self.bits}-g{self.block_size}" + ("-fmin" if self.zero == "float" else "")
        if self.scale_bits is None:
            return f"nf{self.bits}-b{self.block_size}-{self.scale_dtype}"
        return (
            f"nf{self.bits}-b{self.block_size}-s{self.scale_bits}"
            f"x{self.scale_block_size}-{self.super_scale_dtype}"
        )

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """A named preset: ``nf4`` (QLoRA's 4.127 bits), ``nf3``, ``int4-g32``, ``q4_1``, …"""
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown quantization preset {name!r}; known: {', '.join(cls.PRESETS)}"
            )
        return cls(**cls.PRESETS[name])


DEFAULT_ITERATIONS = {"loftq": 5, "lq": 20}  # ALGORITHMS.md §2.1 (T = 5), §2.2 (T_max = 20)


@dataclass(frozen=True)
class DecomposeConfig(_Serializable):
    """How W ≈ Q + s·B·A is found (ALGORITHMS.md §2).

    ``method``: "loftq" (quantize first, T = 5) or "lq" (LQ-LoRA: SVD first, stop when the error
    rises, T_max = 20); ``iters`` overrides T. ``scaling`` s = lora_alpha / r (/ √r with
    ``rslora``); the factors satisfy Q + s·B·A = the decomposition for any alpha. ``svd``:
    "exact", "randomized" (oversampling 10, 2 power iterations, warm-started between iterations)
    or "auto" (randomized when the rank is small next to the matrix, exact otherwise).
    """

    method: Literal["loftq", "lq"] = "lq"
    rank: int = 16
    iters: int | None = None
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    lora_alpha: float = 16.0
    rslora: bool = False
    svd: Literal["exact", "randomized", "auto"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("loftq", "lq"))
        _check_choice("svd", self.svd, ("exact", "randomized", "auto"))
        if isinstance(self.quant, dict):
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
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


COMPRESS_METHODS = ("lq", "loftq", "nf", "qa-lora")
DEFAULT_COMPRESS_QUANT = "nf3"
# QA-LoRA's INT4, G = 32 with a real-valued offset per group (its β; GGUF Q4_1 layout, 5.0 bits):
# the adapter then merges exactly up to fp16. Integer zeros (int4-g32, GPTQ layout, 4.625 bits)
# round Δ / scale to whole steps: a typical trained adapter (|Δ| ≪ scale / 2) is lost in the merge.
DEFAULT_QA_LORA_QUANT = "q4_1"


@dataclass(frozen=True)
class CompressConfig(_Serializable):
    """What ``lorq.compress`` does to a model.

    ``method``: "lq" (LQ-LoRA), "loftq", "nf" (plain quantization; the LoRA factors start as
    B = 0 and a random A, QLoRA-style), or "qa-lora" (an INT-k base and a group-pooled adapter,
    B = 0, that merges into the zero points; ALGORITHMS.md §2.4). Either a uniform ``quant``
    preset for every target (default nf3; q4_1 for qa-lora, which needs an INT preset), or a
    ``budget`` in bits/param chosen per matrix by the ILP over ``candidates`` (costs from
    ``plan_iters`` decomposition steps, Fisher-weighted with ``fisher``; not for qa-lora).
    ``gptq`` (qa-lora only): round the base with GPTQ on calibration data instead of RTN.
    ``include`` / ``exclude`` are regexes on module names (default: every linear layer of the
    blocks, no LM head).
    """

    method: Literal["lq", "loftq", "nf", "qa-lora"] = "lq"
    quant: str | None = None
    budget: float | None = None
    candidates: str = "default"
    rank: int = 16
    lora_alpha: float = 16.0
    iters: int | None = None
    svd: Literal["exact", "randomized", "auto"] = "auto"
    fisher: bool = False
    plan_iters: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] | None = None
    seed: int = 0
    gptq: bool = False

    def __post_init__(self) -> None:
        _check_choice("method", self.method, COMPRESS_METHODS)
        self._check_qa_lora()
        if self.quant is None and self.budget is None:
            default = DEFAULT_QA_LORA_QUANT if self.method == "qa-lora" else DEFAULT_COMPRESS_QUANT
            object.__setattr__(self, "quant", default)
        if self.quant is not None and self.budget is not None:
            raise ValueError(
                f"give exactly one of quant={self.quant!r} (a uniform preset) and "
                f"budget={self.budget!r} (bits/param for the ILP)"
            )
        if self.quant is not None:
            QuantConfig.preset(self.quant)
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"budget={self.budget!r} is not supported; allowed: bits/param > 0")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.decompose_config(QuantConfig())  # validates rank, iters, alpha, svd

    def _check_qa_lora(self) -> None:
        """gptq only with qa-lora; qa-lora only with a uniform affine INT preset."""
        _check_choice("gptq", self.gptq, (False, True))
        if self.gptq and self.method != "qa-lora":
            raise ValueError(
                f"gptq=True is not supported with method={self.method!r}; GPTQ rounds the base of "
                "method='qa-lora' only"
            )
        if self.method != "qa-lora":
            return
        if self.budget is not None:
            raise ValueError(
                f"budget={self.budget!r} is not supported with method='qa-lora' (the base is one "
                f"uniform INT format); pass quant=, e.g. quant={DEFAULT_QA_LORA_QUANT!r}"
            )
        if self.fisher:
            raise ValueError(
                "fisher=True is not supported with method='qa-lora' (its base is RTN or GPTQ); "
                "pass gptq=True for data-aware rounding"
            )
        if self.quant is not None and QuantConfig.preset(self.quant).format != "int":
            int_presets = [n for n, f in QuantConfig.PRESETS.items() if f["format"] == "int"]
            raise ValueError(
                f"quant={self.quant!r} is not supported with method='qa-lora' (NormalFloat has no "
                f"zero point to merge the adapter into); allowed: {', '.join(int_presets)}"
            )

    @property
    def plan_method(self) -> str:
        """The budget planner's name for this method (plain quantization is ``"none"``)."""
        return "none" if self.method == "nf" else self.method

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
        )
