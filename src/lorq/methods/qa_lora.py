"""QA-LoRA (arXiv 2309.14717; docs/algorithms.md §2.4): an INT-k group-wise base and a
group-pooled adapter that merges into its zero points / mins.

    Q     the source's own codes when the module is packed in ``quant`` (a GGUF's Q4_1 layers,
          ``config.gguf_codes``), a given Q, GPTQ on H, importance-weighted RTN, or RTN
    B, A  B = 0 and A Kaiming-uniform; with activation weighting the first components are the
          best rank-r pooled adapter for W − Q in the H-norm (``lorq.decomposition.pooled``)
"""

from __future__ import annotations

import torch

from lorq.config import CompressConfig, uses_activations
from lorq.decomposition.pooled import pooled_low_rank
from lorq.methods.base import Compressed, Target
from lorq.model.targets import dense_weight, relative_error, weight_shape
from lorq.nn import QALoraLinear, QuantLinear
from lorq.nn.qa_lora_linear import check_qa_base
from lorq.quant import QuantConfig, QuantizedTensor, format_of, quantize
from lorq.quant.gptq import damped_cholesky, gptq_quantize


def source_codes(module, quant: QuantConfig) -> QuantizedTensor | None:
    """The codes a packed source layer already holds in ``quant`` (None when it holds none)."""
    if isinstance(module, QuantLinear) and not module.has_lora and module.quant_config == quant:
        return module.q
    return None


def base_of(weight: torch.Tensor, config: CompressConfig, quant: QuantConfig, hessian):
    """Q of one matrix: GPTQ with its H, RTN with scales under diag H ("weighted"), or RTN."""
    if config.rounding == "weighted":
        return format_of(quant).quantize_weighted(weight, quant, hessian.diagonal().float())
    if not config.gptq:
        return quantize(weight, quant)
    return gptq_quantize(weight, hessian.float().to(weight.device), quant, config.damp)


def init_adapter(layer: QALoraLinear, weight: torch.Tensor, hessian, config: CompressConfig):
    """The first k ≤ min(r, out, in/G) components of B, A: the closed-form pooled fit of W − Q
    (the rest keep LoRA's init, B = 0 and a random A, so that every component trains)."""
    residual = weight - layer.q.dequantize().to(weight.device)
    chol = damped_cholesky(hessian.float().to(weight.device), config.damp)
    generator = torch.Generator().manual_seed(config.seed)
    lora_B, lora_A = pooled_low_rank(
        residual, chol, layer.block_size, config.rank, layer.scaling, "randomized", generator
    )
    k = lora_B.shape[1]
    with torch.no_grad():
        layer.lora_B[:, :k] = lora_B.to(layer.lora_B.device)
        layer.lora_A[:k] = lora_A.to(layer.lora_A.device)


class QALora:
    def compress(self, target: Target, config: CompressConfig) -> Compressed:
        module, quant = target.module, target.quant
        check_qa_base(quant, weight_shape(module))
        weight = dense_weight(module).float()
        q = target.given
        if q is None and config.gguf_codes:
            q = source_codes(module, quant)
        if q is None:
            q = base_of(weight, config, quant, target.hessian)
        layer = QALoraLinear.from_linear(
            module, q.config, config.rank, config.lora_alpha, config.seed, q
        )
        if uses_activations(config.weighting):
            init_adapter(layer, weight, target.hessian, config)
        approx = q.dequantize().to(weight.device) + layer.delta_weight().to(weight.device)
        return Compressed(layer, relative_error(weight, approx))
