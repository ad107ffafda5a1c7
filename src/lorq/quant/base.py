"""What a quantization format is, and the registry that finds one by its config type.

A *format* turns a dense W (out × in) into named, bit-packed buffers and back:

    QuantFormat.quantize(W, config)  → QuantizedTensor(config, shape, {buffer name: tensor})
    QuantFormat.decode(q, dtype)     → Q (out × in)

A format is a codec: ``format_of(config)`` gives what every layer above needs — its buffer
names, its exact byte count, its nominal bits/param, the shapes it accepts, its presets, the grid
GPTQ rounds to. Its identity in other tools' files (a GGUF tensor type, bitsandbytes' or GPTQ's
layout) and QA-LoRA's shift of its zero points are tables kept by those units
(``lorq.io.gguf_types``, ``lorq.exporters.bnb``, ``lorq.io.gptq``, ``lorq.nn.zero_shift``).

The config type is the dispatch key (torchao style): each format module defines one frozen
``QuantConfig`` subclass and registers one ``QuantFormat`` for it. Adding a format is one file
under ``quant/``, one import line in ``quant/__init__.py`` and its tests (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from lorq.quant.tensor import QuantizedTensor
    from lorq.quant.trainable import Trainable

FLOAT_BITS: dict[str, int] = {"fp16": 16, "bf16": 16, "fp32": 32}
TORCH_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUPPORTED_BITS = (2, 3, 4, 8)


def check_choice(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{field}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}"
        )


def check_power_of_two(field: str, value: Any, lo: int, hi: int) -> None:
    ok = isinstance(value, int) and lo <= value <= hi and value & (value - 1) == 0
    if not ok:
        raise ValueError(
            f"{field}={value!r} is not supported; allowed: a power of two from {lo} to {hi}"
        )


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized; subclasses are the formats' own configs.

    Every format has ``bits`` (code width k) and ``block_size``: the number of consecutive
    row-major values that share one scale (NF's B0, the affine formats' group G). ``to_dict``
    carries the format's name, so ``QuantConfig.from_dict`` rebuilds the right subclass.
    """

    FORMAT: ClassVar[str] = ""

    bits: int = 4
    block_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> QuantConfig:
        """The config a :meth:`to_dict` describes (its ``format`` picks the subclass)."""
        if not isinstance(data, dict):
            raise ValueError(f"a quantization config must be a JSON object, got {data!r}")
        data = dict(data)
        name = data.pop("format", None)
        legacy = "zero" in data  # lorq 0.1 wrote every field of its one config class
        if legacy:
            zero = data.pop("zero")
            check_choice("zero", zero, ("int", "float"))
            name = "fmin" if (name, zero) == ("int", "float") else name
        cls = _CONFIG_TYPES.get(name)
        if cls is None:
            check_choice("format", name, tuple(_FORMATS))
        fields = {f.name for f in dataclasses.fields(cls)}
        if legacy:
            data = {k: v for k, v in data.items() if k in fields}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
        return cls(**data)

    @staticmethod
    def preset(name: str) -> QuantConfig:
        """A named preset of any registered format (``lorq presets`` lists them)."""
        return preset(name)

    @property
    def format(self) -> QuantFormat:
        return format_of(self)

    @property
    def nominal_bits(self) -> float:
        """Bits per parameter by the format's formula (docs/algorithms.md §1.6)."""
        return format_of(self).nominal_bits(self)

    @property
    def name(self) -> str:
        """The preset name when the config is a preset, else a label built from the fields."""
        for preset_name, config in presets().items():
            if config == self:
                return preset_name
        return format_of(self).label(self)


