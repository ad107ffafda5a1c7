"""QuantLoraLinear: a frozen bit-packed Q plus a trainable low-rank correction.

    y = x Qᵀ + s · (x Aᵀ) Bᵀ (+ bias)          x (…, in), Q (out × in), A (r × in), B (out × r)

Q lives as packed buffers (codes, scales, zeros) — never as a dense copy between calls. The forward
dequantizes Q into the input's dtype (one layer's dense weight, freed after the matmul). Only
``lora_A`` and ``lora_B`` are trainable; ``bias`` is kept frozen.

``from_linear`` (decompose an ``nn.Linear`` or GPT-2 ``Conv1D``) and ``merge`` (back to a dense
``nn.Linear`` with W = Q + s·B·A) are inverses up to the decomposition's error; merging is
idempotent because it does not change the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorq.config import DecomposeConfig, QuantConfig
from lorq.decompose import Decomposition, decompose
from lorq.nn.dense import dense_weight
from lorq.quant.tensor import QuantizedTensor


def buffer_name(key: str) -> str:
    """Module buffer name of a QuantizedTensor buffer: ``scales.codes`` → ``q_scales_codes``."""
    return "q_" + key.replace(".", "_")


def buffer_keys(config: QuantConfig) -> tuple[str, ...]:
    """The buffers a QuantizedTensor of ``config`` stores."""
    scales = ("scales.codes", "scales.super_scales", "scales.offset")
    keys = ("codes", *(scales if config.double_quant else ("scales",)))
    return (*keys, "zeros") if config.format == "int" else keys


class QuantLoraLinear(nn.Module):
    """Drop-in replacement of a linear layer: frozen quantized weight + trainable LoRA factors."""

    def __init__(
        self,
        q: QuantizedTensor,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.quant_config: QuantConfig = q.config
        self.out_features, self.in_features = q.shape
        self.rank = lora_A.shape[0]
        self.scaling = float(scaling)
        self._keys = tuple(q.tensors())
        for key, tensor in q.tensors().items():
            self.register_buffer(buffer_name(key), tensor)
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    @property
    def q(self) -> QuantizedTensor:
        """The quantized weight as a QuantizedTensor view of this module's buffers."""
        buffers = {key: getattr(self, buffer_name(key)) for key in self._keys}
        return QuantizedTensor.from_tensors(self.quant_config, self.shape, buffers)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_buffers(
        cls,
        config: QuantConfig,
        shape: tuple[int, int],
        buffers: dict[str, torch.Tensor],
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
    ) -> QuantLoraLinear:
        """Rebuild from a state dict's tensors (``buffers`` keyed by :func:`buffer_name`)."""
        keyed = {key: buffers[buffer_name(key)] for key in buffer_keys(config)}
        q = QuantizedTensor.from_tensors(config, shape, keyed)
        return cls(q, lora_B, lora_A, scaling, bias)

    @classmethod
    def from_decomposition(
        cls, d: Decomposition, bias: torch.Tensor | None = None
    ) -> QuantLoraLinear:
        return cls(d.q, d.lora_B, d.lora_A, d.scaling, bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        config: DecomposeConfig,
        fisher: torch.Tensor | None = None,
    ) -> QuantLoraLinear:
        """Decompose ``linear.weight`` (nn.Linear or Conv1D) and wrap the result."""
        decomposition = decompose(dense_weight(linear).float(), config, fisher)
        layer = cls.from_decomposition(decomposition, getattr(linear, "bias", None))
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.q.dequantize(x.dtype)
        y = F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        del weight
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + self.scaling * lora

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, float32 (out × in)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = Q + s·B·A (out × in), computed in float32 and cast to ``dtype``."""
        return (self.q.dequantize() + self.delta_weight()).to(dtype)

    def merge(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A dense ``nn.Linear`` with weight Q + s·B·A and this layer's bias."""
        device = self.lora_A.device
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant={self.quant_config.name}, rank={self.rank}, scaling={self.scaling:g}, "
            f"bias={self.bias is not None}"
        )

    def quantized_nbytes(self) -> int:
        return sum(getattr(self, buffer_name(k)).nbytes for k in self._keys)
