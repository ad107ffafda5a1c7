"""QALoraLinear: an INT-k group-wise Q plus a group-pooled adapter that merges into Q.

    y = x Qᵀ + s · pool(x) Aᵀ Bᵀ (+ bias)                         (QA-LoRA, docs/algorithms.md §2.5)
    pool(x)_g = mean_{i ∈ g} x_i                                  x (…, in) → pool(x) (…, in/G)
    Q (out × in) INT-k, groups of G = q.config.block_size inputs;  A (r × in/G), B (out × r)

The pooling group is the quantization group, so the adapter is constant within each group of Q
and folds into the group's zero point (or GGUF-style min):

    Δ[o, g]     = s · (B A)[o, g] / G                  the dense delta of every column of group g
    float min:  min'[o, g]  = min[o, g] + Δ[o, g]      exact up to rounding to scale_dtype
    int zero:   zero'[o, g] = clamp(round(zero[o, g] − Δ[o, g] / scale[o, g]), 0, 2^k − 1)   lossy

``merge`` returns a :class:`QuantLinear` with the same codes and scales and new zeros / mins;
``merge_error`` measures ‖Q' − (Q + Δ)‖, so the integer-zero loss is reported, never hidden.
The pooling is the mean; PEFT's ``use_qalora`` multiplies it by in/G (a different constant).
``delta_weight`` is the dense equivalent s·B·Ā with Ā[:, j] = A[:, j // G] / G (r × in), so a
plain-LoRA export of (B, Ā) computes the same function.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorq.nn.dense import dense_weight, device_of
from lorq.nn.lora_linear import kaiming_uniform
from lorq.nn.quant_linear import AdapterLinear, QuantLinear
from lorq.nn.zero_shift import check_zero_shift, shift_zeros
from lorq.quant import QuantConfig, QuantizedTensor, quantize
from lorq.quant.tensor import MergeError, measure_merge


def check_qa_base(
    config: QuantConfig, shape: tuple[int, int], block_size: int | None = None
) -> None:
    """Raise ValueError unless a Q of ``config`` and ``shape`` can carry a QA-LoRA adapter."""
    check_zero_shift(config)
    block = config.block_size
    if block_size is not None and block_size != block:
        raise ValueError(
            f"block_size={block_size} differs from the quantization group block_size={block}; "
            f"QA-LoRA pools over the quantization groups: pass block_size={block} or quantize "
            f"with block_size={block_size}"
        )
    if shape[1] % block:
        raise ValueError(
            f"in_features={shape[1]} is not a multiple of the group size block_size={block}; "
            "choose a block_size that divides in_features"
        )


def pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``x`` (…, in) over consecutive groups of ``block_size`` features: (…, in/G)."""
    return x.unflatten(-1, (-1, block_size)).mean(-1)


def expand_groups(lora_A: torch.Tensor, block_size: int) -> torch.Tensor:
    """Ā (r × in) with pool(x) Aᵀ = x Āᵀ: Ā[:, j] = A[:, j // G] / G."""
    return lora_A.repeat_interleave(block_size, dim=-1) / block_size


def fold_delta(
    q: QuantizedTensor, delta: torch.Tensor, min_dtype: str | None = None
) -> QuantizedTensor:
    """Q' with Δ (out × in/G) added to every group of Q; codes and scales are Q's own values.

    ``min_dtype`` (float mins only): store the merged mins, and the scales with them, in this
    dtype instead of Q's ``scale_dtype`` — "fp32" keeps an adapter smaller than the fp16 spacing
    of the mins.
    """
    check_qa_base(q.config, q.shape)
    return shift_zeros(q, delta, min_dtype)


def check_factors(
    shape: tuple[int, int], block_size: int, lora_B: torch.Tensor, lora_A: torch.Tensor
) -> None:
    rank, groups = lora_A.shape[0], shape[1] // block_size
    if tuple(lora_A.shape) != (rank, groups) or tuple(lora_B.shape) != (shape[0], rank):
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} and lora_A {tuple(lora_A.shape)} do not fit a QA-LoRA "
            f"layer of shape {shape} with G={block_size}: need lora_B (out, r) = "
            f"({shape[0]}, r) and lora_A (r, in/G) = (r, {groups})"
        )


