"""QuantLoraLinear: a frozen bit-packed Q plus a trainable low-rank correction.

    y = x Qᵀ + s · (x Aᵀ) Bᵀ (+ bias)          x (…, in), Q (out × in), A (r × in), B (out × r)

Q lives as packed buffers (codes, scales, zeros) shared with :class:`~lorq.nn.QuantLinear`, whose
forward dequantizes Q per call. Only ``lora_A`` and ``lora_B`` are trainable; ``bias`` is frozen.

``from_linear`` (decompose an ``nn.Linear`` or GPT-2 ``Conv1D``) and ``merge`` (back to a dense
``nn.Linear`` with W = Q + s·B·A) are inverses up to the decomposition's error; merging is
idempotent because it does not change the layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorq.config import DecomposeConfig
from lorq.decomposition import Decomposition, decompose
from lorq.nn.dense import dense_weight, device_of
from lorq.nn.quant_linear import AdapterLinear

__all__ = ["QuantLoraLinear", "kaiming_uniform"]


def kaiming_uniform(rank: int, fan_in: int, seed: int) -> torch.Tensor:
    """LoRA's init of A (rank × fan_in), float32: U(-1/√fan_in, 1/√fan_in), seeded, on the CPU.

    Equals ``nn.init.kaiming_uniform_(a=√5)``'s bound √(6 / ((1 + 5)·fan_in)) = 1/√fan_in.
    """
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / fan_in**0.5
    return (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound


class QuantLoraLinear(AdapterLinear):
    """Drop-in replacement of a linear layer: frozen quantized weight + trainable LoRA factors."""

    kind: ClassVar[str] = "lora"

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
        hessian: torch.Tensor | None = None,
    ) -> QuantLoraLinear:
        """Decompose the weight of ``linear`` (nn.Linear, Conv1D, packed QuantLinear); wrap it.
        ``fisher`` / ``hessian``: what ``config.weighting`` and ``config.rounding`` use."""
        decomposition = decompose(dense_weight(linear).float(), config, fisher, hessian)
        layer = cls.from_decomposition(decomposition, getattr(linear, "bias", None))
        return layer.to(device_of(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.quantized_forward(x) + self.scaling * lora

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
