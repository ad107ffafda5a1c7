"""QuantizedTensor: the frozen, bit-packed Q of W ≈ Q + s·B·A, in any registered format.

    QuantizedTensor(config, shape=(out, in), buffers={name: tensor})

The buffers and their names are the format's (``format_of(config).buffer_keys(config)``; e.g. NF:
``codes``, ``scales`` or ``scales.codes`` / ``scales.super_scales`` / ``scales.offset``; affine:
``codes``, ``scales``, ``zeros``). ``nbytes`` counts every stored buffer, so
``bits_per_param = 8 · nbytes / (out · in)`` is what memory and disk really hold; ``dequantize``
asks the format to decode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lorq.quant.base import QuantConfig, format_of
from lorq.quant.packing import unpack

META_KEY = "quant_meta"


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized 2-D weight: its config, its (out, in) shape and the format's buffers."""

    config: QuantConfig
    shape: tuple[int, int]
    buffers: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        expected = format_of(self.config).buffer_keys(self.config)
        if tuple(self.buffers) != expected:
            if set(self.buffers) != set(expected):
                raise ValueError(
                    f"{self.config.name} stores buffers {list(expected)}, "
                    f"got {sorted(self.buffers)}"
                )
            object.__setattr__(self, "buffers", {k: self.buffers[k] for k in expected})

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.numel // self.config.block_size

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    @property
    def codes(self) -> torch.Tensor:
        """The packed codes (uint8, 1-D)."""
        return self.buffers["codes"]

    @property
    def scales(self) -> torch.Tensor | None:
        """The stored ``scales`` buffer, when the format has one under that name."""
        return self.buffers.get("scales")

    @property
    def zeros(self) -> torch.Tensor | None:
        """The stored ``zeros`` buffer (integer zeros or float mins), when the format has one."""
        return self.buffers.get("zeros")

    def codes_unpacked(self) -> torch.Tensor:
        """The k-bit codes as uint8, shape (out, in)."""
        return unpack(self.codes, self.config.bits, self.numel).view(self.shape)

    def block_scales(self) -> torch.Tensor:
        """The scale of every block as float32, shape (num_blocks,)."""
        return format_of(self.config).block_scales(self)

    def block_zeros(self) -> torch.Tensor | None:
        """Integer zeros or float mins of every block as float32 (num_blocks,); None: none."""
        return format_of(self.config).block_zeros(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored buffer by name."""
        return dict(self.buffers)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored buffer."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense tensor Q, shape (out, in)."""
        return format_of(self.config).decode(self, dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Rows ``rows`` (any integer shape) of Q: shape (*rows.shape, in)."""
        return format_of(self.config).decode_rows(self, rows, dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {k: v.to(device) for k, v in self.buffers.items()}
        return QuantizedTensor(self.config, self.shape, moved)

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-safe); the config and shape travel as a uint8 JSON tensor."""
        meta = {"config": self.config.to_dict(), "shape": list(self.shape)}
        raw = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        return {**{k: v.contiguous() for k, v in self.buffers.items()}, META_KEY: raw}

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        """Rebuild from the named buffers (extra entries ignored), the config and the shape."""
        keys = format_of(config).buffer_keys(config)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{config.name} needs buffers {missing}, which are missing")
        return cls(config, shape, {k: tensors[k] for k in keys})

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Inverse of :meth:`to_state_dict` (bit-exact)."""
        if META_KEY not in state:
            raise ValueError(f"not a QuantizedTensor state dict: no {META_KEY!r} entry")
        meta = json.loads(bytes(state[META_KEY].tolist()).decode())
        shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        return cls.from_tensors(QuantConfig.from_dict(meta["config"]), shape, state)


def storage_nbytes(config: QuantConfig, shape: tuple[int, int]) -> int:
    """Bytes a QuantizedTensor of ``config`` and ``shape`` stores, without quantizing anything."""
    return format_of(config).nbytes(config, shape)


@dataclass(frozen=True)
class MergeError:
    """How far a merged Q' is from Q + Δ (both float32, out × in).

    ``max_abs`` = max |Q' − (Q + Δ)|; ``relative`` = ‖Q' − (Q + Δ)‖_F / ‖Q + Δ‖_F;
    ``delta_relative`` = ‖Q' − (Q + Δ)‖_F / ‖Δ‖_F (the fraction of Δ lost; 0 when nothing is).
    """

    max_abs: float
    relative: float
    delta_relative: float


def measure_merge(
    q: QuantizedTensor, delta_weight: torch.Tensor, merged: QuantizedTensor
) -> MergeError:
    """MergeError of ``merged`` against Q + ``delta_weight`` (out × in)."""
    target = q.dequantize() + delta_weight.float().to(q.device)
    diff = merged.dequantize() - target
    error = torch.linalg.vector_norm(diff)
    delta_norm = torch.linalg.vector_norm(delta_weight.float())
    return MergeError(
        max_abs=float(diff.abs().max()),
        relative=float(error / torch.linalg.vector_norm(target).clamp_min(1e-30)),
        delta_relative=0.0 if float(error) == 0 else float(error / delta_norm.clamp_min(1e-30)),
    )