class QALoraLinear(AdapterLinear):
    """Frozen INT-k Q + trainable group-pooled factors; ``merge`` gives a QuantLinear."""

    kind: ClassVar[str] = "qa-lora"

    def __init__(
        self,
        q: QuantizedTensor,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
    ):
        check_qa_base(q.config, q.shape)
        check_factors(q.shape, q.config.block_size, lora_B, lora_A)
        super().__init__(q, lora_B, lora_A, scaling, bias)

    @property
    def block_size(self) -> int:
        """G: the pooling group, which is the quantization group."""
        return self.quant_config.block_size

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant: QuantConfig,
        rank: int,
        lora_alpha: float = 16.0,
        seed: int = 0,
        q: QuantizedTensor | None = None,
        block_size: int | None = None,
    ) -> QALoraLinear:
        """Wrap ``linear`` (nn.Linear or Conv1D): B = 0, A Kaiming-uniform (seeded), s = α / r.

        ``q``: a precomputed base (GPTQ, or codes read from a GGUF file) of config ``quant``;
        without it Q = RTN ``quantize(W, quant)``. ``block_size``, when given, must equal
        ``quant.block_size``.
        """
        weight = dense_weight(linear)
        shape = (weight.shape[0], weight.shape[1])
        check_qa_base(quant, shape, block_size)
        if q is None:
            q = quantize(weight.float(), quant)
        elif q.config != quant or q.shape != shape:
            raise ValueError(
                f"the given base q ({q.config.name}, shape {q.shape}) does not match "
                f"quant={quant.name!r} and the layer's shape {shape}; pass quant=q.config"
            )
        lora_A = kaiming_uniform(rank, shape[1] // quant.block_size, seed)
        lora_B = torch.zeros(shape[0], rank)
        layer = cls(q, lora_B, lora_A, lora_alpha / rank, getattr(linear, "bias", None))
        return layer.to(device_of(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = pool(x, self.block_size)
        lora = F.linear(F.linear(pooled, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.quantized_forward(x) + self.scaling * lora

    def expanded_lora_A(self) -> torch.Tensor:
        """Ā (r × in), float32: the plain-LoRA A computing the same function as pooled A."""
        return expand_groups(self.lora_A.detach().float(), self.block_size)

    def group_delta(self) -> torch.Tensor:
        """Δ = s·(B A)/G (out × in/G), float32: what merging adds to every weight of a group."""
        low_rank = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return self.scaling * low_rank / self.block_size

    def delta_weight(self) -> torch.Tensor:
        """s·B·Ā, float32 (out × in): Δ repeated over the G columns of each group."""
        return self.scaling * (self.lora_B.detach().float() @ self.expanded_lora_A())

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense W = Q + s·B·Ā (out × in), computed in float32 and cast to ``dtype``."""
        return (self.q.dequantize() + self.delta_weight()).to(dtype)

    def merge(self, min_dtype: str | None = None) -> QuantLinear:
        """A QuantLinear with Δ folded into the zeros / mins; this layer is left unchanged.

        Float mins: exact up to the rounding to scale_dtype (or to ``min_dtype``, e.g. "fp32",
        when given). Integer zeros: rounded, lossy — see :meth:`merge_error`.
        """
        return QuantLinear(fold_delta(self.q, self.group_delta(), min_dtype), self.bias)

    def merge_error(self, merged: QuantLinear | None = None) -> MergeError:
        """How far ``merged`` (default: ``self.merge()``) is from Q + s·B·Ā."""
        merged = self.merge() if merged is None else merged
        return measure_merge(self.q, self.delta_weight(), merged.q)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant={self.quant_config.name}, rank={self.rank}, block_size={self.block_size}, "
            f"scaling={self.scaling:g}, bias={self.bias is not None}"
        )
