"""Plain quantization with LoRA's own init (QLoRA-style):

Q = quant(W)       round to nearest, importance-weighted on diag H, or GPTQ on H (``rounding``)
B = 0 (out × r),   A ~ Kaiming-uniform (r × in, seeded)        so Q + s·B·A = Q

Rank 0 (a plan that gives a matrix no adapter, ``QuantOnly``): the same Q as a QuantLinear.
"""

from __future__ import annotations

import torch

from lorq.config import CompressConfig
from lorq.decomposition import Decomposition
from lorq.decomposition.common import Rounding
from lorq.methods.base import Compressed, Target
from lorq.model.targets import dense_weight, device_of, relative_error
from lorq.nn import QuantLinear, QuantLoraLinear
from lorq.nn.lora_linear import kaiming_uniform
from lorq.quant import QuantConfig, QuantizedTensor


def rounded(
    weight: torch.Tensor,
    quant: QuantConfig,
    config: CompressConfig,
    hessian: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Q of ``weight`` (out × in, fp32) rounded as ``config.rounding`` says."""
    dc = config.decompose_config(quant)
    return Rounding(dc, hessian if config.rounds_with_h else None, weight.device)(weight, quant)


def plain_decomposition(
    weight: torch.Tensor,
    quant: QuantConfig,
    config: CompressConfig,
    hessian: torch.Tensor | None = None,
) -> Decomposition:
    """Q of ``weight`` (out × in, fp32) as ``config.rounding`` says (``hessian``: H, in × in,
    when it rounds with it), B = 0, A Kaiming-uniform."""
    dc = config.decompose_config(quant)
    q = rounded(weight, quant, config, hessian)
    lora_A = kaiming_uniform(config.rank, weight.shape[1], config.seed).to(weight.device)
    lora_B = torch.zeros(weight.shape[0], config.rank, device=weight.device)
    error = float(torch.linalg.vector_norm(weight - q.dequantize()))
    return Decomposition(q, lora_B, lora_A, dc.scaling, (error,), 0, dc)


class Plain:
    def compress(self, target: Target, config: CompressConfig) -> Compressed:
        weight = dense_weight(target.module).float()
        d = plain_decomposition(weight, target.quant, config, target.hessian)
        layer = QuantLoraLinear.from_decomposition(d, getattr(target.module, "bias", None))
        return Compressed(
            layer.to(device_of(target.module)), relative_error(weight, d.reconstruct())
        )


class QuantOnly:
    def compress(self, target: Target, config: CompressConfig) -> Compressed:
        weight = dense_weight(target.module).float()
        q = rounded(weight, target.quant, config, target.hessian)
        layer = QuantLinear(q, getattr(target.module, "bias", None))
        return Compressed(
            layer.to(device_of(target.module)), relative_error(weight, q.dequantize())
        )