class QuantFormat:
    """The operations every layer above needs from one format; one subclass per format.

    Required: ``config_type``, ``quantize``, ``decode``, ``buffer_keys``, ``nbytes``,
    ``nominal_bits``, ``label``. Optional capabilities default to "not supported".
    """

    name: ClassVar[str]
    config_type: ClassVar[type[QuantConfig]]
    description: ClassVar[str] = ""

    def presets(self) -> dict[str, QuantConfig]:
        return {}

    def check_shape(self, config: QuantConfig, shape: tuple[int, int]) -> None:
        """Raise ValueError when a matrix of ``shape`` (out × in) cannot take ``config``."""
        if (shape[0] * shape[1]) % config.block_size:
            raise ValueError(
                f"block_size={config.block_size} does not divide the matrix of shape {shape}; "
                "choose a block_size that divides it"
            )

    def quantize(self, weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        raise NotImplementedError

    def decode(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def quantize_weighted(
        self, weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None
    ) -> QuantizedTensor:
        """Round to nearest with each block's scales chosen under per-column ``importance``
        (in,), as llama.cpp uses an importance matrix; formats without such a search raise."""
        if importance is None:
            return self.quantize(weight, config)
        self.check_weighted(config)
        raise NotImplementedError

    def check_weighted(self, config: QuantConfig) -> None:
        """Raise ValueError unless :meth:`quantize_weighted` takes an importance."""
        raise ValueError(
            f"importance-weighted rounding is not available for {config.name}; it is for "
            "llama.cpp's types (q4_0, iq4_nl, q4_k, …): use rounding='nearest' or 'gptq'"
        )

    def buffer_keys(self, config: QuantConfig) -> tuple[str, ...]:
        raise NotImplementedError

    def decode_rows(self, q: QuantizedTensor, rows: torch.Tensor, dtype: torch.dtype):
        """Rows ``rows`` of Q, shape (*rows.shape, in); formats whose blocks stay within a row
        override this to decode only those rows."""
        return torch.nn.functional.embedding(rows, self.decode(q, dtype))

    def nbytes(self, config: QuantConfig, shape: tuple[int, int]) -> int:
        """Bytes a QuantizedTensor of ``config`` and ``shape`` stores (without quantizing)."""
        raise NotImplementedError

    def nominal_bits(self, config: QuantConfig) -> float:
        raise NotImplementedError

    def label(self, config: QuantConfig) -> str:
        raise NotImplementedError

    def block_scales(self, q: QuantizedTensor) -> torch.Tensor:
        """The scale of every block as float32, shape (num_blocks,)."""
        raise ValueError(f"{q.config.name} has no per-block scales")

    def block_zeros(self, q: QuantizedTensor) -> torch.Tensor | None:
        """Zero points or mins of every block as float32 (num_blocks,); None when there are none."""
        return None

    def trainable_keys(self, config: QuantConfig) -> tuple[str, ...]:
        """The continuous parameters recovery may train (``lorq.quant.trainable``); () for none."""
        return ()

    def trainable(self, q: QuantizedTensor) -> Trainable:
        """``q``'s :meth:`trainable_keys` as a :class:`~lorq.quant.trainable.Trainable`."""
        raise ValueError(f"{q.config.name} stores no continuous parameters recovery can train")

    def check_gptq(self, config: QuantConfig) -> None:
        """Raise ValueError unless GPTQ can round to this format's grid (``gptq_grid``)."""
        raise ValueError(
            f"GPTQ rounding is not available for {config.name}; use an NF or INT preset "
            "(nf2, nf3, nf4, int4-g32, q4_1, …) or rounding='nearest'"
        )

    def gptq_grid(self, weight: torch.Tensor, config: QuantConfig) -> Any:
        """The column-by-column rounding GPTQ uses (a ``lorq.quant.gptq.ColumnGrid``)."""
        self.check_gptq(config)
        raise NotImplementedError


_FORMATS: dict[str, QuantFormat] = {}
_BY_CONFIG: dict[type[QuantConfig], QuantFormat] = {}
_CONFIG_TYPES: dict[str, type[QuantConfig]] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    """Add a format to the registry (keyed by its config type and its name)."""
    if fmt.name in _FORMATS or fmt.config_type in _BY_CONFIG:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    if fmt.name != fmt.config_type.FORMAT:
        raise ValueError(f"{fmt.config_type.__name__}.FORMAT must be {fmt.name!r}")
    _FORMATS[fmt.name] = fmt
    _BY_CONFIG[fmt.config_type] = fmt
    _CONFIG_TYPES[fmt.name] = fmt.config_type
    return fmt


def format_of(config: QuantConfig) -> QuantFormat:
    """The registered format of ``config`` (its type is the key)."""
    fmt = _BY_CONFIG.get(type(config))
    if fmt is None:
        raise ValueError(
            f"{type(config).__name__} is not a registered quantization config; "
            f"known formats: {', '.join(_FORMATS)}"
        )
    return fmt


def formats() -> dict[str, QuantFormat]:
    """Every registered format by name, in registration order."""
    return dict(_FORMATS)


def presets() -> dict[str, QuantConfig]:
    """Every registered format's presets by name."""
    out: dict[str, QuantConfig] = {}
    for fmt in _FORMATS.values():
        out.update(fmt.presets())
    return out


def preset(name: str) -> QuantConfig:
    """The preset ``name`` (``nf4``, ``nf3``, ``int4-g32``, ``q4_1``, …)."""
    known = presets()
    if name not in known:
        raise ValueError(f"unknown quantization preset {name!r}; known: {', '.join(known)}")
    return known[name]


def as_config(quant: QuantConfig | str) -> QuantConfig:
    """A config from a config or a preset name."""
    if isinstance(quant, QuantConfig):
        format_of(quant)
        return quant
    if isinstance(quant, str):
        return preset(quant)
    raise ValueError(f"quant={quant!r} is not supported; pass a preset name or a QuantConfig")


def fits(config: QuantConfig, shape: tuple[int, int]) -> bool:
    """Whether a matrix of ``shape`` (out × in) can take ``config`` (its blocks tile the rows)."""
    try:
        format_of(config).check_shape(config, shape)
    except ValueError:
        return False
    return True


def check_weight(weight: torch.Tensor) -> None:
    """Raise ValueError unless ``weight`` is a non-empty 2-D floating tensor."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features × in_features), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(
            f"weight dtype {weight.dtype} is not supported; pass a float16/bfloat16/float32 tensor"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")


def block_range(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) as float32, shape (num_blocks,); raises on NaN / Inf in ``blocks``.

    NaN and ±Inf propagate into the block extremes, so checking those is a full finiteness check
    of the weight at no extra pass over it.
    """
    low, high = torch.aminmax(blocks, dim=1)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError("weight contains NaN or Inf values; quantize only finite weights")
    return low.float(), high.float()


def storage_dtype(name: str | None) -> torch.dtype:
    return TORCH_FLOAT[name or "fp32"]


def safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x, with 0 where x == 0 (an all-zero block quantizes to code 0 / level 0)."""
    return torch.where(x != 0, 1.0 / x, torch.zeros_like(x))


def round_up_to_dtype(x: torch.Tensor, dtype: torch.dtype, field: str) -> torch.Tensor:
    """``x`` cast to ``dtype``, rounded towards +inf so that the stored value is ≥ ``x``.

    Raises ValueError naming ``field`` when a value overflows ``dtype`` (e.g. > 65504 in fp16).
    """
    stored = x.to(dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"weight range overflows {field}={dtype}: a scale exceeds its largest value; "
            f"use {field}='fp32' for this matrix"
        )
    low = stored.float() < x
    if low.any():
        stored = torch.where(
            low, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored
        )
    return stored
