"""QuantizedTensor: the frozen, bit-packed Q of W ≈ Q + s·B·A.

Shapes for a weight of shape (out, in) with n = out·in values and blocks of ``block_size`` values
(row-major; for INT-k a block is a group of G input features of one row):

    codes   uint8, packed_nbytes(n, bits)        k-bit codes, bit-packed
    scales  (n / block_size,) scale_dtype        or QuantizedScales (NF double quantization)
    zeros   INT-k only: packed k-bit integer zeros (``zero="int"``) or
            (n / block_size,) scale_dtype mins (``zero="float"``)

    NF:              ŵ = level[code] · scale
    INT, int zero:   ŵ = scale · (code - zero)
    INT, float min:  ŵ = scale · code + min

``nbytes`` counts every stored buffer, so ``bits_per_param = 8 · nbytes / n`` is what memory and
disk really hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lorq.config import FLOAT_BITS, QuantConfig
from lorq.quant.codebook import nf_levels
from lorq.quant.double_quant import TORCH_FLOAT, QuantizedScales
from lorq.quant.packing import packed_nbytes, unpack, unpack_lookup

CHUNK_VALUES = 1 << 18  # values decoded at once: cache-sized, bounds temporary memory
META_KEY = "quant_meta"


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized 2-D weight; see the module docstring for the layout."""

    config: QuantConfig
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor | QuantizedScales
    zeros: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.numel // self.config.block_size

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored buffer by name (nested scale buffers as ``scales.<name>``)."""
        out = {"codes": self.codes}
        if isinstance(self.scales, QuantizedScales):
            out.update({f"scales.{k}": v for k, v in self.scales.tensors().items()})
        else:
            out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of every stored buffer (codes, scales and their second level, zeros / mins)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def block_scales(self) -> torch.Tensor:
        """The scale of every block as float32, shape (num_blocks,)."""
        if isinstance(self.scales, QuantizedScales):
            return self.scales.dequantize()
        return self.scales.float()

    def block_zeros(self) -> torch.Tensor | None:
        """INT-k: integer zeros or float mins as float32, shape (num_blocks,); NF: None."""
        if self.zeros is None:
            return None
        if self.config.zero == "int":
            return unpack(self.zeros, self.config.bits, self.num_blocks).float()
        return self.zeros.float()

    def _table(self) -> torch.Tensor:
        if self.config.format == "nf":
            return nf_levels(self.config.bits).to(self.device)
        return torch.arange(2**self.config.bits, dtype=torch.float32, device=self.device)

    def codes_unpacked(self) -> torch.Tensor:
        """The k-bit codes as uint8, shape (out, in)."""
        return unpack(self.codes, self.config.bits, self.numel).view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense tensor Q, shape (out, in), decoded chunk by chunk."""
        cfg, block = self.config, self.config.block_size
        out = torch.empty(self.shape, dtype=dtype, device=self.device).view(-1, block)
        scales, zeros, table = self.block_scales(), self.block_zeros(), self._table()
        step = max(1, CHUNK_VALUES // block)
        for start in range(0, self.num_blocks, step):
            stop = min(start + step, self.num_blocks)
            lo, hi = start * block * cfg.bits // 8, -(-stop * block * cfg.bits // 8)
            values = unpack_lookup(self.codes[lo:hi], cfg.bits, (stop - start) * block, table)
            values = values.view(-1, block)
            s, dst = scales[start:stop, None], out[start:stop]
            if zeros is None:
                torch.mul(values, s, out=dst)
            elif cfg.zero == "int":
                torch.mul(values.sub_(zeros[start:stop, None]), s, out=dst)
            else:
                torch.addcmul(zeros[start:stop, None], values, s, out=dst)
        return out.view(self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        scales = self.scales.to(device)
        zeros = None if self.zeros is None else self.zeros.to(device)
        return QuantizedTensor(self.config, self.shape, self.codes.to(device), scales, zeros)

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-safe); the config and shape travel as a uint8 JSON tensor."""
        meta = {"config": self.config.to_dict(), "shape": list(self.shape)}
        raw = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        return {**{k: v.contiguous() for k, v in self.tensors().items()}, META_KEY: raw}

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> QuantizedTensor:
        """Inverse of :meth:`tensors`: rebuild from the named buffers, the config and the shape."""
        scales: torch.Tensor | QuantizedScales
        if config.double_quant:
            assert config.scale_bits is not None
            scales = QuantizedScales(
                tensors["scales.codes"],
                tensors["scales.super_scales"],
                tensors["scales.offset"],
                config.scale_bits,
                config.scale_block_size,
                shape[0] * shape[1] // config.block_size,
            )
        else:
            scales = tensors["scales"]
        return cls(config, shape, tensors["codes"], scales, tensors.get("zeros"))

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
    numel = shape[0] * shape[1]
    blocks = numel // config.block_size
    scale_bytes = FLOAT_BITS[config.scale_dtype or "fp32"] // 8
    nbytes = packed_nbytes(numel, config.bits)
    if config.double_quant:
        assert config.scale_bits is not None
        supers = -(-blocks // config.scale_block_size)
        nbytes += packed_nbytes(blocks, config.scale_bits) + 4  # codes + fp32 offset
        nbytes += supers * FLOAT_BITS[config.super_scale_dtype] // 8
    else:
        nbytes += blocks * scale_bytes
    if config.format == "int":
        nbytes += (
            packed_nbytes(blocks, config.bits) if config.zero == "int" else blocks * scale_bytes
        )
    return nbytes


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
