"""QuantLinear: a frozen bit-packed linear layer, and the base of every quantized layer.

    y = x Qᵀ (+ bias)          x (…, in), Q (out × in)

Q lives as packed buffers (codes, scales, zeros) named by :func:`buffer_name` — never as a dense
copy between calls. The forward dequantizes Q into the input's dtype (one layer's dense weight,
freed after the matmul) and the backward decodes it again (``lorq.nn.functional``), so training
holds no dense copy of Q between forward and backward. Nothing is trainable, except the stored
scales while recovery attaches them (:mod:`lorq.nn.scales`).

The adapter layers extend this class and share its buffers, ``q``, ``shape`` and
``quantized_nbytes``: :class:`~lorq.nn.QuantLoraLinear` (kind "lora") and
:class:`~lorq.nn.QALoraLinear` (kind "qa-lora"). A plain QuantLinear (kind "quant", ``has_lora``
False) is what a merged QA-LoRA layer becomes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from lorq.nn.functional import quant_linear
from lorq.quant import QuantConfig, QuantizedTensor, format_of


def buffer_name(key: str) -> str:
    """Module buffer name of a QuantizedTensor buffer: ``scales.codes`` → ``q_scales_codes``."""
    return "q_" + key.replace(".", "_")


def quantized_from_buffers(
    config: QuantConfig, shape: tuple[int, int], buffers: dict[str, torch.Tensor]
) -> QuantizedTensor:
    """The QuantizedTensor held by a state dict's tensors (``buffers`` keyed by buffer_name)."""
    keys = format_of(config).buffer_keys(config)
    missing = [buffer_name(k) for k in keys if buffer_name(k) not in buffers]
    if missing:
        raise ValueError(f"{config.name} needs buffers {missing}, which are missing")
    return QuantizedTensor(config, shape, {key: buffers[buffer_name(key)] for key in keys})


def frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class PackedBuffers(nn.Module):
    """A module holding a QuantizedTensor as buffers named by :func:`buffer_name`; ``q`` views
    them as a QuantizedTensor again. Subclasses define ``shape``."""

    def register_quantized(self, q: QuantizedTensor) -> None:
        self.quant_config: QuantConfig = q.config
        self._keys = tuple(q.tensors())
        for key, tensor in q.tensors().items():
            self.register_buffer(buffer_name(key), tensor)

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def q(self) -> QuantizedTensor:
        """The quantized tensor as a view of this module's buffers."""
        buffers = {key: getattr(self, buffer_name(key)) for key in self._keys}
        return QuantizedTensor(self.quant_config, self.shape, buffers)

    def quantized_nbytes(self) -> int:
        return sum(getattr(self, buffer_name(k)).nbytes for k in self._keys)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q (out × in) in ``dtype``: decoded for this call, or once while :func:`decoded_once`
        holds this layer (the same values either way)."""
        attached = self.__dict__.get(SCALES)
        if attached is not None:  # trained scales (lorq.nn.scales): Q with their gradients
            return attached.decode(self).to(dtype)
        cache = self.__dict__.get(DECODED)
        if cache is None:
            return self.q.dequantize(dtype)
        if dtype not in cache:
            cache[dtype] = self.q.dequantize(dtype)
        return cache[dtype]


DECODED = "_lorq_decoded"  # the instance attribute of a layer's decoded Q while it is cached
SCALES = "_lorq_scales"  # the instance attribute of a layer's attached scales (lorq.nn.scales)


@contextlib.contextmanager
def decoded_once(module: nn.Module) -> Iterator[None]:
    """While active, every packed layer under ``module`` decodes its Q once and reuses it (a
    block run on many calibration sequences); the dense copies go when it ends. No gradient
    flows into Q, so the forward and backward compute the same values as without it."""
    layers = [
        m for m in module.modules() if isinstance(m, PackedBuffers) and DECODED not in m.__dict__
    ]  # a layer an outer call holds keeps its cache
    for layer in layers:
        layer.__dict__[DECODED] = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop(DECODED, None)


class QuantLinear(PackedBuffers):
    """Drop-in replacement of a linear layer by its frozen quantized weight Q (no adapter)."""

    kind: ClassVar[str] = "quant"
    has_lora: ClassVar[bool] = False  # True for the adapter layers (lora_A, lora_B, scaling)

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_quantized(q)
        self.bias = frozen_bias(bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_buffers(
        cls,
        config: QuantConfig,
        shape: tuple[int, int],
        buffers: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Rebuild from a state dict's tensors (``buffers`` keyed by :func:`buffer_name`)."""
        return cls(quantized_from_buffers(config, shape, buffers), bias)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Qᵀ + bias in ``x.dtype``; Q is dequantized for this call (and again in backward),
        or, while its scales train (``lorq.nn.scales``), decoded from them with gradients."""
        if SCALES in self.__dict__:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.dequantized(x.dtype), bias)
        return quant_linear(x, self.dequantized, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant={self.quant_config.name}, bias={self.bias is not None}"
        )


class AdapterLinear(QuantLinear):
    """Frozen Q plus trainable factors ``lora_B`` (out × r), ``lora_A`` and a scaling s.

    The subclasses define how the factors act (and the shape of ``lora_A``):
    :class:`~lorq.nn.QuantLoraLinear` (r × in) and :class:`~lorq.nn.QALoraLinear` (r × in/G).
    """

    has_lora: ClassVar[bool] = True

    def __init__(
        self,
        q: QuantizedTensor,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
    ):
        super().__init__(q, bias)
        self.rank = lora_A.shape[0]
        self.scaling = float(scaling)
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())

    @classmethod
    def from_buffers(  # type: ignore[override]
        cls,
        config: QuantConfig,
        shape: tuple[int, int],
        buffers: dict[str, torch.Tensor],
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
    ):
        """Rebuild from a state dict's tensors (``buffers`` keyed by :func:`buffer_name`)."""
        return cls(quantized_from_buffers(config, shape, buffers), lora_B, lora_A, scaling, bias)
